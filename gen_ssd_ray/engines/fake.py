"""Deterministic fake engines for unit tests of the search core (no ray/torch/vllm).

FakeTeacher derives every sampled token from a hash of (prefix, seed, sample index), so the same
request always gives the same candidates; a candidate ends with EOS when the hash says so.
FakeScorer gives each token a scripted NLL (`nll_of(token_id)`), so which candidate wins, and when a
branch is pruned, can be computed by hand in a test.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

from gen_ssd_ray.core.types import Candidate, ExpandRequest, ExpandResult, ScoreRequest, ScoreResult

EOS = 0


def _h(*parts: object) -> int:
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "big")


class FakeTeacher:
    """Tokens in 1..vocab-1; each sample stops with probability `eos_prob` per token (by hash)."""

    def __init__(self, vocab: int = 50, eos_prob: float = 0.0):
        self.vocab = vocab
        self.eos_prob = eos_prob
        self.calls: list[ExpandRequest] = []

    def expand(self, requests: Sequence[ExpandRequest]) -> list[ExpandResult]:
        out = []
        for r in requests:
            self.calls.append(r)
            cands = []
            for j in range(r.n):
                ids: list[int] = []
                finish = "length"
                for t in range(r.max_tokens):
                    h = _h(r.prompt_token_ids, r.seed, j, t)
                    if (h % 10_000) / 10_000 < self.eos_prob:
                        ids.append(EOS)
                        finish = "stop"
                        break
                    ids.append(1 + h % (self.vocab - 1))
                cands.append(Candidate(tuple(ids), " ".join(f"t{i}" for i in ids), finish))
            out.append(ExpandResult(r.key, tuple(cands), prompt_tokens=len(r.prompt_token_ids)))
        return out


class FakeScorer:
    """Scores each token by `nll_of(token_id)`; processes only candidate tokens (perfect KV reuse)."""

    def __init__(self, nll_of: Callable[[int], float] = lambda t: t / 10.0):
        self.nll_of = nll_of
        self.calls: list[ScoreRequest] = []

    def score(self, requests: Sequence[ScoreRequest]) -> list[ScoreResult]:
        out = []
        for r in requests:
            self.calls.append(r)
            sums = tuple(sum(self.nll_of(t) for t in c.token_ids) for c in r.candidates)
            lens = tuple(len(c.token_ids) for c in r.candidates)
            out.append(ScoreResult(r.key, sums, lens, tokens_processed=sum(lens)))
        return out


def run_search(search, teacher, scorer):
    """Drive a ProblemSearch to completion synchronously with in-process engines."""
    while not search.done:
        scored = teacher.expand(search.expand_requests())
        search.update_scored(scorer.score(search.update_expanded(scored)))
    return search.result()


class _Done:
    """A finished call's result, shaped like the object ref a beam manager waits on (`future()`)."""

    def __init__(self, value):
        self.value = value

    def future(self):
        import concurrent.futures

        f = concurrent.futures.Future()
        f.set_result(self.value)
        return f


class InProcessActor:
    """An engine actor's `call(method, payload)` over an in-process fake engine: what a beam manager
    (gen_ssd_ray.generate.manager) holds, with no Ray, for unit tests of the managers."""

    def __init__(self, engine):
        self.engine = engine

    def call(self, method, payload=None):
        return _Done(getattr(self.engine, method)(payload) if method in ("expand", "score") else None)
