"""The `sim` scorer backend: models the `hf` scorer's time, cache, batching and memory, not a model.

What it models (constants from the profile's `scorer` section, gen_ssd_ray.sim.profile):
- The hf scorer's cache, with its own bookkeeping (gen_ssd_ray.engines.beam_cache): each beam's
  context once plus its K candidates' own tokens; a call whose context the group holds runs its last
  context token and the candidates, a miss runs the whole context first. The budget is the device's
  `memory_tokens`; a forward makes room by evicting trajectories that are neither being scored nor
  queued, the most recently scored first.
- Batching: calls queue; one forward takes the queued calls up to `student.batch_tokens` candidate
  tokens and costs `call_base_s + per_token_s * tokens processed` simulated seconds.
- Memory: cached tokens plus a forward's KV working set (padded past, new KV) must fit
  `memory_tokens`: other trajectories are evicted (queued ones last, the forward's own never), then
  the batch is split; a request whose own context and forward cannot fit fails with SimOutOfMemory,
  as a GPU raises torch.OutOfMemoryError.
- Scores: each candidate's mean NLL per token is drawn from its token ids (deterministic), around
  `nll_mean` with spread `nll_spread`, so selection and `search.prune_ppl` behave as in real runs.
- The fault schedule: dead (EngineDead), hung (never answers), slow.
"""

from __future__ import annotations

import asyncio
import random
from collections import deque
from collections.abc import Sequence

from gen_ssd_ray.common.config import SimConfig
from gen_ssd_ray.core.types import ScoreRequest, ScoreResult
from gen_ssd_ray.engines.base import EngineContext, EngineDead, ScorerSpec
from gen_ssd_ray.engines.beam_cache import BeamCache, Node, forward_kv_tokens, run_fitting
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
        self.batch_tokens = spec.student.batch_tokens
        self.cache = BeamCache(self.profile.memory_tokens)
        self.generation = 0
        self.queue: deque[tuple[Sequence[ScoreRequest], asyncio.Future]] = deque()
        self.worker: asyncio.Task | None = None
        self.load_task: asyncio.Task | None = None
        self.stats = {
            "requests": 0,
            "forwards": 0,
            "tokens_processed": 0,
            "tokens_scored": 0,
            "hit_requests": 0,
            "evicted_groups": 0,
            "oom": 0,
        }

    def capacity(self) -> dict[str, int]:
        return {"kv_tokens": self.cache.budget_tokens}

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
        self.cache.release(groups)

    def shutdown(self) -> None:
        self.cache.release(self.cache.groups())

    async def score(self, requests: Sequence[ScoreRequest]) -> list[ScoreResult]:
        self.faults.start()
        await self._loaded()
        fut = asyncio.get_running_loop().create_future()
        self.queue.append((requests, fut))
        if self.worker is None or self.worker.done():
            self.worker = asyncio.get_running_loop().create_task(self._serve())
        return await fut

    async def _serve(self) -> None:
        while self.queue:
            calls, tokens = [self.queue.popleft()], 0
            tokens = _tokens(calls[0][0])
            while self.queue and tokens + _tokens(self.queue[0][0]) <= self.batch_tokens:
                calls.append(self.queue.popleft())
                tokens += _tokens(calls[-1][0])
            calls = [c for c in calls if not c[1].done()]  # callers that gave up before it started
            if not calls:
                continue
            try:
                while self.faults.hung():
                    await self.clock.sleep(1.0)
                if self.faults.dead():
                    raise EngineDead("simulated scorer died")
                results, processed = self._forward([r for c, _ in calls for r in c])
                await self.clock.work(
                    (self.profile.call_base_s + self.profile.per_token_s * processed)
                    * self.faults.slow_factor()
                )
            except Exception as e:  # noqa: BLE001 - every caller of this forward gets it
                for _, fut in calls:
                    if not fut.done():
                        fut.set_exception(e)
                continue
            i = 0
            for c, fut in calls:
                mine = results[i : i + len(c)]
                i += len(c)
                bad = next((r for r in mine if isinstance(r, Exception)), None)
                if not fut.done():
                    fut.set_exception(bad) if bad is not None else fut.set_result(mine)

    def _forward(self, requests: list[ScoreRequest]) -> tuple[list, int]:
        """One batched forward's bookkeeping, as the hf scorer does it: make room, split the batch when
        even that is not enough (a request that cannot fit alone gets SimOutOfMemory), commit.
        Returns per-request results (or the error) and the tokens processed."""
        self.generation += 1
        queued = {r.group for c, _ in self.queue for r in c}
        out: list = [None] * len(requests)
        protect = queued | {r.group for r in requests}
        items = []  # (index, request, context, hit, candidate lengths, tokens run)
        for i, r in enumerate(requests):
            ctx = r.student_prompt_ids + r.prefix_ids
            hit = self.cache.lookup(r.group, ctx)
            lens = [len(c.token_ids) for c in r.candidates]
            items.append((i, r, ctx, hit, lens, len(ctx) - hit.length + sum(lens)))
        processed = [0]

        def need(part) -> int:
            return forward_kv_tokens([it[3].length for it in part], [it[5] for it in part])

        def fits(part) -> bool:
            return self.cache.make_room(need(part), protect, {it[1].group for it in part})

        def run(part) -> None:
            processed[0] += self._commit(part, out)

        def too_big(it) -> None:
            self.stats["oom"] += 1
            out[it[0]] = SimOutOfMemory(
                f"simulated device out of memory: the request's cached context ({it[3].length} "
                f"tokens) + {need([it])} for its forward > {self.profile.memory_tokens} (shorter "
                "contexts: lower search.max_new_tokens)"
            )

        run_fitting(items, fits, run, too_big)
        for g in {r.group for r in requests}:
            self.cache.drop_older(g, self.generation)
        self.stats["evicted_groups"] = self.cache.evicted_groups
        self.stats["forwards"] += 1
        return out, processed[0]

    def _commit(self, part: list[tuple], out: list) -> int:
        """A forward that fits: its nodes, its results; returns the tokens it processed."""
        p = self.profile
        for i, r, ctx, hit, n, q in part:
            # a prefix shared with another trajectory is copied into this one's first node
            base = (
                Node(ctx, 0, None, self.generation)
                if hit.shared
                else Node(ctx, hit.length, None, self.generation, hit.node)
            )
            suffixes = [
                Node(ctx + c.token_ids, len(ctx), None, self.generation, base)
                for c in r.candidates
                if c.token_ids
            ]
            self.cache.commit(r.group, [base, *suffixes])
            sums = []
            for c, k in zip(r.candidates, n, strict=True):
                u = random.Random(hash(c.token_ids)).random()
                sums.append(k * max(0.01, p.nll_mean + p.nll_spread * (2 * u - 1)))
            self.stats["hit_requests"] += hit.length > 0
            self.stats["requests"] += 1
            self.stats["tokens_processed"] += q
            self.stats["tokens_scored"] += sum(n)
            out[i] = ScoreResult(r.key, tuple(sums), tuple(n), q)
        return sum(it[5] for it in part)


def _tokens(requests: Sequence[ScoreRequest]) -> int:
    return sum(len(c.token_ids) for r in requests for c in r.candidates)
