"""The per-problem Gen-SSD search as a decide / execute / update state machine.

`ProblemSearch` knows token ids, scores and the search rules. It never calls an engine: the owner
(a BeamManager actor, or a test with fake engines) loops

    while not search.done:
        results = run_on_teacher(search.expand_requests())
        scores = run_on_scorer(search.update_expanded(results))
        search.update_scored(scores)

and finally reads `search.result()`. It knows nothing about tokenizers, templates, Ray or output
files. One instance is one trajectory; trajectories of the same problem are separate instances with
different seeds.

Resume: every completed step is also a `StepLog` (the step's scored candidates, the kept children with
their token ids and scores, and the cost counters after it), which the owner collects with `take_log()`
and may persist (gen_ssd_ray.generate.journal). `replay(logs)` on a fresh instance rebuilds the exact
state after those steps without any engine call; per-request seeds are a pure function of (trajectory
seed, step, beam), so the steps that follow sample what an uninterrupted run would.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from gen_ssd_ray.core.policies import Child, get_pruner, get_selector
from gen_ssd_ray.core.types import (
    Candidate,
    ChunkRecord,
    ExpandRequest,
    ExpandResult,
    ScoredCandidate,
    ScoreRequest,
    ScoreResult,
    Trajectory,
)

_SEED_MOD = 2**31 - 1


@dataclass(frozen=True)
class Kept:
    """A child kept at a step: candidate `index` of live beam `parent`, its token ids and student score."""

    parent: int
    index: int
    token_ids: tuple[int, ...]
    chunk_nll: float
    chunk_tokens: int


@dataclass(frozen=True)
class StepLog:
    """One completed step of a trajectory, enough to redo its state change without the engines.

    `records[b]`: live beam b's scored candidates (its `ChunkRecord`'s candidates); `kept`: the children
    kept, in selection order (empty: the search was pruned, ending at beam `pruned_beam`); `counters`:
    the trajectory's cost counters after the step (teacher tokens, student tokens processed and scored,
    teacher prompt tokens and cached prompt tokens)."""

    step: int
    records: tuple[tuple[ScoredCandidate, ...], ...]
    kept: tuple[Kept, ...]
    pruned_beam: int
    counters: tuple[int, int, int, int, int]

    @property
    def teacher_tokens(self) -> int:
        return self.counters[0]

    def to_dict(self) -> dict:
        """Plain JSON-able values (floats round-trip exactly through Python's json)."""
        return {
            "step": self.step,
            "records": [
                [[c.text, c.num_tokens, c.finish_reason, c.ppl] for c in rec] for rec in self.records
            ],
            "kept": [[k.parent, k.index, list(k.token_ids), k.chunk_nll, k.chunk_tokens] for k in self.kept],
            "pruned_beam": self.pruned_beam,
            "counters": list(self.counters),
        }

    @classmethod
    def from_dict(cls, d: dict) -> StepLog:
        return cls(
            step=int(d["step"]),
            records=tuple(
                tuple(ScoredCandidate(str(t), int(n), str(f), float(p)) for t, n, f, p in rec)
                for rec in d["records"]
            ),
            kept=tuple(
                Kept(int(a), int(i), tuple(int(x) for x in ids), float(nll), int(n))
                for a, i, ids, nll, n in d["kept"]
            ),
            pruned_beam=int(d["pruned_beam"]),
            counters=tuple(int(x) for x in d["counters"]),  # type: ignore[arg-type]
        )


@dataclass(frozen=True)
class SearchParams:
    """The search knobs: one definition, which the generation job's `search` config section extends
    (gen_ssd_ray.generate.config.SearchConfig); plain values, so the core stays pure."""

    # Tokens per chunk: the teacher extends each partial solution by this many tokens (or to EOS).
    chunk_tokens: int = 64
    # K: candidates sampled per expansion (one request with n=K).
    num_candidates: int = 4
    # B: partial solutions that survive each step.
    beam_width: int = 1
    # Response token budget; a trajectory that reaches it ends as "truncated".
    max_new_tokens: int = 512
    # A candidate with chunk PPL above this is not learnable; if all are, the branch is pruned (null: off).
    prune_ppl: float | None = None
    # Which candidate survives: a registered selection policy (gen_ssd_ray.core.policies).
    selection: str = "min_ppl"
    # When a branch is cut: a registered pruning policy (gen_ssd_ray.core.policies).
    pruning: str = "threshold"
    # Sampling temperature of every expansion (carried by each ExpandRequest).
    temperature: float = 0.8
    # Nucleus sampling: the smallest token set whose probability reaches top_p (1.0: off).
    top_p: float = 0.95

    def __post_init__(self) -> None:
        for name in ("chunk_tokens", "num_candidates", "beam_width", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"search.{name} must be >= 1, got {getattr(self, name)}")
        if self.prune_ppl is not None and self.prune_ppl <= 1.0:
            raise ValueError(f"search.prune_ppl must be > 1 (a perplexity) or null, got {self.prune_ppl}")
        get_selector(self.selection)
        get_pruner(self.pruning)


@dataclass(frozen=True)
class _Node:
    """A partial solution: the accepted response so far and its accumulated student score."""

    ids: tuple[int, ...]
    text: str
    nll_sum: float
    num_scored: int
    chunks: tuple[ChunkRecord, ...]
    status: str = "live"  # live | completed | truncated


class ProblemSearch:
    """Chunked generation with student self-selection for one trajectory of one problem."""

    def __init__(
        self,
        params: SearchParams,
        prompt_ids: Sequence[int],
        student_prompt_ids: Sequence[int],
        group: str,
        seed: int | None = None,
    ) -> None:
        self.params = params
        self.prompt_ids = tuple(prompt_ids)
        self.student_prompt_ids = tuple(student_prompt_ids)
        self.group = group
        self.seed = seed
        self._select = get_selector(params.selection)
        self._keep = get_pruner(params.pruning)
        self.step = 0
        self._live: list[_Node] = [_Node((), "", 0.0, 0, ())]
        self._finished: list[_Node] = []
        self._pruned: _Node | None = None
        self._expanded: list[tuple[Candidate, ...]] | None = None
        # cost accounting
        self.teacher_tokens = 0
        self.student_processed = 0
        self.student_scored = 0
        self.prompt_tokens = 0
        self.cached_prompt_tokens = 0
        self._log: list[StepLog] = []  # completed steps not yet taken by the owner (`take_log`)

    # ---- state -------------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return not self._live

    def _key(self, beam: int) -> str:
        return f"{self.group}/s{self.step}/b{beam}"

    def _seed(self, beam: int) -> int | None:
        """A per-request seed from (trajectory seed, step, beam), hashed: vLLM seeds the K samples of
        a request with seed + j, so neighbouring seeds must not be used by other beams or steps."""
        if self.seed is None:
            return None
        h = hashlib.blake2b(f"{self.seed}/{self.step}/{beam}".encode(), digest_size=8).digest()
        return int.from_bytes(h, "big") % _SEED_MOD

    # ---- decide ------------------------------------------------------------------------------
    def expand_requests(self) -> list[ExpandRequest]:
        """One request per live beam: K samples of up to `chunk_tokens` from the accepted prefix."""
        if self.done or self._expanded is not None:
            raise RuntimeError("expand_requests() called out of order")
        p = self.params
        return [
            ExpandRequest(
                key=self._key(b),
                prompt_token_ids=self.prompt_ids + node.ids,
                n=p.num_candidates,
                max_tokens=min(p.chunk_tokens, p.max_new_tokens - len(node.ids)),
                seed=self._seed(b),
                temperature=p.temperature,
                top_p=p.top_p,
            )
            for b, node in enumerate(self._live)
        ]

    # ---- update (teacher) --------------------------------------------------------------------
    def update_expanded(self, results: Sequence[ExpandResult]) -> list[ScoreRequest]:
        """Record the teacher's candidates; return the scoring requests for them."""
        by_key = {r.key: r for r in results}
        expanded = []
        for b in range(len(self._live)):
            r = by_key.get(self._key(b))
            if r is None or not r.candidates:
                raise ValueError(f"missing or empty expansion for {self._key(b)}")
            expanded.append(r.candidates)
            self.teacher_tokens += sum(len(c.token_ids) for c in r.candidates)
            self.prompt_tokens += r.prompt_tokens
            self.cached_prompt_tokens += r.cached_prompt_tokens
        self._expanded = expanded
        return [
            ScoreRequest(
                key=self._key(b),
                group=self.group,
                student_prompt_ids=self.student_prompt_ids,
                prefix_ids=node.ids,
                prefix_text=node.text,
                candidates=cands,
            )
            for b, (node, cands) in enumerate(zip(self._live, expanded, strict=True))
        ]

    # ---- update (student) --------------------------------------------------------------------
    def update_scored(self, results: Sequence[ScoreResult]) -> None:
        """Select, prune and finish beams from the student's scores; advance one step."""
        if self._expanded is None:
            raise RuntimeError("update_scored() called before update_expanded()")
        by_key = {r.key: r for r in results}
        children: list[Child] = []
        records: list[tuple[ScoredCandidate, ...]] = []
        for b, (node, cands) in enumerate(zip(self._live, self._expanded, strict=True)):
            r = by_key.get(self._key(b))
            if r is None or len(r.nll_sums) != len(cands):
                raise ValueError(f"missing or malformed score for {self._key(b)}")
            self.student_processed += r.tokens_processed
            self.student_scored += r.tokens_scored
            records.append(
                tuple(
                    ScoredCandidate(c.text, len(c.token_ids), c.finish_reason, r.ppl(i))
                    for i, c in enumerate(cands)
                )
            )
            children.extend(
                Child(b, i, r.nll_sums[i], r.num_tokens[i], node.nll_sum, node.num_scored)
                for i in range(len(cands))
            )

        eligible = [c for c in children if self._keep(c, self.params.prune_ppl)]
        slots = self.params.beam_width - len(self._finished)
        chosen = self._select(eligible, slots) if eligible else []
        pruned_beam = -1
        if not chosen:
            # Nothing learnable: the branch ends at the best parent, recorded with chosen = -1.
            pruned_beam = min(
                range(len(self._live)), key=lambda b: self._live[b].nll_sum / max(1, self._live[b].num_scored)
            )
        kept = tuple(
            Kept(c.parent, c.index, self._expanded[c.parent][c.index].token_ids, c.chunk_nll, c.chunk_tokens)
            for c in chosen
        )
        counters = (
            self.teacher_tokens,
            self.student_processed,
            self.student_scored,
            self.prompt_tokens,
            self.cached_prompt_tokens,
        )
        log = StepLog(self.step, tuple(records), kept, pruned_beam, counters)
        self._apply(log)
        self._log.append(log)

    def _apply(self, log: StepLog) -> None:
        """The state change of one step (the one place it happens: a live step and a replay alike)."""
        if not log.kept:
            node = self._live[log.pruned_beam]
            self._pruned = _Node(
                node.ids,
                node.text,
                node.nll_sum,
                node.num_scored,
                node.chunks + (ChunkRecord(log.records[log.pruned_beam], -1),),
                "pruned",
            )
            self._live = []
        else:
            new_live = []
            for k in log.kept:
                parent = self._live[k.parent]
                cand = log.records[k.parent][k.index]
                ids = parent.ids + k.token_ids
                status = (
                    "completed"
                    if cand.finish_reason == "stop"
                    else "truncated"
                    if len(ids) >= self.params.max_new_tokens
                    else "live"
                )
                child = _Node(
                    ids,
                    parent.text + cand.text,
                    parent.nll_sum + k.chunk_nll,
                    parent.num_scored + k.chunk_tokens,
                    parent.chunks + (ChunkRecord(log.records[k.parent], k.index),),
                    status,
                )
                (new_live if status == "live" else self._finished).append(child)
            self._live = new_live
        (
            self.teacher_tokens,
            self.student_processed,
            self.student_scored,
            self.prompt_tokens,
            self.cached_prompt_tokens,
        ) = log.counters
        self._expanded = None
        self.step = log.step + 1

    # ---- resume ------------------------------------------------------------------------------
    def take_log(self) -> list[StepLog]:
        """The steps completed since the last call (for a journal), oldest first."""
        out, self._log = self._log, []
        return out

    def replay(self, logs: Sequence[StepLog]) -> None:
        """Redo journaled steps 0, 1, ... on a fresh search: its state (beams, chunks, counters, the
        step and so the next seeds) becomes that after the last one. Raises ValueError if the steps are
        not consecutive from this search's step or do not fit its beams (the caller starts afresh)."""
        if self._expanded is not None:
            raise RuntimeError("replay() called in the middle of a step")
        for log in logs:
            if log.step != self.step or self.done:
                raise ValueError(f"journaled step {log.step} does not follow step {self.step - 1}")
            if len(log.records) != len(self._live) or (
                not log.kept and not 0 <= log.pruned_beam < len(self._live)
            ):
                raise ValueError(f"journaled step {log.step} does not match the live beams")
            for k in log.kept:
                if not (0 <= k.parent < len(self._live) and 0 <= k.index < len(log.records[k.parent])):
                    raise ValueError(f"journaled step {log.step} keeps an unknown candidate")
            self._apply(log)

    # ---- result ------------------------------------------------------------------------------
    def result(self) -> Trajectory:
        """The best finished hypothesis (completed before truncated, then lowest PPL), else the pruned one."""
        if not self.done:
            raise RuntimeError("result() called before the search finished")
        if self._finished:
            node = min(
                self._finished,
                key=lambda n: (n.status != "completed", n.nll_sum / max(1, n.num_scored)),
            )
        else:
            node = self._pruned
        assert node is not None
        return Trajectory(
            status=node.status,
            response_token_ids=node.ids,
            chunks=node.chunks,
            nll_sum=node.nll_sum,
            num_scored_tokens=node.num_scored,
            teacher_tokens_generated=self.teacher_tokens,
            student_tokens_processed=self.student_processed,
            student_tokens_scored=self.student_scored,
            prompt_tokens=self.prompt_tokens,
            cached_prompt_tokens=self.cached_prompt_tokens,
            seed=self.seed,
        )
