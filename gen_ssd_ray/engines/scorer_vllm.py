"""The student scorer on vLLM `prompt_logprobs` (a config alternative: `student.backend=vllm`).

Each candidate becomes one request whose prompt is `context + extra + candidate` and whose prompt
log-probs give the candidate tokens' NLL. vLLM V1 ignores the prefix cache for requests that ask for
prompt log-probs, so every chunk re-runs the whole prefix: `tokens_processed` reports that cost
honestly (it grows quadratically over a trajectory, unlike the `hf` backend's KV reuse).

Knows vLLM and the token alignment; knows nothing about the search or Ray.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Sequence

from gen_ssd_ray.core.types import ScoreRequest, ScoreResult
from gen_ssd_ray.engines.alignment import Aligner
from gen_ssd_ray.engines.scorer_hf import ScorerSpec
from gen_ssd_ray.engines.teacher_vllm import cuda_available, shutdown_engine


class VllmPromptLogprobScorer:
    def __init__(
        self,
        spec: ScorerSpec,
        kv_cache_gib: float = 1.0,
        max_model_len: int = 2048,
        gpu_memory_utilization: float = 0.85,
        enforce_eager: bool = False,
    ):
        if not cuda_available():
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, round(kv_cache_gib))))
        os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")  # see teacher_vllm
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self.aligner = Aligner.from_models(spec.model, spec.teacher_model, spec.trust_remote_code)
        self.tok = self.aligner.tok
        kwargs = dict(
            model=spec.model,
            dtype="bfloat16" if spec.dtype == "auto" else spec.dtype,
            max_model_len=max_model_len,
            trust_remote_code=spec.trust_remote_code,
            enforce_eager=enforce_eager,
            disable_log_stats=True,
        )
        if cuda_available():
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        else:
            kwargs["enable_chunked_prefill"] = False
            kwargs["max_num_batched_tokens"] = max_model_len * 4
        self.engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs))

    async def _nll(self, ids: tuple[int, ...], start: int) -> float:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
        final = None
        async for out in self.engine.generate(
            TokensPrompt(prompt_token_ids=list(ids)), params, uuid.uuid4().hex
        ):
            final = out
        lps = final.prompt_logprobs  # position 0 is None
        return -sum(lps[j][ids[j]].logprob for j in range(start, len(ids)))

    async def score(self, requests: Sequence[ScoreRequest]) -> list[ScoreResult]:
        out = []
        for r in requests:
            rows = self.aligner.rows(r)
            jobs, processed = [], 0
            for extra, target in zip(rows.extras, rows.targets, strict=True):
                full = rows.context + extra + target
                jobs.append(self._nll(full, len(rows.context) + len(extra)) if target else _zero())
                processed += len(full) if target else 0
            sums = await asyncio.gather(*jobs)
            out.append(ScoreResult(r.key, tuple(sums), tuple(len(t) for t in rows.targets), processed))
        return out

    def release(self, groups: Sequence[str]) -> None:
        """No per-group state: vLLM recomputes the prefix for prompt log-probs."""

    def shutdown(self) -> None:
        shutdown_engine(self.engine)


async def _zero() -> float:
    return 0.0
