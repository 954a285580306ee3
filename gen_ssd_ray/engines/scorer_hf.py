"""The student scorer on transformers: each beam's context KV kept once, score calls of many
trajectories batched into one forward, inside a byte budget.

Per request (one beam of a trajectory and its K candidates):
  1. the cache (gen_ssd_ray.engines.beam_cache) gives the longest cached prefix of the request's
     student context, normally the whole context (the previous step's selected candidate) but its
     last token, whose output predicts the candidates' first tokens;
  2. the context tokens the cache lacks and the K candidates run as one packed row, a tree: every
     candidate attends to the context and to itself only (a 4-D attention mask, explicit positions),
     so the context is never copied K times;
  3. log-probabilities are computed only for the candidates' target tokens, in slices of
     `LOGIT_SLICE` positions (never a `[K, chunk, vocab]` tensor);
  4. the new context KV is added once, on top of the node it continued, and each candidate's KV is
     kept for its own tokens only; the losers are dropped when the trajectory's next call commits.

Batching: `score` queues its requests; one worker thread takes whatever is queued when it is free, up
to `student.batch_tokens` tokens run per forward, and runs them as one right-padded batch (padded past
KV, per-row masks). A caller that stops waiting (a deadline) never interrupts a forward: the worker
finishes it and commits the cache, so the cache is never left half-updated, and the next forward only
starts after it.

Memory: the budget is bytes of KV, `student.kv_cache_gib` on CPU, and on CUDA what
`student.gpu_memory_utilization` of the device leaves after the weights; it covers the cached beams
and each forward's working set (its padded past, new KV, activations, attention mask, one logit
slice; attention scores with eager attention). Trajectories are evicted only when a forward needs
room: those neither being scored nor queued first, the most recently scored first, queued ones only
then, the forward's own never (gen_ssd_ray.engines.beam_cache); a batch that still does not fit is
split. An evicted trajectory's next call recomputes its context. `capacity()` reports the budget so
that admission keeps the live beams inside it.

Knows torch, transformers and the alignment of token ids; knows nothing about the search or Ray.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass

from gen_ssd_ray.core.types import ScoreRequest, ScoreResult
from gen_ssd_ray.engines.alignment import Aligner
from gen_ssd_ray.engines.base import EngineContext, ScorerSpec
from gen_ssd_ray.engines.beam_cache import BeamCache, Hit, Node, forward_kv_tokens, run_fitting

# Positions whose log-probs are computed at once ([LOGIT_SLICE, vocab] floats at a time).
LOGIT_SLICE = 256
# Of the device memory gpu_memory_utilization leaves after the weights, what the budget keeps back for
# the allocator's fragmentation and the model's own buffers.
CUDA_RESERVE = 0.9


@dataclass
class _Item:
    """One request of a queued call, prepared: student rows, cache hit, what it runs."""

    req: ScoreRequest
    context: tuple[int, ...]
    seqs: list[tuple[int, ...]]  # extra + target per candidate
    skip: list[int]  # len(extra) per candidate (not scored)
    hit: Hit
    delta: tuple[int, ...]  # context tokens run (not taken from the cache)

    @property
    def query(self) -> int:
        return len(self.delta) + sum(len(s) for s in self.seqs)


@dataclass
class _Call:
    requests: Sequence[ScoreRequest]
    future: Future
    groups: frozenset[str]
    release: bool = False


class HfScorer:
    """The `hf` scorer backend (see the module docstring). `score` queues and awaits; `score_sync` runs
    the same batched path on the caller's thread (tests, benchmarks)."""

    def __init__(self, spec: ScorerSpec, context: EngineContext | None = None):
        import torch
        from transformers import AutoModelForCausalLM

        student = spec.student
        if student.num_threads:
            torch.set_num_threads(student.num_threads)
        self.torch = torch
        self.device = (
            ("cuda" if torch.cuda.is_available() else "cpu") if spec.device == "auto" else spec.device
        )
        dtype = student.dtype
        if dtype == "auto":
            dtype = "bfloat16" if self.device.startswith("cuda") else "float32"
        self.dtype = getattr(torch, dtype)
        self.batch_tokens = student.batch_tokens
        self.aligner = Aligner.from_models(student.model, spec.teacher_model, student.trust_remote_code)
        self.tok = self.aligner.tok
        self.model = AutoModelForCausalLM.from_pretrained(
            student.model, dtype=self.dtype, trust_remote_code=student.trust_remote_code
        ).to(self.device)
        self.model.eval()
        cfg = self.model.config
        self.max_positions = getattr(cfg, "max_position_embeddings", None)
        self.layers = cfg.num_hidden_layers
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self.heads = cfg.num_attention_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.hidden = cfg.hidden_size
        self.vocab = cfg.vocab_size
        self.elt = torch.tensor([], dtype=self.dtype).element_size()
        self.bytes_per_token = 2 * self.layers * self.kv_heads * self.head_dim * self.elt
        self.budget_bytes = self._budget(student)
        self.cache = BeamCache(self.budget_bytes // self.bytes_per_token)
        self._pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        self._generation = 0
        self._queue: deque[_Call] = deque()
        self._cv = threading.Condition()
        self._closed = False
        self._worker: threading.Thread | None = None
        self.stats = {
            "requests": 0,
            "forwards": 0,
            "tokens_processed": 0,
            "tokens_scored": 0,
            "cache_hit_tokens": 0,
            "evicted_groups": 0,
            "seconds": 0.0,
        }

    def _budget(self, student) -> int:
        """Bytes of KV (cached beams and a forward's working set)."""
        torch = self.torch
        if self.device.startswith("cuda"):
            dev = torch.device(self.device)
            free, total = torch.cuda.mem_get_info(dev)
            used = total - free
            return max(0, int(CUDA_RESERVE * (student.gpu_memory_utilization * total - used)))
        return int(student.kv_cache_gib * 2**30)

    def capacity(self) -> dict[str, int]:
        """What the scorer holds: `kv_tokens` of cached context and working set, and its bytes."""
        return {"kv_tokens": self.cache.budget_tokens, "kv_bytes": self.budget_bytes}

    def cached_tokens(self) -> int:
        return self.cache.tokens

    # ---- queue and worker ----------------------------------------------------------------------
    async def score(self, requests: Sequence[ScoreRequest]) -> list[ScoreResult]:
        """Queue the call; the worker batches it with others and answers (see the module doc)."""
        call = _Call(requests, Future(), frozenset(r.group for r in requests))
        if not self._enqueue(call):
            raise RuntimeError("the scorer was shut down")
        return await asyncio.wrap_future(call.future)

    async def release(self, groups: Sequence[str]) -> None:
        """Drop the trajectories' KV (after the forward in progress, if any)."""
        call = _Call((), Future(), frozenset(groups), release=True)
        if self._enqueue(call):  # (after shutdown there is nothing left to drop)
            await asyncio.wrap_future(call.future)

    def _enqueue(self, call: _Call) -> bool:
        """Queue a call for the worker thread (started on first use); False after shutdown."""
        with self._cv:
            if self._closed:
                return False
            if self._worker is None:
                self._worker = threading.Thread(target=self._serve, name="hf-scorer", daemon=True)
                self._worker.start()
            self._queue.append(call)
            self._cv.notify()
        return True

    def release_sync(self, groups: Sequence[str]) -> None:
        self.cache.release(groups)

    def _serve(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._closed:
                    self._cv.wait()
                if self._closed:
                    return
                calls = self._take()
                pending = {g for c in self._queue for g in c.groups}
            self._run_calls(calls, pending)

    def _take(self) -> list[_Call]:
        """Queued calls for one forward: in order, up to `batch_tokens` candidate tokens (at least one
        call); a release is answered on its own, in its place in the order."""
        first = self._queue.popleft()
        if first.release:
            return [first]
        calls, tokens = [first], _tokens(first)
        while self._queue and not self._queue[0].release:
            n = _tokens(self._queue[0])
            if tokens + n > self.batch_tokens:
                break
            calls.append(self._queue.popleft())
            tokens += n
        return calls

    def _run_calls(self, calls: list[_Call], pending: set[str]) -> None:
        if calls[0].release:
            self.cache.release(calls[0].groups)
            if calls[0].future.set_running_or_notify_cancel():
                calls[0].future.set_result(None)
            return
        live = [c for c in calls if c.future.set_running_or_notify_cancel()]
        if not live:
            return
        try:
            results = self._score_all([r for c in live for r in c.requests], pending)
        except BaseException as e:  # noqa: BLE001 - every caller of this forward gets it
            for c in live:
                c.future.set_exception(e)
            return
        i = 0
        for c in live:
            out = results[i : i + len(c.requests)]
            i += len(c.requests)
            bad = next((r for r in out if isinstance(r, Exception)), None)
            if bad is not None:
                c.future.set_exception(bad)
            else:
                c.future.set_result(out)

    async def check_health(self) -> None:
        """A model in this process is healthy while the process lives."""

    def progress(self) -> int:
        return self.stats["requests"]

    def shutdown(self) -> None:
        with self._cv:
            self._closed = True
            for c in self._queue:
                c.future.cancel()
            self._queue.clear()
            self._cv.notify_all()
        self.cache.release(self.cache.groups())

    # ---- scoring -------------------------------------------------------------------------------
    def score_sync(self, requests: Sequence[ScoreRequest]) -> list[ScoreResult]:
        """Score each request's candidates in batched forwards. Raises ValueError for a request the
        model or the budget cannot hold."""
        out = self._score_all(list(requests), set())
        bad = next((r for r in out if isinstance(r, Exception)), None)
        if bad is not None:
            raise bad
        return out

    def _score_all(self, requests: list[ScoreRequest], pending: set[str]) -> list:
        """Results (or the ValueError of a request that cannot be held) in order, in forwards of at
        most `batch_tokens` tokens run, each inside the budget."""
        t0 = time.perf_counter()
        self._generation += 1
        protect = pending | {r.group for r in requests}
        out: list = [None] * len(requests)
        items: list[tuple[int, _Item]] = []
        for i, r in enumerate(requests):
            try:
                items.append((i, self._prepare(r)))
            except ValueError as e:
                out[i] = e
        # Rows of one forward are padded to its longest query and past: similar rows go together (a
        # miss, which runs its whole context, is not padded against a hit's few tokens).
        items.sort(key=lambda x: (x[1].query, x[1].hit.length))
        batch: list[tuple[int, _Item]] = []
        for i, it in items:
            if batch and sum(b.query for _, b in batch) + it.query > self.batch_tokens:
                self._run_fitting(batch, out, protect)
                batch = []
            batch.append((i, it))
        if batch:
            self._run_fitting(batch, out, protect)
        for group in {r.group for r in requests}:
            self.cache.drop_older(group, self._generation)
        done = [r for r in out if isinstance(r, ScoreResult)]
        self.stats["requests"] += len(done)
        self.stats["tokens_processed"] += sum(r.tokens_processed for r in done)
        self.stats["tokens_scored"] += sum(r.tokens_scored for r in done)
        self.stats["evicted_groups"] = self.cache.evicted_groups
        self.stats["seconds"] += time.perf_counter() - t0
        return out

    def _prepare(self, r: ScoreRequest) -> _Item:
        rows = self.aligner.rows(r)
        ctx = rows.context
        if not ctx:
            raise ValueError("the student context is empty; the student prompt must have at least one token")
        seqs = [e + t for e, t in zip(rows.extras, rows.targets, strict=True)]
        longest = len(ctx) + max((len(s) for s in seqs), default=0)
        if self.max_positions and longest > self.max_positions:
            raise ValueError(
                f"the student sequence has {longest} tokens, more than the student's "
                f"max_position_embeddings={self.max_positions}; lower search.max_new_tokens"
            )
        hit = self.cache.lookup(r.group, ctx)
        return _Item(r, ctx, seqs, [len(e) for e in rows.extras], hit, ctx[hit.length :])

    def _need(self, batch: list[_Item]) -> int:
        """Tokens of budget a forward of `batch` needs on top of what is cached: its padded past and
        new KV, and (in KV-token units) activations, its attention mask, attention scores (eager
        attention only) and one logit slice."""
        rows = len(batch)
        past = max(it.hit.length for it in batch)
        query = max(it.query for it in batch)
        kv = forward_kv_tokens([it.hit.length for it in batch], [it.query for it in batch])
        # one layer's attention scores, materialized only by the eager implementation (sdpa's fused
        # kernels work in blocks)
        eager = getattr(self.model.config, "_attn_implementation", "sdpa") == "eager"
        scores = rows * self.heads * query * (past + query) * 4 if eager else 0
        acts = rows * query * self.hidden * 8 * self.elt
        targets = sum(len(x) - k for it in batch for x, k in zip(it.seqs, it.skip, strict=True))
        logits = min(LOGIT_SLICE, targets) * self.vocab * 8
        masks = rows * query * (past + query) * (self.elt + 1)
        return kv + math.ceil((scores + acts + logits + masks) / self.bytes_per_token)

    def _run_fitting(self, batch: list[tuple[int, _Item]], out: list, protect: set[str]) -> None:
        """Make room for the forward (gen_ssd_ray.engines.beam_cache.make_room); split it when even that
        is not enough; a single request that cannot fit is a ValueError for it alone."""

        def fits(part: list[tuple[int, _Item]]) -> bool:
            items = [it for _, it in part]
            return self.cache.make_room(self._need(items), protect, {it.req.group for it in items})

        def run(part: list[tuple[int, _Item]]) -> None:
            for (i, _), res in zip(part, self._forward_batch([it for _, it in part]), strict=True):
                out[i] = res

        def too_big(one: tuple[int, _Item]) -> None:
            need_gib = self._need([one[1]]) * self.bytes_per_token / 2**30
            out[one[0]] = ValueError(
                f"scoring this request needs {need_gib:.2f} GiB of student KV and working memory "
                f"besides its own cached context; the budget is {self.budget_bytes / 2**30:.2f} GiB "
                "(raise student.kv_cache_gib on CPU or student.gpu_memory_utilization on GPU, or "
                "lower search.max_new_tokens)"
            )

        run_fitting(batch, fits, run, too_big)

    def _gather(self, hit: Hit, length: int):
        """[layers, 2, kv_heads, length, head_dim] of the cached chain (views when it is one node)."""
        parts = [node.kv[:, :, :, :n] for node, n in hit.node.segments(length) if n > 0]
        return parts[0] if len(parts) == 1 else self.torch.cat(parts, dim=3)

    def _forward_batch(self, items: list[_Item]) -> list[ScoreResult]:
        torch = self.torch
        from transformers import DynamicCache

        dev, rows = self.device, len(items)
        past = max(it.hit.length for it in items)
        q = max(it.query for it in items)
        ids = torch.full((rows, q), self._pad, dtype=torch.long)
        pos = torch.zeros((rows, q), dtype=torch.long)
        allowed = torch.zeros((rows, q, past + q), dtype=torch.bool)
        allowed[:, :, past:] = torch.eye(q, dtype=torch.bool)  # every query token sees itself (padding too)
        # per row: where each candidate's tokens start in the query, and which positions predict what
        layouts = []
        for b, it in enumerate(items):
            h, nd = it.hit.length, len(it.delta)
            allowed[b, :, :h] = True
            row = list(it.delta)
            pos[b, :nd] = torch.arange(h, h + nd)
            tri = torch.tril(torch.ones(nd, nd, dtype=torch.bool))
            allowed[b, :nd, past : past + nd] = tri
            starts = []
            for s in it.seqs:
                a, n = len(row), len(s)
                starts.append(a)
                row.extend(s)
                pos[b, a : a + n] = torch.arange(len(it.context), len(it.context) + n)
                allowed[b, a : a + n, past : past + nd] = True
                allowed[b, a : a + n, past + a : past + a + n] = torch.tril(
                    torch.ones(n, n, dtype=torch.bool)
                )
            ids[b, : len(row)] = torch.tensor(row, dtype=torch.long)
            layouts.append(starts)
        mask = torch.zeros((rows, 1, q, past + q), dtype=self.dtype)
        mask.masked_fill_(~allowed[:, None], torch.finfo(self.dtype).min)
        cache, kv = DynamicCache(), None
        if past:
            kv = torch.zeros(
                (self.layers, 2, rows, self.kv_heads, past, self.head_dim), dtype=self.dtype, device=dev
            )
            for b, it in enumerate(items):
                if it.hit.length:
                    kv[:, :, b, :, : it.hit.length] = self._gather(it.hit, it.hit.length)
            cache = DynamicCache(
                ddp_cache_data=[(kv[layer, 0], kv[layer, 1]) for layer in range(self.layers)]
            )
        with torch.inference_mode():
            out = self.model.base_model(
                input_ids=ids.to(dev),
                attention_mask=mask.to(dev),
                position_ids=pos.to(dev),
                past_key_values=cache,
                use_cache=True,
            )
            hidden = out.last_hidden_state
            new = torch.stack(
                [
                    torch.stack((layer.keys[:, :, past:], layer.values[:, :, past:]))
                    for layer in out.past_key_values.layers
                ]
            )  # [layers, 2, rows, kv_heads, q, head_dim]
            del out, cache
            sums = self._target_nll(items, layouts, hidden)
        self.stats["forwards"] += 1
        results = []
        for b, it in enumerate(items):
            shared = kv[:, :, b, :, : it.hit.length] if it.hit.shared else None
            self._commit(it, new[:, :, b], layouts[b], shared)
            self.stats["cache_hit_tokens"] += it.hit.length
            results.append(
                ScoreResult(
                    it.req.key,
                    tuple(sums[b]),
                    tuple(len(s) - k for s, k in zip(it.seqs, it.skip, strict=True)),
                    it.query,
                )
            )
        return results

    def _target_nll(self, items: list[_Item], layouts: list[list[int]], hidden) -> list[list[float]]:
        """Sum of -log p(target) per candidate, from the hidden state before each target token, in
        slices of LOGIT_SLICE positions."""
        torch = self.torch
        where, targets, owner = [], [], []  # (row, position) predicting each target token
        for b, (it, starts) in enumerate(zip(items, layouts, strict=True)):
            last = len(it.delta) - 1  # the context's last token predicts each candidate's first
            for c, (s, a, skip) in enumerate(zip(it.seqs, starts, it.skip, strict=True)):
                for j in range(skip, len(s)):
                    where.append((b, last if j == 0 else a + j - 1))
                    targets.append(s[j])
                    owner.append((b, c))
        sums = [[0.0] * len(it.seqs) for it in items]
        if not where:
            return sums
        head = self.model.get_output_embeddings()
        softcap = getattr(self.model.config, "final_logit_softcapping", None)
        idx = torch.tensor(where, device=hidden.device)
        tgt = torch.tensor(targets, device=hidden.device)
        lps = []
        for a in range(0, len(where), LOGIT_SLICE):
            h = hidden[idx[a : a + LOGIT_SLICE, 0], idx[a : a + LOGIT_SLICE, 1]]
            logits = head(h).float()
            if softcap:
                logits = torch.tanh(logits / softcap) * softcap
            lp = torch.log_softmax(logits, -1).gather(-1, tgt[a : a + LOGIT_SLICE, None])[:, 0]
            lps.append(lp)
        for (b, c), lp in zip(owner, torch.cat(lps).tolist(), strict=True):
            sums[b][c] -= lp
        return sums

    def _commit(self, it: _Item, new, starts: list[int], shared=None) -> None:
        """Keep the context once (the part run, on top of the node it continued; a prefix shared
        with another trajectory copied in front of it) and each candidate's own KV; the group's older
        nodes go (gen_ssd_ray.engines.beam_cache)."""
        nd = len(it.delta)
        if shared is not None:
            kv = self.torch.cat([shared, new[:, :, :, :nd]], dim=3)
            base = Node(it.context, 0, kv, self._generation)
        else:
            base = Node(it.context, it.hit.length, new[:, :, :, :nd].clone(), self._generation, it.hit.node)
        nodes = [base]
        for s, a in zip(it.seqs, starts, strict=True):
            if s:
                nodes.append(
                    Node(
                        it.context + s,
                        len(it.context),
                        new[:, :, :, a : a + len(s)].clone(),
                        self._generation,
                        base,
                    )
                )
        self.cache.commit(it.req.group, nodes)


def _tokens(call: _Call) -> int:
    return sum(len(c.token_ids) for r in call.requests for c in r.candidates)
