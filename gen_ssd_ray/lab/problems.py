"""Lab task: seeded multi-step arithmetic word problems with gold solutions in several styles.

What this module knows: how to write a problem (a short story about a person and some items, 2 to 3
arithmetic steps chained on one running quantity), its gold answer, and three gold solutions:

- ``concise``: one equation per step (``5 + 3 = 8``), then ``#### <answer>``;
- ``verbose``: each step restated in a sentence before its equation, and a closing sentence;
- ``detour``: the concise solution plus one unnecessary but correct line: a re-check of a step by its
  inverse (``check: 16 / 2 = 8``) or a sum of two numbers from the question that the answer does not need;
- ``shortcut``: a strong reasoner's compressed solution: the first two steps in one line without the
  intermediate result (``( 5 + 3 ) x 2 = 16``), the rest as in ``concise``. A small model cannot learn
  to compute two operations in one token; this is the style a student should not imitate.

Every solution ends with a ``#### <answer>`` line, the GSM8K format that `gen_ssd_ray.core.answers` reads.
Operations are ``+``, ``-``, ``x`` and exact ``/``; every number in a question is at most
`Difficulty.max_operand` (factors and divisors at most `Difficulty.max_factor`) and every intermediate
result lies in ``1..Difficulty.max_result``.

Splits: `generate_split` draws problems from one RNG stream per (seed, split), so the first n rows do not
depend on n. Each distinct question text belongs to exactly one split (a hash of the text decides, not the
seed), so train and test never share a question, whatever the seeds and sizes; questions are unique
within a split.

What it does not know: tokenization (see `gen_ssd_ray.lab.tokenizer`, which builds its vocabulary from
`vocabulary_texts`), prompts and chat templates (the jobs render those), files other than the JSONL
written by `write_jsonl`/`write_lab_sft_jsonl`. Pure Python, no heavy imports.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

# Bump when the generated text changes (templates, word lists, DEFAULT_DIFFICULTY), so that the cached
# embedded:lab files (named after it) are regenerated.
GENERATOR_VERSION = 2
STYLES: tuple[str, ...] = ("concise", "verbose", "detour", "shortcut")
SPLITS: tuple[str, ...] = ("train", "test")
# Share of all possible question texts that belong to the test split (decided by a hash of the text).
TEST_FRACTION = 0.1

NAMES = ("Tom", "Ben", "Sam", "Max", "Leo", "Ana", "Mia", "Zoe", "Lily", "Emma")
ITEMS = ("apples", "pens", "cards", "books", "eggs", "coins", "stickers", "marbles", "shells", "cookies")
# (plural, singular)
CONTAINERS = (("bags", "bag"), ("boxes", "box"), ("packs", "pack"))
OPS = ("+", "-", "x", "/")

# ---- templates: {N} the person, {M} another person, {I} the items, {n}/{a}/{b} numbers ----------
START_HAS = "{N} has {a} {I}."
START_GROUPS = "{N} buys {a} {Cs}. Each {C} has {b} {I}."
ACTIONS: dict[str, tuple[str, ...]] = {
    "+": ("Then {N} buys {n} more.", "Then {M} gives {N} {n} more.", "Then {N} finds {n} more."),
    "-": ("Then {N} gives {n} to {M}.", "Then {N} loses {n} of them.", "Then {N} uses {n} of them."),
    "x": ("Then the number of {I} becomes {n} times as big.",),
    "/": ("Then {N} splits them into {n} equal groups and keeps one group.",),
}
QUESTION = "How many {I} does {N} have now?"
VERBOSE_START_HAS = "{N} starts with {a} {I}."
VERBOSE_START_GROUPS = "{N} buys {a} {Cs} with {b} {I} each, so we multiply."
VERBOSE_STEP: dict[str, str] = {
    "+": "{N} gets {n} more, so we add {n}.",
    "-": "{N} now has {n} fewer, so we subtract {n}.",
    "x": "The number becomes {n} times as big, so we multiply by {n}.",
    "/": "{N} keeps one of {n} equal groups, so we divide by {n}.",
}
VERBOSE_END = "So {N} has {ans} {I} now."
DETOUR_CHECK = "check: {text}"
DETOUR_EXTRA = "not needed: {text}"
INVERSE = {"+": "-", "-": "+", "x": "/", "/": "x"}


@dataclass(frozen=True)
class Difficulty:
    """How hard the arithmetic is. Every field bounds what the generator may write.

    The defaults were chosen by measurement (greedy exact-answer accuracy on 100 test problems of a model
    trained from scratch on 2,000 train problems x 3 styles, loss on the solution only, default prompt):
    operands <= 9, factors <= 3, results <= 40 reach 0.59 with a 2-layer, hidden-128 Llama after 1.26M
    training tokens (about 3 minutes on one CPU core) and 0.93 after 2.5M; operands <= 20, factors <= 5,
    results <= 999 reach only 0.59 after 5M tokens, and operands <= 12, factors <= 4, results <= 60
    reach 0.67 after 2.5M.
    """

    min_steps: int = 2
    max_steps: int = 3
    max_operand: int = 9  # numbers added or subtracted, starting amounts, items per group
    max_factor: int = 3  # multipliers, divisors and group counts: 2..max_factor
    max_result: int = 40  # every intermediate result lies in 1..max_result
    ops: tuple[str, ...] = OPS

    def __post_init__(self) -> None:
        if not 1 <= self.min_steps <= self.max_steps:
            raise ValueError(f"need 1 <= min_steps <= max_steps, got {self.min_steps}, {self.max_steps}")
        if self.max_operand < 2 or self.max_factor < 2 or self.max_result < self.max_operand:
            raise ValueError(f"difficulty bounds too small: {self}")
        if unknown := set(self.ops) - set(OPS):
            raise ValueError(f"unknown ops {sorted(unknown)}; choose from {OPS}")


DEFAULT_DIFFICULTY = Difficulty()


@dataclass(frozen=True)
class Step:
    """One equation: ``left op right = result``."""

    left: int
    op: str
    right: int
    result: int

    def text(self) -> str:
        return f"{self.left} {self.op} {self.right} = {self.result}"

    def inverse_text(self) -> str:
        """The re-check: ``result inv right = left`` (exact for every op the generator writes)."""
        return f"{self.result} {INVERSE[self.op]} {self.right} = {self.left}"


@dataclass(frozen=True)
class Problem:
    question: str
    steps: tuple[Step, ...]
    solutions: dict[str, str]  # style -> solution text ending with "#### <answer>"

    @property
    def answer(self) -> int:
        return self.steps[-1].result


# ---- public API ----------------------------------------------------------------------------------


def generate_split(
    split: str, n: int, seed: int, difficulty: Difficulty = DEFAULT_DIFFICULTY
) -> list[dict[str, str]]:
    """`n` distinct problems of `split` ("train" or "test"), deterministic in (split, n, seed, difficulty).

    Rows: ``id`` (``lab-<split>-<i>``), ``question``, ``answer`` (the concise solution, GSM8K-style),
    ``gold`` (the answer as a string) and ``solution_<style>`` for each of `STYLES`.
    Raises ValueError for an unknown split, or if the difficulty allows too few distinct questions.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
    rng = random.Random(f"gen-ssd-lab/{seed}/{split}")
    seen: set[str] = set()
    rows: list[dict[str, str]] = []
    tries = 0
    while len(rows) < n:
        tries += 1
        if tries > 50 * n + 1000:
            raise ValueError(
                f"found only {len(rows)} distinct {split} problems in {tries} draws; ease {difficulty}"
            )
        problem = make_problem(rng, difficulty)
        if problem.question in seen or split_of(problem.question) != split:
            continue
        seen.add(problem.question)
        rows.append(_row(problem, f"lab-{split}-{len(rows)}"))
    return rows


def split_of(question: str) -> str:
    """The split a question text belongs to: a stable hash of the text, independent of any seed."""
    digest = hashlib.sha256(question.encode()).digest()
    return "test" if int.from_bytes(digest[:4], "big") < TEST_FRACTION * 2**32 else "train"


def write_jsonl(path: Path | str, rows: Iterable[dict]) -> Path:
    """Write `rows` as JSON lines, atomically and durably (`gen_ssd_ray.common.fsio.atomic_writer`)."""
    from gen_ssd_ray.common.fsio import atomic_writer

    path = Path(path)
    with atomic_writer(path) as fh:
        for row in rows:
            fh.write((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))
    return path


def lab_sft_rows(
    split: str, n: int, seed: int, styles: Sequence[str] = STYLES, difficulty: Difficulty = DEFAULT_DIFFICULTY
) -> Iterator[dict[str, str]]:
    """Fine-tuning rows ``{"question", "response", "style"}``: one per problem and style, problem-major."""
    unknown = [s for s in styles if s not in STYLES]
    if unknown or not styles:
        raise ValueError(f"styles must be a non-empty subset of {STYLES}, got {list(styles)}")
    for row in generate_split(split, n, seed, difficulty):
        for style in styles:
            yield {"question": row["question"], "response": row[f"solution_{style}"], "style": style}


def write_lab_sft_jsonl(
    path: Path | str,
    split: str,
    n: int,
    seed: int,
    styles: Sequence[str] = STYLES,
    difficulty: Difficulty = DEFAULT_DIFFICULTY,
) -> Path:
    """`lab_sft_rows` written atomically to `path` as JSON lines. Returns `path`."""
    return write_jsonl(path, lab_sft_rows(split, n, seed, styles, difficulty))


def classify_style(solution: str) -> str:
    """The style a (teacher's or student's) solution is written in, judged from its text: one of `STYLES`.

    The markers are the ones only that style writes: a parenthesized first line (``shortcut``), a
    ``check:``/``not needed:`` line (``detour``), a sentence with ``so we`` (``verbose``); anything else is
    ``concise``. Sampled text may mix styles; the first marker in that order wins."""
    lines = solution.strip().split("\n")
    if lines and lines[0].startswith("( "):
        return "shortcut"
    if any(line.startswith(("check:", "not needed:")) for line in lines):
        return "detour"
    if "so we" in solution:
        return "verbose"
    return "concise"


def vocabulary_texts() -> list[str]:
    """Every fixed piece of text the generator can write (templates without their placeholders, names,
    items, containers, operators). Numbers are not included: they are written digit by digit."""
    templates = [
        START_HAS,
        START_GROUPS,
        *(t for ts in ACTIONS.values() for t in ts),
        QUESTION,
        VERBOSE_START_HAS,
        VERBOSE_START_GROUPS,
        *VERBOSE_STEP.values(),
        VERBOSE_END,
        DETOUR_CHECK,
        DETOUR_EXTRA,
        "#### =",
    ]
    stripped = [re.sub(r"\{\w+\}", " ", t) for t in templates]
    return [*stripped, *NAMES, *ITEMS, *(c for pair in CONTAINERS for c in pair), *OPS, "( )"]


# ---- generation ----------------------------------------------------------------------------------


def make_problem(rng: random.Random, difficulty: Difficulty = DEFAULT_DIFFICULTY) -> Problem:
    """One random problem (its question may belong to either split)."""
    d = difficulty
    name, other = rng.sample(NAMES, 2)
    item = rng.choice(ITEMS)
    n_steps = rng.randint(d.min_steps, d.max_steps)
    fill = {"N": name, "M": other, "I": item}
    sentences: list[str] = []
    steps: list[Step] = []
    if "x" in d.ops and rng.random() < 0.4:  # start with groups: the first step is a product
        cs, c = rng.choice(CONTAINERS)
        a = rng.randint(2, d.max_factor)
        b = rng.randint(2, min(d.max_operand, d.max_result // a))
        steps.append(Step(a, "x", b, a * b))
        sentences.append(START_GROUPS.format(**fill, a=a, b=b, Cs=cs, C=c))
        verbose = [VERBOSE_START_GROUPS.format(**fill, a=a, b=b, Cs=cs), steps[0].text()]
        value = a * b
    else:
        value = rng.randint(2, d.max_operand)
        sentences.append(START_HAS.format(**fill, a=value))
        verbose = [VERBOSE_START_HAS.format(**fill, a=value)]
    while len(steps) < n_steps:
        op, right = _pick_action(rng, value, d)
        step = Step(value, op, right, _apply(value, op, right))
        steps.append(step)
        sentences.append(rng.choice(ACTIONS[op]).format(**fill, n=right))
        verbose += [VERBOSE_STEP[op].format(**fill, n=right), step.text()]
        value = step.result
    sentences.append(QUESTION.format(**fill))
    question = " ".join(sentences)
    final = f"#### {value}"
    concise = [s.text() for s in steps]
    solutions = {
        "concise": "\n".join([*concise, final]),
        "verbose": "\n".join([*verbose, VERBOSE_END.format(**fill, ans=value), final]),
        "detour": "\n".join([*_detour_lines(rng, steps), final]),
        "shortcut": "\n".join([*_shortcut_lines(steps), final]),
    }
    return Problem(question, tuple(steps), solutions)


def _pick_action(rng: random.Random, value: int, d: Difficulty) -> tuple[str, int]:
    """An operation and its operand applicable to `value` within the bounds (+ or - always is)."""
    choices: list[tuple[str, list[int]]] = []
    if "+" in d.ops and value + 1 <= d.max_result:
        choices.append(("+", list(range(1, min(d.max_operand, d.max_result - value) + 1))))
    if "-" in d.ops and value >= 2:
        choices.append(("-", list(range(1, min(d.max_operand, value - 1) + 1))))
    if "x" in d.ops:
        factors = [k for k in range(2, d.max_factor + 1) if value * k <= d.max_result]
        if factors:
            choices.append(("x", factors))
    if "/" in d.ops:
        divisors = [k for k in range(2, d.max_factor + 1) if value % k == 0]
        if divisors:
            choices.append(("/", divisors))
    if not choices:
        raise ValueError(f"no operation applies to {value} under {d}")
    op, operands = rng.choice(choices)
    return op, rng.choice(operands)


def _apply(left: int, op: str, right: int) -> int:
    if op == "+":
        return left + right
    if op == "-":
        return left - right
    if op == "x":
        return left * right
    if op == "/":
        return left // right
    raise ValueError(f"unknown op {op!r}")


def _shortcut_lines(steps: Sequence[Step]) -> list[str]:
    """The first two steps as one parenthesized equation without the intermediate result, then the rest
    (a one-step solution has nothing to merge: it is the concise one)."""
    if len(steps) < 2:
        return [s.text() for s in steps]
    first, second, *rest = steps
    merged = f"( {first.left} {first.op} {first.right} ) {second.op} {second.right} = {second.result}"
    return [merged, *(s.text() for s in rest)]


def _detour_lines(rng: random.Random, steps: Sequence[Step]) -> list[str]:
    """The concise lines plus one unnecessary, correct line: a re-check after a random step, or (before
    the last step) the sum of two operands that the answer does not need."""
    lines = [s.text() for s in steps]
    if rng.random() < 0.5:
        k = rng.randrange(len(steps))
        lines.insert(k + 1, DETOUR_CHECK.format(text=steps[k].inverse_text()))
    else:
        a, b = steps[0].right, steps[-1].right
        extra = f"{a} + {b} = {a + b}"
        lines.insert(len(lines) - 1, DETOUR_EXTRA.format(text=extra))
    return lines


def _row(problem: Problem, pid: str) -> dict[str, str]:
    row = {
        "id": pid,
        "question": problem.question,
        "answer": problem.solutions["concise"],
        "gold": str(problem.answer),
    }
    row.update({f"solution_{style}": problem.solutions[style] for style in STYLES})
    return row
