"""The `sim` scorer backend: models the `hf` scorer's time, cache and memory, not a model.

What it models (constants from the profile's `scorer` section, gen_ssd_ray.sim.profile):
- The hf scorer's per-trajectory KV cache: after a call, a group (trajectory) keeps each candidate's
  full context (`K x (context + chunk)` tokens); the next call of that group hits when its context is
  one of them, and then processes only the candidates' tokens; a miss re-processes the context once.
  Groups beyond `student.kv_cache_tokens` are evicted least recently used; `release` drops a group.
- Time: one call at a time (the hf scorer's lock), `call_base_s + per_token_s * tokens processed`
  simulated seconds per request.
- Memory: cached tokens plus a call's working set (old cache, expanded copy and new cache: about
  3 x K x (context + chunk) tokens) must fit `memory_tokens`; otherwise the call fails with
  SimOutOfMemory, as a GPU raises torch.OutOfMemoryError (the caller moves the work elsewhere).
- Scores: each candidate's mean NLL per token is drawn from its token ids (deterministic), around
  `nll_mean` with spread `nll_spread`, so selection and `search.prune_ppl` behave as in real runs.
- The fault schedule: dead (EngineDead), hung (never answers), slow.
"""

from __future__ import annotations

import asyncio
import random
from collections import OrderedDict
from collections.abc import Sequence

from gen_ssd_ray.common.config import SimConfig
from gen_ssd_ray.core.types import ScoreRequest, ScoreResult
from gen_ssd_ray.engines.base import EngineContext, EngineDead, ScorerSpec
from gen_ssd_ray.sim.faults import EngineFaults
from gen_ssd_ray.sim.profile import SimClock, load_profile


class SimOutOfMemory(RuntimeError):
    """The simulated device ran out of memory for a call (torch.OutOfMemoryError on a GPU)."""


class SimScorer:
    """See the module docstring."""

    def __init__(self, spec: ScorerSpec, context: EngineContext | None = None):
        context = context or EngineContext()
        sim = context.sim or spec.sim or SimConfig()
        self.profile = load_profile(sim.profile).scorer
        self.clock = SimClock(sim.time_compression, sim.epoch)
        self.model_load = sim.model_load or context.restarted  # a restart reloads the model
        self.faults = EngineFaults(sim.faults, "scorer", context.index, self.clock, context.restarted)
        self.kv_cache_tokens = spec.student.kv_cache_tokens
        # group -> {hash of a candidate's full context: its length}
        self.groups: OrderedDict[str, dict[int, int]] = OrderedDict()
        self.cached = 0
        self.lock = asyncio.Lock()
        self.load_task: asyncio.Task | None = None
        self.stats = {"requests": 0, "tokens_processed": 0, "tokens_scored": 0, "hit_requests": 0, "oom": 0}

    async def check_health(self) -> None:
        if self.faults.dead():
            raise EngineDead("simulated scorer died")
        await self._loaded()

    async def _loaded(self) -> None:
        """The model load, once (a restarted scorer's first call waits for it, as a real one does)."""
        if self.load_task is None:
            seconds = self.profile.load_s if self.model_load else 0.0
            self.load_task = asyncio.get_running_loop().create_task(self.clock.sleep(seconds))
        await asyncio.shield(self.load_task)

    def progress(self) -> int:
        return self.stats["requests"]

    async def release(self, groups: Sequence[str]) -> None:
        for g in groups:
            self._drop(g)

    def shutdown(self) -> None:
        self.groups.clear()
        self.cached = 0

    async def score(self, requests: Sequence[ScoreRequest]) -> list[ScoreResult]:
        self.faults.start()
        await self._loaded()
        async with self.lock:
            out = []
            for r in requests:
                while self.faults.hung():
                    await self.clock.sleep(1.0)
                if self.faults.dead():
                    raise EngineDead("simulated scorer died")
                result, seconds = self._score_one(r)
                await self.clock.work(seconds * self.faults.slow_factor())
                out.append(result)
            return out

    def _score_one(self, r: ScoreRequest) -> tuple[ScoreResult, float]:
        p = self.profile
        context = r.student_prompt_ids + r.prefix_ids
        key = hash(context)
        entries = self.groups.get(r.group)
        hit = entries is not None and entries.get(key) == len(context)
        lens = [len(c.token_ids) for c in r.candidates]
        working = 3 * sum(len(context) + n for n in lens)
        if self.cached + working > p.memory_tokens:
            self.stats["oom"] += 1
            raise SimOutOfMemory(
                f"simulated device out of memory: {self.cached} cached + {working} working tokens "
                f"> {p.memory_tokens} (lower student.kv_cache_tokens or the problems in flight)"
            )
        processed = sum(lens) + (0 if hit else len(context))
        self._drop(r.group)
        self.groups[r.group] = {
            hash(context + c.token_ids): len(context) + n for c, n in zip(r.candidates, lens, strict=True)
        }
        self.cached += sum(self.groups[r.group].values())
        while self.cached > self.kv_cache_tokens and len(self.groups) > 1:
            self._drop(next(iter(self.groups)))
        sums = []
        for c, n in zip(r.candidates, lens, strict=True):
            u = random.Random(hash(c.token_ids)).random()
            sums.append(n * max(0.01, p.nll_mean + p.nll_spread * (2 * u - 1)))
        self.stats["requests"] += 1
        self.stats["hit_requests"] += hit
        self.stats["tokens_processed"] += processed
        self.stats["tokens_scored"] += sum(lens)
        return ScoreResult(
            r.key, tuple(sums), tuple(lens), processed
        ), p.call_base_s + p.per_token_s * processed

    def _drop(self, group: str) -> None:
        entries = self.groups.pop(group, None)
        if entries:
            self.cached -= sum(entries.values())
