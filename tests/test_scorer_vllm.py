"""The vLLM prompt_logprobs scorer agrees with the HF scorer and reports its full-prefix cost."""

from __future__ import annotations

import asyncio

import pytest

from gen_ssd_ray.core.types import Candidate, ScoreRequest

pytestmark = pytest.mark.integration


def test_prompt_logprob_scorer_matches_hf_scorer(tiny_model):
    from gen_ssd_ray.engines.scorer_hf import HfScorer, ScorerSpec
    from gen_ssd_ray.engines.scorer_vllm import VllmPromptLogprobScorer

    spec = ScorerSpec(model=tiny_model, teacher_model=tiny_model)
    prompt = tuple(range(300, 340))
    prefix = (11, 12, 13, 14)
    cands = (Candidate((21, 22, 23), "", "length"), Candidate((31, 32), "", "stop"))
    req = ScoreRequest("k", "g", prompt, prefix, "", cands)

    async def run():
        scorer = VllmPromptLogprobScorer(spec, max_model_len=512, enforce_eager=True)
        try:
            return await scorer.score([req])
        finally:
            scorer.shutdown()

    (v,) = asyncio.run(run())
    (h,) = HfScorer(spec).score([req])
    assert v.num_tokens == h.num_tokens == (3, 2)
    # bf16 engine vs fp32 reference: per-token NLLs agree to a few percent
    assert v.nll_sums == pytest.approx(h.nll_sums, rel=0.05)
    # no KV reuse: both candidates re-run the whole context
    assert v.tokens_processed == 2 * (len(prompt) + len(prefix)) + 3 + 2
