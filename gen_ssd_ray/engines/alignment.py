"""Map a ScoreRequest (teacher token ids + text) to the student's token ids.

When both models share a vocabulary (the common case: a student derived from the teacher's family),
the teacher's ids are used as they are. Otherwise the student re-tokenizes `prefix + candidate` text
and the candidate's span is found by character offsets: a token that straddles the boundary belongs
to the candidate. Rows of one request share the longest common context, so the scorer can run that
context once and the K candidates as a batch on top of it.

Knows tokenizers; knows nothing about models, caches or the search.
"""

from __future__ import annotations

from dataclasses import dataclass

from gen_ssd_ray.core.types import ScoreRequest


@dataclass(frozen=True)
class StudentRows:
    """`context` is scored-free; each row is `extra + target`, NLL counted on `target` only."""

    context: tuple[int, ...]
    extras: tuple[tuple[int, ...], ...]
    targets: tuple[tuple[int, ...], ...]


def same_vocabulary(student_tok, teacher_tok) -> bool:
    return student_tok is teacher_tok or student_tok.get_vocab() == teacher_tok.get_vocab()


class Aligner:
    def __init__(self, student_tok, teacher_tok):
        self.tok = student_tok
        self.shared = same_vocabulary(student_tok, teacher_tok)

    @classmethod
    def from_models(cls, student: str, teacher: str, trust_remote_code: bool = False) -> Aligner:
        """Load both tokenizers (one, when the paths are equal) and build the aligner."""
        from transformers import AutoTokenizer

        student_tok = AutoTokenizer.from_pretrained(student, trust_remote_code=trust_remote_code)
        if teacher == student:
            return cls(student_tok, student_tok)
        return cls(student_tok, AutoTokenizer.from_pretrained(teacher, trust_remote_code=trust_remote_code))

    def rows(self, req: ScoreRequest) -> StudentRows:
        if self.shared:
            return StudentRows(
                req.student_prompt_ids + req.prefix_ids,
                tuple(() for _ in req.candidates),
                tuple(c.token_ids for c in req.candidates),
            )
        b = len(req.prefix_text)
        ctxs, targets = [], []
        for c in req.candidates:
            enc = self.tok(req.prefix_text + c.text, add_special_tokens=False, return_offsets_mapping=True)
            ids, offs = enc["input_ids"], enc["offset_mapping"]
            split = next((i for i, (_, end) in enumerate(offs) if end > b), len(ids))
            target = tuple(ids[split:])
            if c.finished and self.tok.eos_token_id is not None:
                target += (self.tok.eos_token_id,)
            ctxs.append(tuple(ids[:split]))
            targets.append(target)
        common = _common_prefix(ctxs)
        return StudentRows(
            req.student_prompt_ids + common,
            tuple(c[len(common) :] for c in ctxs),
            tuple(targets),
        )


def _common_prefix(seqs: list[tuple[int, ...]]) -> tuple[int, ...]:
    if not seqs:
        return ()
    first = seqs[0]
    n = min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != first[i] for s in seqs[1:]):
            return first[:i]
    return first[:n]
