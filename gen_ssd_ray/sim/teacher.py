"""The `sim` teacher backend: a continuous-batching engine that models time and memory, not a model.

What it models (constants from the profile, gen_ssd_ray.sim.profile):
- `max_num_seqs` slots (teacher.max_num_seqs) and a KV cache of `kv_capacity_tokens` in blocks of
  `block_size`. A request (n sequences sharing one prompt) is admitted when a slot per sequence and
  the blocks for its prompt plus n * max_tokens are free; otherwise it waits (FIFO), as in vLLM.
- An LRU prefix cache over the blocks of finished sequences (chained block hashes, as vLLM's): the
  full blocks of the tokens whose KV was computed, the prompt and every sampled token but the last
  (which is never fed back). A prompt's leading cached blocks, at most (len - 1) // block_size of
  them, are hits (`cached_prompt_tokens`); the rest are prefilled at `prefill_per_token_s` each. A hit
  block is shared by every running request that has it and cannot be evicted while one holds it; when
  the last one finishes it is free again and evictable, most recent first (tail blocks go before
  leading ones). Cached blocks, shared hits and the blocks running requests hold for new tokens share
  `kv_capacity_tokens`.
- Decode steps of the whole batch: `step_base_s + step_per_seq_s * batch + step_per_ctx_token_s *
  sum(context)` simulated seconds each, run in macro-steps of up to MAX_MACRO_STEPS (arrivals join
  at the next macro-step), slept on the compressed clock (gen_ssd_ray.sim.profile.SimClock).
- Tokens from a seeded generator: candidate j of a request with seed s is the same in every run;
  each token is EOS with probability `eos_prob` (finish "stop"), else the candidate runs to
  `max_tokens` ("length"). Ids are drawn from the model's vocabulary (its config.json); texts are
  empty (no tokenizer is loaded). A prompt longer than `max_model_len - max_tokens` is a ValueError.
- The fault schedule (gen_ssd_ray.sim.faults): a dead engine core raises EngineDead, a hung one stops
  stepping, a slow one steps `factor` times slower.
- Poison problems (`POISON_ENV`, a comma-separated list of problem ids in the environment of the
  engine actors): a request of such a problem (its key starts with "<problem id>/") kills the engine
  core, failing every request on it (EngineDead; the actor then restarts), on every attempt and after
  every restart: a problem that reliably kills its engine, for tests of the driver's poison handling.

- Decoded tokens (`TOKENS_ENV`, a folder in the environment of the engine actors): each engine keeps
  the number of tokens it decoded in its own small file there, rewritten after every macro-step, so
  a benchmark can count the teacher work of a run that was SIGKILLed (scripts/bench_preempt.py).

`stats` records what an engine did, including the wall-clock intervals it sat idle (no request
running or waiting), which the harness sets against the time problems were waiting.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import time
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from gen_ssd_ray.common.config import EngineConfig, SimConfig
from gen_ssd_ray.core.types import Candidate, ExpandRequest, ExpandResult
from gen_ssd_ray.engines.base import EngineContext, EngineDead, Generation, Sample, to_generations
from gen_ssd_ray.sim.faults import EngineFaults
from gen_ssd_ray.sim.profile import SimClock, load_profile

MAX_MACRO_STEPS = 32
POISON_ENV = "GEN_SSD_SIM_POISON"
TOKENS_ENV = "GEN_SSD_SIM_TOKENS_DIR"
FIRST_TOKEN_ID = 100  # sampled ids start here (clear of special tokens)


def model_vocab(model_path: str) -> tuple[int, int]:
    """(eos id, vocab size) from a Hugging Face model folder's config.json."""
    cfg = json.loads((Path(model_path) / "config.json").read_text())
    eos = cfg.get("eos_token_id", 0)
    eos = eos[0] if isinstance(eos, list) else eos
    text = cfg.get("text_config") or {}
    return int(eos if eos is not None else 0), int(cfg.get("vocab_size") or text.get("vocab_size") or 32000)


def block_hashes(ids: Sequence[int], block: int, start: int = 0, prev: int = 0) -> list[int]:
    """Chained hashes of the full blocks of `ids` from block index `start` on (vLLM's prefix keys)."""
    out = []
    for b in range(start, len(ids) // block):
        prev = hash((prev, tuple(ids[b * block : (b + 1) * block])))
        out.append(prev)
    return out


def sample_candidate(seed: int | None, j: int, max_tokens: int, eos: int, vocab: int, eos_prob: float):
    """Candidate j's token ids and finish reason, from the request's seed (deterministic)."""
    rng = random.Random(f"{seed}/{j}")
    length = max_tokens + 1
    if eos_prob > 0:
        u = 1.0 - rng.random()  # (0, 1]
        length = max(1, math.ceil(math.log(u) / math.log1p(-eos_prob))) if eos_prob < 1 else 1
    hi = max(FIRST_TOKEN_ID + 1, vocab)
    if length <= max_tokens:
        return tuple(rng.choices(range(FIRST_TOKEN_ID, hi), k=length - 1)) + (eos,), "stop"
    return tuple(rng.choices(range(FIRST_TOKEN_ID, hi), k=max_tokens)), "length"


@dataclass
class _Request:
    req: ExpandRequest
    future: asyncio.Future
    cands: list[tuple[tuple[int, ...], str]]
    blocks: int = 0  # KV blocks held while running, hits excepted
    hits: list[int] = field(default_factory=list)  # hashes of the cached blocks it shares
    prompt_hashes: list[int] | None = None  # of the prompt's full blocks, once computed
    cached: int = 0
    done_steps: int = 0
    remaining: list[int] = field(default_factory=list)


class SimTeacher:
    """See the module docstring."""

    def __init__(self, cfg: EngineConfig, context: EngineContext | None = None):
        context = context or EngineContext()
        sim = context.sim or SimConfig()
        self.cfg = cfg
        self.profile = load_profile(sim.profile).teacher
        self.clock = SimClock(sim.time_compression, sim.epoch)
        self.model_load = sim.model_load or context.restarted  # a restart reloads the model
        self.faults = EngineFaults(sim.faults, "teacher", context.index, self.clock, context.restarted)
        self.poison = tuple(f"{p}/" for p in os.environ.get(POISON_ENV, "").split(",") if p)
        self.block = cfg.block_size or self.profile.block_size
        self.total_blocks = self.profile.kv_capacity_tokens // self.block
        self.eos, self.vocab = model_vocab(cfg.model)
        self.cache: OrderedDict[int, None] = OrderedDict()  # free blocks that keep their content (LRU)
        self.in_use: dict[int, int] = {}  # cached blocks running requests share -> how many hold each
        self.used_blocks = 0  # blocks running requests hold (shared ones once), not evictable
        self.waiting: deque[_Request] = deque()
        self.running: list[_Request] = []
        self.steps = 0
        self.loaded = asyncio.Event()
        self.wake = asyncio.Event()
        self.loop_task: asyncio.Task | None = None
        self.stats = {
            "steps": 0,
            "sim_busy_s": 0.0,
            "generated_tokens": 0,
            "prompt_tokens": 0,
            "cached_prompt_tokens": 0,
            "idle_intervals": [],  # wall-clock (start, end) with nothing running or waiting
            "peak_running_seqs": 0,
            "idle_since": time.time(),  # wall clock; None while working
        }

    # ---- protocol ------------------------------------------------------------------------------
    async def expand(self, requests: Sequence[ExpandRequest]) -> list[ExpandResult]:
        return list(await asyncio.gather(*(self._submit(r) for r in requests)))

    async def generate(self, requests: Sequence[ExpandRequest]) -> list[Generation]:
        results = await asyncio.gather(*(self._submit(r) for r in requests), return_exceptions=True)
        return to_generations(
            results, lambda r: tuple(Sample(c.token_ids, c.text, c.finish_reason) for c in r.candidates)
        )

    async def reset_prefix_cache(self) -> None:
        self.cache.clear()

    async def check_health(self) -> None:
        self._ensure_loop()
        if self.faults.dead():
            raise EngineDead("simulated engine core died")
        await self.loaded.wait()

    def progress(self) -> int:
        return self.steps

    def capacity(self) -> dict[str, int]:
        return {"kv_tokens": self.total_blocks * self.block, "max_num_seqs": self.cfg.max_num_seqs}

    def shutdown(self) -> None:
        if self.loop_task is not None:
            self.loop_task.cancel()

    # ---- requests ------------------------------------------------------------------------------
    async def _submit(self, r: ExpandRequest) -> ExpandResult:
        if len(r.prompt_token_ids) + r.max_tokens > self.cfg.max_model_len:
            raise ValueError(
                f"prompt of {len(r.prompt_token_ids)} tokens + max_tokens {r.max_tokens} exceeds "
                f"max_model_len {self.cfg.max_model_len}"
            )
        self.faults.start()
        if self.faults.dead():
            raise EngineDead("simulated engine core died")
        if self.poison and r.key.startswith(self.poison):
            died = EngineDead(f"simulated engine core died on request {r.key} ({POISON_ENV})")
            self._fail_all(died)
            raise died
        self._ensure_loop()
        p = self.profile
        cands = [
            sample_candidate(r.seed, j, r.max_tokens, self.eos, self.vocab, p.eos_prob) for j in range(r.n)
        ]
        req = _Request(r, asyncio.get_running_loop().create_future(), cands)
        req.remaining = [len(ids) for ids, _ in cands]
        self.waiting.append(req)
        self.wake.set()
        return await req.future

    def _ensure_loop(self) -> None:
        if self.loop_task is None:
            self.loop_task = asyncio.get_running_loop().create_task(self._loop())

    def _admit(self) -> float:
        """Admit waiting requests that fit; returns the simulated prefill time they cost."""
        prefill = 0.0
        seqs = sum(len(q.cands) for q in self.running)
        while self.waiting:
            q = self.waiting[0]
            if seqs + len(q.cands) > self.cfg.max_num_seqs:
                break
            prompt = q.req.prompt_token_ids
            if q.prompt_hashes is None:
                q.prompt_hashes = block_hashes(prompt, self.block)
            # Leading cached blocks, free or held by running requests; the last token is recomputed.
            hits = []
            for h in q.prompt_hashes[: (len(prompt) - 1) // self.block]:
                if h not in self.cache and h not in self.in_use:
                    break
                hits.append(h)
            shared = sum(1 for h in hits if h in self.in_use)  # already counted in used_blocks
            need = -(-(len(prompt)) // self.block) + len(q.cands) * -(-q.req.max_tokens // self.block)
            if self.used_blocks + need - shared > self.total_blocks and self.running:
                break
            self.waiting.popleft()
            for h in hits:  # a free hit leaves the evictable cache while requests hold it
                if h in self.in_use:
                    self.in_use[h] += 1
                else:
                    del self.cache[h]
                    self.in_use[h] = 1
            q.hits = hits
            q.cached = len(hits) * self.block
            q.blocks = need - len(hits)
            self.used_blocks += need - shared
            self._trim_cache()
            prefill += (len(prompt) - q.cached) * self.profile.prefill_per_token_s
            self.running.append(q)
            seqs += len(q.cands)
        self.stats["peak_running_seqs"] = max(self.stats["peak_running_seqs"], seqs)
        return prefill

    def _trim_cache(self) -> None:
        """Evict free cached blocks, least recently used first, until everything fits."""
        while self.cache and len(self.cache) > self.total_blocks - self.used_blocks:
            self.cache.popitem(last=False)

    def _release(self, q: _Request) -> None:
        """Free the blocks a request held; the hits no other request holds become evictable."""
        self.used_blocks -= q.blocks
        for h in reversed(q.hits):  # tail blocks least recent: evicted first, as in vLLM
            self.in_use[h] -= 1
            if not self.in_use[h]:
                del self.in_use[h]
                self.used_blocks -= 1
                self.cache[h] = None
        q.blocks, q.hits = 0, []

    def _finish(self, q: _Request) -> None:
        self._release(q)
        prompt = q.req.prompt_token_ids
        base = q.prompt_hashes if q.prompt_hashes is not None else block_hashes(prompt, self.block)
        computed = list(base)
        prev = base[-1] if base else 0
        for ids, _ in q.cands:
            # KV was computed for every sampled token but the last one (never fed back).
            computed += block_hashes(prompt + ids[:-1], self.block, start=len(base), prev=prev)
        for h in reversed(computed):  # leading blocks most recent: tails are evicted first
            if h in self.in_use:  # another running request holds it: not free
                continue
            self.cache[h] = None
            self.cache.move_to_end(h)
        self._trim_cache()
        cands = tuple(Candidate(ids, "", finish) for ids, finish in q.cands)
        self.stats["generated_tokens"] += sum(len(ids) for ids, _ in q.cands)
        self.stats["prompt_tokens"] += len(prompt)
        self.stats["cached_prompt_tokens"] += q.cached
        if not q.future.done():
            q.future.set_result(ExpandResult(q.req.key, cands, len(prompt), q.cached))

    def _fail_all(self, exc: BaseException) -> None:
        for q in [*self.running, *self.waiting]:
            if not q.future.done():
                q.future.set_exception(exc)
        for q in self.running:
            self._release(q)
        self.running.clear()
        self.waiting.clear()

    # ---- the engine loop -----------------------------------------------------------------------
    async def _loop(self) -> None:
        p = self.profile
        if self.model_load:
            await self.clock.sleep(p.load_s)
        self.loaded.set()
        while True:
            if self.faults.dead():
                self._fail_all(EngineDead("simulated engine core died"))
                await self.clock.sleep(1.0)
                continue
            if self.faults.hung():
                await self.clock.sleep(1.0)
                continue
            # Drop requests whose caller went away (a cancelled call).
            self.waiting = deque(q for q in self.waiting if not q.future.done())
            prefill = self._admit()
            if not self.running:
                if self.stats["idle_since"] is None:
                    self.stats["idle_since"] = time.time()
                self.wake.clear()
                await self.wake.wait()
                self.clock.cursor = 0.0  # an idle device starts its next work when it arrives
                continue
            if self.stats["idle_since"] is not None:
                self._record_idle(self.stats["idle_since"], time.time())
                self.stats["idle_since"] = None
            batch = sum(sum(1 for r in q.remaining if r > 0) for q in self.running)
            ctx = sum(
                (len(q.req.prompt_token_ids) + q.done_steps) * sum(1 for r in q.remaining if r > 0)
                for q in self.running
            )
            n = min(MAX_MACRO_STEPS, min(r for q in self.running for r in q.remaining if r > 0))
            step = p.step_base_s + p.step_per_seq_s * batch + p.step_per_ctx_token_s * ctx
            sim_s = (
                prefill + n * step + p.step_per_ctx_token_s * batch * n * (n - 1) / 2
            ) * self.faults.slow_factor()
            await self.clock.work(sim_s)
            self._count_decoded(batch * n)
            self.steps += n
            self.stats["steps"] += n
            self.stats["sim_busy_s"] += sim_s
            still = []
            for q in self.running:
                q.done_steps += n
                q.remaining = [max(0, r - n) for r in q.remaining]
                if any(q.remaining) and not q.future.done():
                    still.append(q)
                elif q.future.done():  # cancelled by its caller: free its blocks
                    self._release(q)
                else:
                    self._finish(q)
            self.running = still

    def _count_decoded(self, tokens: int) -> None:
        """Add to the decoded-token count and, with TOKENS_ENV set, rewrite this engine's file."""
        self.decoded = getattr(self, "decoded", 0) + tokens
        folder = os.environ.get(TOKENS_ENV)
        if not folder:
            return
        fd = getattr(self, "_tokens_fd", None)
        if fd is None:
            Path(folder).mkdir(parents=True, exist_ok=True)
            name = Path(folder) / f"teacher-{os.getpid()}-{id(self):x}.txt"
            fd = self._tokens_fd = os.open(name, os.O_WRONLY | os.O_CREAT, 0o644)
        os.pwrite(fd, f"{self.decoded:020d}\n".encode(), 0)

    def _record_idle(self, start: float, end: float) -> None:
        intervals = self.stats["idle_intervals"]
        if len(intervals) < 100_000:
            intervals.append((start, end))
