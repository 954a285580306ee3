"""Data that crosses the boundary between the search core and the engines.

Everything here is a frozen dataclass of plain Python values (ints, floats, strings, tuples), so it
pickles cheaply through Ray and can be built by hand in tests. Token ids are always the *teacher's*
ids: the scorer translates to the student's vocabulary itself when the two differ.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ExpandRequest:
    """Ask a teacher engine for `n` continuations of `prompt_token_ids`, sampled with this request's
    own parameters (one engine serves requests with different sampling, as vLLM does).

    `key` identifies the partial solution (node) being expanded; results carry it back.
    """

    key: str
    prompt_token_ids: tuple[int, ...]
    n: int
    max_tokens: int
    seed: int | None = None
    # Required, by keyword: a request never falls back to some engine-wide sampling.
    temperature: float = field(kw_only=True)
    top_p: float = field(kw_only=True)


@dataclass(frozen=True)
class Candidate:
    """One sampled continuation: its teacher token ids, decoded text and why sampling stopped.

    `finish_reason` is "stop" (EOS or a stop string) or "length" (hit `max_tokens`).
    """

    token_ids: tuple[int, ...]
    text: str
    finish_reason: str

    @property
    def finished(self) -> bool:
        return self.finish_reason == "stop"


@dataclass(frozen=True)
class ExpandResult:
    key: str
    candidates: tuple[Candidate, ...]
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0


@dataclass(frozen=True)
class ScoreRequest:
    """Score each candidate's tokens under the student, given the problem and the accepted prefix.

    Args:
        key: the node whose children these candidates are.
        group: all requests of one trajectory share a group; the scorer may keep KV cache per group.
        student_prompt_ids: the problem rendered in the *student's* chat template (student ids).
        prefix_ids / prefix_text: the accepted response so far (teacher ids and their text).
        candidates: the continuations to score.
    """

    key: str
    group: str
    student_prompt_ids: tuple[int, ...]
    prefix_ids: tuple[int, ...]
    prefix_text: str
    candidates: tuple[Candidate, ...]


@dataclass(frozen=True)
class ScoreResult:
    """Per-candidate sum of negative log-likelihood and token count (in the student's tokens).

    `tokens_processed` counts every token the scorer ran through the model for this request
    (prefix tokens it could not take from cache included), so cost can be compared with
    `tokens_scored`.
    """

    key: str
    nll_sums: tuple[float, ...]
    num_tokens: tuple[int, ...]
    tokens_processed: int

    @property
    def tokens_scored(self) -> int:
        return sum(self.num_tokens)

    def ppl(self, i: int) -> float:
        n = self.num_tokens[i]
        return math.exp(self.nll_sums[i] / n) if n else math.inf


@dataclass(frozen=True)
class ScoredCandidate:
    """A candidate together with its student score, as recorded in the output's `chunks` column."""

    text: str
    num_tokens: int
    finish_reason: str
    ppl: float


@dataclass(frozen=True)
class ChunkRecord:
    """One expansion step on the path of a final trajectory: all K candidates and the chosen index.

    `chosen` is -1 when no candidate was kept (the branch was pruned at this step).
    """

    candidates: tuple[ScoredCandidate, ...]
    chosen: int


@dataclass(frozen=True)
class Trajectory:
    """A finished search: one output row's worth of algorithmic results (no I/O fields)."""

    status: str  # completed | pruned | truncated | error
    response_token_ids: tuple[int, ...]
    chunks: tuple[ChunkRecord, ...]
    nll_sum: float
    num_scored_tokens: int
    teacher_tokens_generated: int
    student_tokens_processed: int
    student_tokens_scored: int
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    error: str | None = None
    seed: int | None = None
    extra: dict = field(default_factory=dict)

    @property
    def student_ppl(self) -> float | None:
        if not self.num_scored_tokens:
            return None
        return math.exp(self.nll_sum / self.num_scored_tokens)
