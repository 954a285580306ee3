"""The HF scorer's KV reuse gives the same NLLs as recomputing the whole sequence, at linear cost."""

from __future__ import annotations

import pytest

from gen_ssd_ray.core.types import Candidate, ScoreRequest
from gen_ssd_ray.engines.base import ScorerSpec
from gen_ssd_ray.generate.config import StudentConfig

pytestmark = pytest.mark.integration


def spec(model: str, device: str = "auto", **student) -> ScorerSpec:
    return ScorerSpec(StudentConfig(model=model, **student), teacher_model=model, device=device)


@pytest.fixture(scope="module")
def scorer(tiny_model):
    from gen_ssd_ray.engines.scorer_hf import HfScorer

    return HfScorer(spec(tiny_model, kv_cache_tokens=10_000))


def full_nll(scorer, context, cand):
    import torch

    ids = torch.tensor([list(context) + list(cand)])
    with torch.inference_mode():
        logp = torch.log_softmax(scorer.model(input_ids=ids).logits[0].float(), -1)
    n = len(context)
    return float(-sum(logp[n + j - 1, t] for j, t in enumerate(cand)))


def cands(*seqs, finish="length"):
    return tuple(Candidate(tuple(s), "", finish) for s in seqs)


def test_kv_reuse_matches_full_recompute_and_costs_only_new_tokens(scorer):
    prompt = (1, 500, 600, 700, 800, 2)
    step0 = cands((11, 12, 13, 14), (21, 22, 23, 24), (31, 32))
    (r0,) = scorer.score_sync([ScoreRequest("k0", "g", prompt, (), "", step0)])
    assert r0.num_tokens == (4, 4, 2)
    assert r0.tokens_processed == len(prompt) + 10  # the context once, then the candidates
    for i, c in enumerate(step0):
        assert r0.nll_sums[i] == pytest.approx(full_nll(scorer, prompt, c.token_ids), rel=1e-4, abs=1e-4)

    # step 1 continues from candidate 1: its KV is cached, only the new candidates are run
    prefix = step0[1].token_ids
    step1 = cands((41, 42, 43), (51, 52, 53))
    (r1,) = scorer.score_sync([ScoreRequest("k1", "g", prompt, prefix, "", step1)])
    assert r1.tokens_processed == 6
    for i, c in enumerate(step1):
        assert r1.nll_sums[i] == pytest.approx(
            full_nll(scorer, prompt + prefix, c.token_ids), rel=1e-4, abs=1e-4
        )

    # older entries of the group were dropped; release frees the rest
    assert scorer.cached_tokens() == 2 * (len(prompt) + 4 + 3)
    scorer.release_sync(["g"])
    assert scorer.cached_tokens() == 0


def test_cache_miss_recomputes_prefix(scorer):
    prompt = (1, 500, 600)
    (r,) = scorer.score_sync([ScoreRequest("k", "other", prompt, (7, 8, 9), "", cands((10, 11)))])
    assert r.tokens_processed == len(prompt) + 3 + 2
    assert r.nll_sums[0] == pytest.approx(full_nll(scorer, prompt + (7, 8, 9), (10, 11)), rel=1e-4, abs=1e-4)
    scorer.release_sync(["other"])


def test_lru_budget_evicts_old_groups(tiny_model):
    from gen_ssd_ray.engines.scorer_hf import HfScorer

    s = HfScorer(spec(tiny_model, kv_cache_tokens=30))
    for g in range(4):
        s.score_sync([ScoreRequest(f"k{g}", f"g{g}", (1, 2, 3, 4, 5), (), "", cands((6, 7, 8, 9, 10)))])
    assert s.cached_tokens() <= 30 and "g3" in s._groups and "g0" not in s._groups


@pytest.mark.gpu
def test_cuda_scorer_matches_cpu(tiny_model):
    """The CUDA path (bf16 by default) agrees with the fp32 CPU scorer; skipped without CUDA."""
    from gen_ssd_ray.engines.scorer_hf import HfScorer

    req = ScoreRequest("k", "g", (1, 500, 600, 700), (9, 10), "", cands((11, 12, 13), (21, 22)))
    (cpu,) = HfScorer(spec(tiny_model, device="cpu")).score_sync([req])
    gpu = HfScorer(spec(tiny_model, device="cuda"))
    assert next(gpu.model.parameters()).dtype.is_floating_point and gpu.device == "cuda"
    (g,) = gpu.score_sync([req])
    assert g.nll_sums == pytest.approx(cpu.nll_sums, rel=0.05)


def test_a_call_that_stops_waiting_never_overlaps_the_next_forward(tiny_model):
    """A deadline that cancels a score call leaves its forward running; the next call must not start
    its forward on the same cache meanwhile (one worker thread, in order)."""
    import asyncio
    import threading
    import time

    from gen_ssd_ray.engines.scorer_hf import HfScorer

    s = HfScorer(spec(tiny_model, device="cpu"))
    inside, overlap = [0], [0]
    guard = threading.Lock()

    def slow(requests):
        with guard:
            inside[0] += 1
            overlap[0] = max(overlap[0], inside[0])
        time.sleep(0.2)
        with guard:
            inside[0] -= 1
        return []

    s.score_sync = slow

    async def main():
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(s.score([]), 0.01)  # the caller gives up; the forward goes on
        await s.score([])
        await s.release(["g"])

    asyncio.run(main())
    assert overlap[0] == 1
    s.shutdown()
