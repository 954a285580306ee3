"""The student scorer on vLLM `prompt_logprobs` (a config alternative: `student.backend=vllm`).

Each candidate becomes one request whose prompt is `context + extra + candidate` and whose prompt
log-probs give the candidate tokens' NLL. vLLM V1 ignores the prefix cache for requests that ask for
prompt log-probs, so every chunk re-runs the whole prefix: `tokens_processed` reports that cost
honestly (it grows quadratically over a trajectory, unlike the `hf` backend's KV reuse).

Knows vLLM and the token alignment; knows nothing about the search or Ray.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence

from gen_ssd_ray.core.types import ScoreRequest, ScoreResult
from gen_ssd_ray.engines.alignment import Aligner
from gen_ssd_ray.engines.base import EngineContext, ScorerSpec
from gen_ssd_ray.engines.teacher_vllm import async_engine, shutdown_engine


class VllmPromptLogprobScorer:
    """The `vllm` scorer backend. Engine settings come from the `student` section: `kv_cache_gib` (CPU),
    `gpu_memory_utilization` (GPU), `enforce_eager`, `dtype`, `trust_remote_code`."""

    def __init__(self, spec: ScorerSpec, context: EngineContext | None = None):
        self.calls = 0
        s = spec.student
        self.aligner = Aligner.from_models(s.model, spec.teacher_model, s.trust_remote_code)
        self.tok = self.aligner.tok
        self.engine = async_engine(
            s.model,
            dtype="bfloat16" if s.dtype == "auto" else s.dtype,
            max_model_len=spec.max_model_len,
            trust_remote_code=s.trust_remote_code,
            enforce_eager=s.enforce_eager,
            gpu_memory_utilization=s.gpu_memory_utilization,
            kv_cache_gib=s.kv_cache_gib,
        )

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
        self.calls += 1
        return out

    async def release(self, groups: Sequence[str]) -> None:
        """No per-group state: vLLM recomputes the prefix for prompt log-probs."""

    async def check_health(self) -> None:
        await self.engine.check_health()

    def progress(self) -> int:
        return self.calls

    def shutdown(self) -> None:
        shutdown_engine(self.engine)


async def _zero() -> float:
    return 0.0
