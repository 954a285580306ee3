"""The student scorer on transformers, reusing the accepted prefix's KV cache across chunks.

Per request (one partial solution and its K candidates) the scorer
  1. finds the longest cached sequence that is a prefix of the request's student context
     (normally the chosen candidate of the previous step, cached when it was scored),
  2. runs only the context tokens the cache lacks (none, when the cache hits exactly),
  3. runs the K candidates as one right-padded batch on top of the shared context KV,
  4. caches every candidate's KV (a view of the batch, cropped to its length) for the next step.
So scoring chunk t costs about K * chunk_tokens new tokens instead of the whole prefix again.

Cache entries are grouped by `ScoreRequest.group` (one trajectory): when a group is scored again its
older entries are dropped (the next step only continues from this step's candidates), `release()`
drops finished groups, and a token budget evicts least-recently-used groups.

Knows torch, transformers and the alignment of token ids; knows nothing about the search or Ray.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from gen_ssd_ray.core.types import ScoreRequest, ScoreResult
from gen_ssd_ray.engines.alignment import Aligner
from gen_ssd_ray.engines.base import EngineContext, ScorerSpec


@dataclass
class _Entry:
    ids: tuple[int, ...]
    kv: list  # per layer (key, value), each [1, heads, len, dim]
    last_logprobs: object  # [vocab] log-probs of the token after `ids`
    generation: int


@dataclass
class _Group:
    entries: dict[tuple[int, ...], _Entry] = field(default_factory=dict)

    @property
    def tokens(self) -> int:
        return sum(len(e.ids) for e in self.entries.values())


class HfScorer:
    """The `hf` scorer backend. `score` and `release` run on one worker thread, in order (the KV cache
    is not thread-safe), so the actor stays responsive; `score_sync` is the same work, synchronously."""

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
        self.kv_cache_tokens = student.kv_cache_tokens
        self.aligner = Aligner.from_models(student.model, spec.teacher_model, student.trust_remote_code)
        self.tok = self.aligner.tok
        self.model = AutoModelForCausalLM.from_pretrained(
            student.model, dtype=getattr(torch, dtype), trust_remote_code=student.trust_remote_code
        ).to(self.device)
        self.model.eval()
        self.max_positions = getattr(self.model.config, "max_position_embeddings", None)
        # Every forward and every cache change runs on this one thread, in submission order: a caller
        # that stops waiting (a deadline, a cancelled call) never leaves a forward running while the
        # next one starts on the same cache.
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf-scorer")
        self._groups: OrderedDict[str, _Group] = OrderedDict()
        self._generation = 0
        self.stats = {
            "requests": 0,
            "tokens_processed": 0,
            "tokens_scored": 0,
            "cache_hit_tokens": 0,
            "seconds": 0.0,
        }

    # ---- cache -------------------------------------------------------------------------------
    def _lookup(self, group: str, context: tuple[int, ...]) -> _Entry | None:
        g = self._groups.get(group)
        if g is None:
            return None
        self._groups.move_to_end(group)
        if (e := g.entries.get(context)) is not None:
            return e
        best = None
        for ids, e in g.entries.items():
            if (
                len(ids) <= len(context)
                and context[: len(ids)] == ids
                and (best is None or len(ids) > len(best.ids))
            ):
                best = e
        return best

    def _store(self, group: str, entry: _Entry) -> None:
        self._groups.setdefault(group, _Group()).entries[entry.ids] = entry
        self._groups.move_to_end(group)

    def _drop_older(self, group: str, generation: int) -> None:
        g = self._groups.get(group)
        if g is not None:
            g.entries = {k: e for k, e in g.entries.items() if e.generation >= generation}

    def _evict(self) -> None:
        total = sum(g.tokens for g in self._groups.values())
        while total > self.kv_cache_tokens and len(self._groups) > 1:
            _, g = self._groups.popitem(last=False)
            total -= g.tokens

    def release_sync(self, groups: Sequence[str]) -> None:
        for g in groups:
            self._groups.pop(g, None)

    async def release(self, groups: Sequence[str]) -> None:
        await asyncio.get_running_loop().run_in_executor(self._worker, self.release_sync, groups)

    def cached_tokens(self) -> int:
        return sum(g.tokens for g in self._groups.values())

    # ---- model -------------------------------------------------------------------------------
    def _forward(self, input_ids, kv, attention_mask=None):
        from transformers import DynamicCache

        cache = DynamicCache(ddp_cache_data=kv) if kv else DynamicCache()
        out = self.model(
            input_ids=input_ids, past_key_values=cache, attention_mask=attention_mask, use_cache=True
        )
        layers = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
        return out.logits, layers

    def _score_one(self, req: ScoreRequest, generation: int) -> ScoreResult:
        torch = self.torch
        rows = self.aligner.rows(req)
        ctx = rows.context
        processed = 0
        entry = self._lookup(req.group, ctx)
        kv, last = (entry.kv, entry.last_logprobs) if entry is not None else ([], None)
        hit = len(entry.ids) if entry is not None else 0
        delta = ctx[hit:]
        if delta:
            logits, kv = self._forward(torch.tensor([delta], device=self.device), kv)
            last = torch.log_softmax(logits[0, -1].float(), -1)
            processed += len(delta)
        if last is None:  # empty context: nothing predicts the first token
            raise ValueError("the student context is empty; the student prompt must have at least one token")
        seqs = [e + t for e, t in zip(rows.extras, rows.targets, strict=True)]
        lens = [len(s) for s in seqs]
        width = max(lens)
        if self.max_positions and len(ctx) + width > self.max_positions:
            raise ValueError(
                f"the student sequence has {len(ctx) + width} tokens, more than the student's "
                f"max_position_embeddings={self.max_positions}; lower search.max_new_tokens"
            )
        k = len(seqs)
        sums = [0.0] * k
        if width:
            pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
            ids = torch.tensor([s + (pad,) * (width - len(s)) for s in seqs], device=self.device)
            mask = torch.zeros((k, len(ctx) + width), dtype=torch.long, device=self.device)
            for i, n in enumerate(lens):
                mask[i, : len(ctx) + n] = 1
            batch_kv = [
                (kk.expand(k, -1, -1, -1).contiguous(), vv.expand(k, -1, -1, -1).contiguous())
                for kk, vv in kv
            ]
            logits, new_kv = self._forward(ids, batch_kv, attention_mask=mask)
            logprobs = torch.log_softmax(logits.float(), -1)
            processed += sum(lens)
            for i, extra in enumerate(rows.extras):
                n = lens[i]
                # token j of row i is predicted by position j-1 (or by the context for j = 0)
                preds = torch.cat([last[None], logprobs[i, : n - 1]], 0) if n else last[None][:0]
                tok = ids[i, :n]
                token_lp = preds.gather(-1, tok[:, None])[:, 0]
                sums[i] = float(-token_lp[len(extra) :].sum())
                end = len(ctx) + n
                self._store(
                    req.group,
                    _Entry(
                        ctx + seqs[i],
                        [(kk[i : i + 1, :, :end], vv[i : i + 1, :, :end]) for kk, vv in new_kv],
                        logprobs[i, n - 1] if n else last,
                        generation,
                    ),
                )
        self.stats["cache_hit_tokens"] += hit
        return ScoreResult(req.key, tuple(sums), tuple(len(t) for t in rows.targets), processed)

    async def score(self, requests: Sequence[ScoreRequest]) -> list[ScoreResult]:
        """`score_sync` on the scorer's one worker thread, one call at a time."""
        return await asyncio.get_running_loop().run_in_executor(self._worker, self.score_sync, requests)

    async def check_health(self) -> None:
        """A model in this process is healthy while the process lives."""

    def progress(self) -> int:
        return self.stats["requests"]

    def shutdown(self) -> None:
        self._worker.shutdown(wait=False, cancel_futures=True)
        self._groups.clear()

    def score_sync(self, requests: Sequence[ScoreRequest]) -> list[ScoreResult]:
        """Score each request's candidates. Raises ValueError for a request the model cannot hold."""
        t0 = time.perf_counter()
        self._generation += 1
        out = []
        with self.torch.inference_mode():
            for r in requests:
                out.append(self._score_one(r, self._generation))
        for g in {r.group for r in requests}:
            self._drop_older(g, self._generation)
        self._evict()
        self.stats["requests"] += len(requests)
        self.stats["tokens_processed"] += sum(r.tokens_processed for r in out)
        self.stats["tokens_scored"] += sum(r.tokens_scored for r in out)
        self.stats["seconds"] += time.perf_counter() - t0
        return out
