"""The HF scorer: each beam's context KV once, calls batched across trajectories, a byte budget; its
NLLs equal a full recompute whatever the batching and the evictions, at linear cost."""

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

    return HfScorer(spec(tiny_model, device="cpu"))


def full_nll(scorer, context, cand):
    import torch

    ids = torch.tensor([list(context) + list(cand)])
    with torch.inference_mode():
        logp = torch.log_softmax(scorer.model(input_ids=ids).logits[0].float(), -1)
    n = len(context)
    return float(-sum(logp[n + j - 1, t] for j, t in enumerate(cand)))


def cands(*seqs, finish="length"):
    return tuple(Candidate(tuple(s), "", finish) for s in seqs)


def assert_full(scorer, req, result):
    context = req.student_prompt_ids + req.prefix_ids
    for i, c in enumerate(req.candidates):
        expected = full_nll(scorer, context, c.token_ids)
        assert result.nll_sums[i] == pytest.approx(expected, rel=1e-4, abs=1e-4), (req.key, i)


def test_kv_reuse_matches_full_recompute_and_costs_only_new_tokens(scorer):
    prompt = (1, 500, 600, 700, 800, 2)
    step0 = cands((11, 12, 13, 14), (21, 22, 23, 24), (31, 32))
    req0 = ScoreRequest("k0", "g", prompt, (), "", step0)
    (r0,) = scorer.score_sync([req0])
    assert r0.num_tokens == (4, 4, 2)
    assert r0.tokens_processed == len(prompt) + 10  # the context once, then the candidates
    assert_full(scorer, req0, r0)
    # the context once and each candidate's own tokens, not K copies of the context
    assert scorer.cached_tokens() == len(prompt) + 10

    # step 1 continues from candidate 1: the context is cached, only its last token and the new
    # candidates are run (the last token's output predicts the candidates' first tokens)
    req1 = ScoreRequest("k1", "g", prompt, step0[1].token_ids, "", cands((41, 42, 43), (51, 52, 53)))
    (r1,) = scorer.score_sync([req1])
    assert r1.tokens_processed == 1 + 6
    assert_full(scorer, req1, r1)
    # the losing candidates are gone; the context is kept once (prompt, candidate 1, its last token)
    assert scorer.cached_tokens() == len(prompt) + 4 + 1 + 6
    scorer.release_sync(["g"])
    assert scorer.cached_tokens() == 0


def test_batching_across_trajectories_of_different_lengths_then_evictions(tiny_model):
    """One forward scores trajectories of different context lengths, hits and misses together; with a
    budget that cannot hold them all, evicted trajectories recompute, and every NLL still equals a
    full recompute."""
    from gen_ssd_ray.engines.scorer_hf import HfScorer

    s = HfScorer(spec(tiny_model, device="cpu"))
    prompts = [tuple(range(1000 * i, 1000 * i + n)) for i, n in enumerate((3, 17, 40, 9))]
    step0 = [
        ScoreRequest(f"a{i}", f"g{i}", p, (), "", cands((7, 8, 9), (5, 6))) for i, p in enumerate(prompts)
    ]
    out0 = s.score_sync(step0)
    assert s.stats["forwards"] == 1  # all four in one forward
    for req, r in zip(step0, out0, strict=True):
        assert_full(s, req, r)
    s.release_sync(["g2"])  # g2 misses next time
    step1 = [
        ScoreRequest(f"b{i}", f"g{i}", p, (5, 6) if i % 2 else (7, 8, 9), "", cands((1, 2), (3, 4, 5, 6)))
        for i, p in enumerate(prompts)
    ]
    out1 = s.score_sync(step1)
    assert s.stats["forwards"] == 2
    for i, (req, r) in enumerate(zip(step1, out1, strict=True)):
        assert_full(s, req, r)
        assert r.tokens_processed == (len(req.student_prompt_ids) + len(req.prefix_ids) if i == 2 else 1) + 6

    # A budget of about two trajectories: each call evicts others (the most recently scored first, never
    # one being scored), the evicted ones recompute, and every NLL stays exact.
    small = HfScorer(spec(tiny_model, device="cpu", kv_cache_gib=1.0))
    small._need = lambda batch: sum(it.query for it in batch)  # new KV only: a budget in cached tokens
    small.cache.budget_tokens = 90  # about two of the four trajectories
    for step in range(3):
        for i, p in enumerate(prompts):
            prefix = (7, 8, 9) * step
            req = ScoreRequest(f"c{step}{i}", f"g{i}", p, prefix, "", cands((7, 8, 9), (5, 6)))
            (r,) = small.score_sync([req])
            assert_full(small, req, r)
            assert small.cached_tokens() <= small.cache.budget_tokens
    assert small.cache.evicted_groups > 0


def test_a_prompt_prefix_shared_with_another_trajectory_is_copied_not_run(tiny_model):
    from gen_ssd_ray.engines.scorer_hf import HfScorer

    s = HfScorer(spec(tiny_model, device="cpu"))
    template = tuple(range(300, 330))  # a chat template / system prompt: 30 tokens
    a = ScoreRequest("a", "a", template + (1, 2, 3), (), "", cands((7, 8), (9,)))
    b = ScoreRequest("b", "b", template + (4, 5, 6, 7), (), "", cands((7, 8), (9,)))
    (ra,) = s.score_sync([a])
    (rb,) = s.score_sync([b])
    assert ra.tokens_processed == 33 + 3 and rb.tokens_processed == 4 + 3
    assert_full(s, a, ra)
    assert_full(s, b, rb)
    s.release_sync(["a"])  # b's copy of the prefix is its own
    (rb2,) = s.score_sync([ScoreRequest("b2", "b", b.student_prompt_ids, (9,), "", cands((1, 2)))])
    assert rb2.tokens_processed == 1 + 2
    assert_full(s, ScoreRequest("b2", "b", b.student_prompt_ids, (9,), "", cands((1, 2))), rb2)
    assert s.cached_tokens() == 34 + 1 + 1 + 2  # b's first context (with its candidate 9), then


def test_a_request_the_budget_cannot_hold_fails_alone(tiny_model):
    from gen_ssd_ray.engines.scorer_hf import HfScorer

    s = HfScorer(spec(tiny_model, device="cpu"))
    ok = ScoreRequest("ok", "a", (1, 2, 3), (), "", cands((4, 5)))
    big = ScoreRequest("big", "b", tuple(range(10, 600)), (), "", cands((4, 5)))
    s.cache.budget_tokens = s._need([s._prepare(ok)]) + 10
    out = s._score_all([ok, big], set())
    assert out[0].nll_sums and isinstance(out[1], ValueError)
    assert "student.kv_cache_gib" in str(out[1])


def test_concurrent_calls_are_batched_and_equal_one_by_one(tiny_model):
    """Many callers at once: fewer forwards than calls, and the same NLLs as scoring each alone."""
    import asyncio

    from gen_ssd_ray.engines.scorer_hf import HfScorer

    reqs = [
        ScoreRequest(f"k{i}", f"g{i}", tuple(range(50, 50 + 5 + 3 * i)), (), "", cands((7, 8), (9, 10, 11)))
        for i in range(12)
    ]
    alone = HfScorer(spec(tiny_model, device="cpu"))
    expected = [alone.score_sync([r])[0] for r in reqs]
    s = HfScorer(spec(tiny_model, device="cpu"))

    async def main():
        return await asyncio.gather(*(s.score([r]) for r in reqs))

    got = asyncio.run(main())
    assert s.stats["forwards"] < len(reqs)
    for (g,), e in zip(got, expected, strict=True):
        assert g.nll_sums == pytest.approx(e.nll_sums, rel=1e-4, abs=1e-4)
    s.shutdown()


@pytest.mark.gpu
def test_cuda_scorer_matches_cpu(tiny_model):
    """The CUDA path (bf16 by default) agrees with the fp32 CPU scorer; skipped without CUDA."""
    from gen_ssd_ray.engines.scorer_hf import HfScorer

    req = ScoreRequest("k", "g", (1, 500, 600, 700), (9, 10), "", cands((11, 12, 13), (21, 22)))
    (cpu,) = HfScorer(spec(tiny_model, device="cpu")).score_sync([req])
    gpu = HfScorer(spec(tiny_model, device="cuda"))
    assert next(gpu.model.parameters()).dtype.is_floating_point and gpu.device == "cuda"
    assert gpu.capacity()["kv_bytes"] > 0
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

    def slow(requests, pending):
        with guard:
            inside[0] += 1
            overlap[0] = max(overlap[0], inside[0])
        time.sleep(0.2)
        with guard:
            inside[0] -= 1
        return [None] * len(requests)

    s._score_all = slow
    req = ScoreRequest("k", "g", (1, 2), (), "", cands((3,)))

    async def main():
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(s.score([req]), 0.01)  # the caller gives up; the forward goes on
        await s.score([req])
        await s.release(["g"])

    asyncio.run(main())
    assert overlap[0] == 1
    s.shutdown()
