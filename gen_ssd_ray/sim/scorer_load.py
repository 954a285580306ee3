"""Drive one scorer backend with the score calls of many live trajectories, as the beam managers do in
steady state, and measure its cache: tokens processed per token scored, evictions, out-of-memory.

`live` trajectories are in flight at once, at spread-out progress (a long job's steady state: problems
start as others finish), each growing by one `chunk`-token candidate per step up to its length: every
trajectory `context_tokens` (the worst case, `eos_prob` 0), or a length drawn per trajectory from the
profile's EOS rate (geometric, capped at `context_tokens`), as the simulated teacher ends traces. The
figures count only the rounds after `warmup_rounds` (trajectories that join mid-way start with a
cache miss, which a steady state does not have). Each round every live trajectory sends one score call (K candidates) at
once, so the scorer batches them as it batches concurrent calls from beam managers. A trajectory that
reaches its length is released and a new one takes its place. Token ids are distinct per trajectory,
so no cache entry can serve another trajectory by accident.

Used by `make bench` (`scorer/tokens_processed_per_scored_sim512`: the simulated hf scorer on the
H100 profile at 512 live trajectories, 8k contexts, K = 4) and by tests at small sizes.
"""

from __future__ import annotations

import asyncio
import math
import random
from dataclasses import dataclass

from gen_ssd_ray.core.types import Candidate, ScoreRequest


@dataclass(frozen=True)
class ScorerLoad:
    live: int = 512
    context_tokens: int = 8192
    chunk_tokens: int = 256
    num_candidates: int = 4
    prompt_tokens: int = 200
    rounds: int = 64
    warmup_rounds: int = 32
    eos_prob: float = 0.0
    seed: int = 0
    # token ids are taken modulo this (a real model's vocabulary); None: unbounded (simulated scorer)
    vocab_size: int | None = None


class _Trajectory:
    def __init__(self, serial: int, load: ScorerLoad, rng: random.Random, spread: bool):
        self.group = f"t{serial}"
        self.load = load
        self.next_id = serial * 10_000_000
        self.prompt = self._fresh(load.prompt_tokens)
        self.prefix: tuple[int, ...] = ()
        self.step = 0
        self.length = load.context_tokens
        if load.eos_prob > 0:
            self.length = min(self.length, 1 + int(math.log(1 - rng.random()) / math.log(1 - load.eos_prob)))
        self.steps = max(1, -(-self.length // load.chunk_tokens))
        # at the start of the load, trajectories are spread over their progress (a steady state)
        for _ in range(rng.randrange(self.steps) if spread else 0):
            self.prefix += self._fresh(load.chunk_tokens)
            self.step += 1

    def _fresh(self, n: int) -> tuple[int, ...]:
        ids = tuple(range(self.next_id, self.next_id + n))
        self.next_id += n
        if self.load.vocab_size:
            ids = tuple(i % self.load.vocab_size for i in ids)
        return ids

    def request(self) -> ScoreRequest:
        cands = tuple(
            Candidate(self._fresh(self.load.chunk_tokens), "", "length")
            for _ in range(self.load.num_candidates)
        )
        return ScoreRequest(f"{self.group}/{self.step}", self.group, self.prompt, self.prefix, "", cands)

    def accept(self, req: ScoreRequest) -> bool:
        """Take the first candidate; True when the trajectory has reached its length."""
        self.prefix += req.candidates[0].token_ids
        self.step += 1
        return self.step >= self.steps


async def drive(scorer, load: ScorerLoad) -> dict:
    """Run `load` against `scorer` (a ScorerBackend); its stats plus the load's figures. Calls that fail
    (out of memory) are counted, and their trajectories restart."""
    rng = random.Random(load.seed)
    live = [_Trajectory(i, load, rng, spread=True) for i in range(load.live)]
    serial = load.live
    failed = 0
    peak_cached = 0
    start = {}
    for rnd in range(load.warmup_rounds + load.rounds):
        if rnd == load.warmup_rounds:
            start = dict(scorer.stats)
            failed = 0
        reqs = [t.request() for t in live]
        outs = await asyncio.gather(*(scorer.score([r]) for r in reqs), return_exceptions=True)
        done = []
        for i, (t, r, o) in enumerate(zip(live, reqs, outs, strict=True)):
            if isinstance(o, BaseException):
                failed += 1
                done.append(i)
            elif t.accept(r):
                done.append(i)
        peak_cached = max(peak_cached, scorer.cache.tokens)
        for i in done:
            await scorer.release([live[i].group])
            live[i] = _Trajectory(serial, load, rng, spread=False)
            serial += 1
    s = {k: v - start.get(k, 0) for k, v in scorer.stats.items()}
    return {
        "live": load.live,
        "context_tokens": load.context_tokens,
        "num_candidates": load.num_candidates,
        "chunk_tokens": load.chunk_tokens,
        "eos_prob": load.eos_prob,
        "rounds": load.rounds,
        "calls": s["requests"] + failed,
        "failed_calls": failed,
        "forwards": s["forwards"],
        "tokens_processed_per_scored": round(s["tokens_processed"] / max(1, s["tokens_scored"]), 4),
        "evicted_groups": s["evicted_groups"],
        "oom": s.get("oom", 0),
        "peak_cached_tokens": peak_cached,
        "budget_tokens": scorer.cache.budget_tokens,
    }
