"""The search core's decisions, pinned: a digest of every trajectory that a grid of searches with the
fake engines produces (chosen indices, kept tokens, statuses, scores, costs, and every request sent).

The digest was recorded before the shared-job-layer refactor; a refactor that changes any decision,
request or cost changes it. Change it only with a change of the algorithm, and say so in the commit.
Floats enter it rounded to 9 decimals: Python 3.12's `sum()` of floats is compensated, so sums of
log-probabilities differ from 3.11's in their last bits with the same decisions (re-recorded for that,
every decision unchanged).
"""

import hashlib
import json
from dataclasses import asdict

from gen_ssd_ray.core import ProblemSearch, SearchParams
from gen_ssd_ray.engines.fake import FakeScorer, FakeTeacher, run_search

GOLDEN = "a7fb8f28387d37edbc1fd5fdc5b2fdd164e6ca0e516b7090410d47354a04dd99"

GRID = [
    dict(chunk_tokens=4, num_candidates=3, max_new_tokens=12),
    dict(chunk_tokens=3, num_candidates=4, beam_width=2, max_new_tokens=14),
    dict(chunk_tokens=5, num_candidates=2, max_new_tokens=20, prune_ppl=4.0),
    dict(chunk_tokens=2, num_candidates=4, beam_width=3, max_new_tokens=9, prune_ppl=3.0),
    dict(chunk_tokens=20, num_candidates=1, max_new_tokens=20),
]


def _request(r) -> dict:
    # The fields that existed when the digest was recorded (sampling may be added to requests).
    return {k: getattr(r, k) for k in ("key", "prompt_token_ids", "n", "max_tokens", "seed")}


def _trace() -> list:
    out = []
    for i, knobs in enumerate(GRID):
        for eos_prob in (0.0, 0.08):
            for seed in (1, 7):
                teacher, scorer = FakeTeacher(eos_prob=eos_prob), FakeScorer()
                search = ProblemSearch(
                    SearchParams(**knobs), (101, 102, 103 + i), (7, 8), group=f"p{i}/t0", seed=seed
                )
                traj = run_search(search, teacher, scorer)
                out.append(
                    {
                        "traj": asdict(traj),
                        "expand": [_request(r) for r in teacher.calls],
                        "score": [asdict(r) for r in scorer.calls],
                    }
                )
    return out


def _rounded(x):
    if isinstance(x, float):
        return round(x, 9)
    if isinstance(x, dict):
        return {k: _rounded(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_rounded(v) for v in x]
    return x


def digest() -> str:
    blob = json.dumps(_rounded(_trace()), sort_keys=True, default=repr).encode()
    return hashlib.sha256(blob).hexdigest()


def test_fake_engine_decisions_unchanged():
    assert digest() == GOLDEN
