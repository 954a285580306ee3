"""Unit tests of the pure search core with deterministic fake engines (milliseconds)."""

import math
import subprocess
import sys

import pytest

from gen_ssd_ray.core import ProblemSearch, SearchParams, get_pruner, get_selector
from gen_ssd_ray.core.types import Candidate, ExpandResult, ScoreResult
from gen_ssd_ray.engines.fake import EOS, FakeScorer, FakeTeacher, run_search

PROMPT = (101, 102, 103)
SPROMPT = (7, 8)


def make(**kw):
    seed = kw.pop("seed", 1)
    return ProblemSearch(SearchParams(**kw), PROMPT, SPROMPT, group="p0/t0", seed=seed)


def mean_nll(ids, nll_of=lambda t: t / 10.0):
    return sum(nll_of(t) for t in ids) / len(ids)


def test_picks_lowest_ppl_candidate_each_step():
    teacher, scorer = FakeTeacher(), FakeScorer()
    search = make(chunk_tokens=4, num_candidates=3, max_new_tokens=12)
    traj = run_search(search, teacher, scorer)
    assert traj.status == "truncated"
    assert len(traj.chunks) == 3
    prefix: tuple[int, ...] = ()
    for step, rec in enumerate(traj.chunks):
        req = teacher.calls[step]
        # the teacher is asked to continue the prompt's ids plus the accepted ids, never re-rendered text
        assert req.prompt_token_ids == PROMPT + prefix
        (res,) = FakeTeacher().expand([req])
        cand_nll = [mean_nll(c.token_ids) for c in res.candidates]
        assert rec.chosen == cand_nll.index(min(cand_nll))
        assert [c.ppl for c in rec.candidates] == pytest.approx([math.exp(x) for x in cand_nll])
        prefix += res.candidates[rec.chosen].token_ids
    assert traj.response_token_ids == prefix
    assert len(prefix) == 12


def test_score_requests_carry_student_prompt_and_prefix():
    teacher, scorer = FakeTeacher(), FakeScorer()
    run_search(make(chunk_tokens=4, num_candidates=2, max_new_tokens=8), teacher, scorer)
    first, second = scorer.calls
    assert first.student_prompt_ids == SPROMPT and first.prefix_ids == () and first.prefix_text == ""
    assert second.group == "p0/t0"
    assert len(second.prefix_ids) == 4
    assert second.prefix_ids == teacher.calls[1].prompt_token_ids[len(PROMPT) :]


def test_token_budget_and_chunk_sizes():
    teacher = FakeTeacher()
    traj = run_search(make(chunk_tokens=4, num_candidates=2, max_new_tokens=10), teacher, FakeScorer())
    assert [r.max_tokens for r in teacher.calls] == [4, 4, 2]
    assert all(r.n == 2 for r in teacher.calls)
    assert traj.status == "truncated" and len(traj.response_token_ids) == 10


def test_eos_completes():
    traj = run_search(make(chunk_tokens=4, num_candidates=3), FakeTeacher(eos_prob=1.0), FakeScorer())
    assert traj.status == "completed"
    assert traj.response_token_ids == (EOS,)
    assert len(traj.chunks) == 1


def test_all_candidates_above_threshold_prunes_at_first_step():
    # every token costs NLL 5 -> PPL e^5 ~ 148 > 100
    traj = run_search(
        make(chunk_tokens=4, num_candidates=3, prune_ppl=100.0),
        FakeTeacher(),
        FakeScorer(lambda t: 5.0),
    )
    assert traj.status == "pruned"
    assert traj.response_token_ids == ()
    assert [c.chosen for c in traj.chunks] == [-1]
    assert traj.chunks[0].candidates[0].ppl == pytest.approx(math.exp(5.0))
    assert traj.student_ppl is None


def test_threshold_only_removes_unlearnable_candidates():
    # Tokens below 25 are cheap (NLL 0.1), others cost 6: a 3-token candidate has PPL 1.1 only when all
    # its tokens are cheap; with one expensive token its PPL is e^2.07 ~ 7.9 > 5 (unlearnable).
    nll_of = lambda t: 0.1 if t < 25 else 6.0  # noqa: E731
    search = make(chunk_tokens=3, num_candidates=4, max_new_tokens=30, prune_ppl=5.0)
    traj = run_search(search, FakeTeacher(), FakeScorer(nll_of))
    first, second = traj.chunks
    # step 0: only candidate 2 is learnable and it is kept
    assert [round(c.ppl, 1) for c in first.candidates] == [403.4, 7.9, 1.1, 7.9]
    assert first.chosen == 2
    # step 1: every candidate is above the threshold -> pruned, keeping the accepted prefix
    assert all(c.ppl > 5.0 for c in second.candidates) and second.chosen == -1
    assert traj.status == "pruned" and len(traj.response_token_ids) == 3


def test_pruned_mid_way_keeps_accepted_prefix():
    calls = {"n": 0}

    class Scorer(FakeScorer):
        def score(self, requests):
            calls["n"] += 1
            out = super().score(requests)
            if calls["n"] == 2:  # second step: everything unlearnable
                return [
                    ScoreResult(
                        r.key, tuple(20.0 * n for n in r.num_tokens), r.num_tokens, r.tokens_processed
                    )
                    for r in out
                ]
            return out

    traj = run_search(
        make(chunk_tokens=4, num_candidates=2, prune_ppl=1000.0), FakeTeacher(), Scorer(lambda t: 1.0)
    )
    assert traj.status == "pruned"
    assert len(traj.response_token_ids) == 4
    assert [c.chosen >= 0 for c in traj.chunks] == [True, False]
    assert traj.student_ppl == pytest.approx(math.e)


def test_costs_are_counted():
    teacher, scorer = FakeTeacher(), FakeScorer()
    traj = run_search(make(chunk_tokens=4, num_candidates=3, max_new_tokens=8), teacher, scorer)
    assert traj.teacher_tokens_generated == 2 * 3 * 4
    assert traj.student_tokens_processed == 2 * 3 * 4
    assert traj.student_tokens_scored == 2 * 3 * 4
    assert traj.num_scored_tokens == 8
    assert traj.prompt_tokens == len(PROMPT) + len(PROMPT) + 4


def test_seeds_are_deterministic_and_distinct():
    a = run_search(
        make(chunk_tokens=4, num_candidates=2, max_new_tokens=8, seed=3), FakeTeacher(), FakeScorer()
    )
    b = run_search(
        make(chunk_tokens=4, num_candidates=2, max_new_tokens=8, seed=3), FakeTeacher(), FakeScorer()
    )
    c = run_search(
        make(chunk_tokens=4, num_candidates=2, max_new_tokens=8, seed=4), FakeTeacher(), FakeScorer()
    )
    assert a == b
    assert a.response_token_ids != c.response_token_ids
    teacher = FakeTeacher()
    run_search(make(chunk_tokens=4, num_candidates=2, max_new_tokens=8, seed=3), teacher, FakeScorer())
    assert len({r.seed for r in teacher.calls}) == 2


def test_beam_width_two_keeps_two_partial_solutions():
    teacher = FakeTeacher()
    traj = run_search(
        make(chunk_tokens=3, num_candidates=3, beam_width=2, max_new_tokens=9), teacher, FakeScorer()
    )
    # step 0 expands the root, later steps expand two beams each
    assert [len([r for r in teacher.calls if f"/s{s}/" in r.key]) for s in range(3)] == [1, 2, 2]
    assert traj.status == "truncated" and len(traj.response_token_ids) == 9
    assert traj.teacher_tokens_generated == (1 + 2 + 2) * 3 * 3


def test_beam_width_two_selects_globally_best_children():
    search = make(chunk_tokens=2, num_candidates=2, beam_width=2, max_new_tokens=6)
    (req,) = search.expand_requests()
    cands = (Candidate((10, 11), "a", "length"), Candidate((1, 2), "b", "length"))
    (sreq,) = search.update_expanded([ExpandResult(req.key, cands)])
    search.update_scored(FakeScorer().score([sreq]))
    reqs = search.expand_requests()
    assert [r.prompt_token_ids[len(PROMPT) :] for r in reqs] == [(1, 2), (10, 11)]
    # second step: beam 0's children are both terrible, beam 1's both good -> both survivors from beam 1
    r0 = ExpandResult(reqs[0].key, (Candidate((40, 41), "x", "length"), Candidate((42, 43), "y", "length")))
    r1 = ExpandResult(reqs[1].key, (Candidate((3, 4), "p", "length"), Candidate((5, 6), "q", "stop")))
    search.update_scored(FakeScorer().score(search.update_expanded([r0, r1])))
    # (5, 6) finished with EOS -> completed hypothesis; (3, 4) stays live
    (last,) = search.expand_requests()
    assert last.prompt_token_ids[len(PROMPT) :] == (10, 11, 3, 4)
    search.update_scored(
        FakeScorer().score(
            search.update_expanded([ExpandResult(last.key, (Candidate((1, 1), "z", "length"),) * 2)])
        )
    )
    traj = search.result()
    assert traj.status == "completed"
    assert traj.response_token_ids == (10, 11, 5, 6)
    assert [c.chosen for c in traj.chunks] == [0, 1]


def test_protocol_misuse_raises():
    search = make()
    with pytest.raises(RuntimeError):
        search.update_scored([])
    search.expand_requests()
    with pytest.raises(ValueError, match="missing"):
        search.update_expanded([])
    with pytest.raises(RuntimeError):
        search.result()


@pytest.mark.parametrize(
    "kw, msg",
    [
        ({"chunk_tokens": 0}, "search.chunk_tokens"),
        ({"num_candidates": 0}, "search.num_candidates"),
        ({"prune_ppl": 0.5}, "search.prune_ppl"),
        ({"selection": "nope"}, "registered"),
        ({"pruning": "nope"}, "registered"),
    ],
)
def test_bad_params(kw, msg):
    with pytest.raises(ValueError, match=msg):
        SearchParams(**kw)


def test_registries_list_options():
    assert get_selector("min_ppl") is not None
    with pytest.raises(ValueError, match="min_cumulative_ppl"):
        get_selector("max_ppl")
    with pytest.raises(ValueError, match="threshold"):
        get_pruner("nope")


def test_core_imports_no_heavy_modules():
    code = (
        "import sys, gen_ssd_ray.core, gen_ssd_ray.engines.fake;"
        "bad=[m for m in ('ray','torch','vllm','transformers','deepspeed','omegaconf') if m in sys.modules];"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
