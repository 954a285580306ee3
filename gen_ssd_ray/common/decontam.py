"""Decontamination: drop training problems whose text overlaps an evaluation set.

A problem is *contaminated* when it is an exact duplicate of an evaluation problem (the same words after
normalization) or when more than `threshold` of some evaluation problem's word n-grams appear in it.
What this module knows:

- normalization (`words`): NFKC, lowercase, every run of letters or digits is a word, everything else
  (punctuation, whitespace, `$`, `<<...>>` markup) separates words. Numbers are kept as words, so a copy
  with other numbers shares fewer n-grams than a verbatim copy;
- n-grams (`ngrams`): the set of hashes of the text's runs of `n` consecutive words; a text of fewer
  than `n` words is one n-gram (itself), so a short problem can still match exactly;
- the index (`EvalIndex`) of the evaluation problems: n-gram hash -> the evaluation problems holding
  it, each problem's n-gram count, and the hashes of the normalized texts (exact duplicates);
- the overlap of a training text (`EvalIndex.match`): the largest, over evaluation problems e, of the
  fraction of e's n-grams found in the text (the convention of open-instruct's and Cosmopedia's
  decontamination: how much of the benchmark item leaks into the training item). Counting per
  evaluation problem, not against the union of all their n-grams, keeps template phrasing shared by
  many different problems ("how many ... does she have now") from adding up to a false match.

Defaults (`DecontamConfig`): 8-grams and a threshold of 0.5, the setting of Tulu 3's / open-instruct's
decontamination. GSM8K questions are short (median ~45 words), so 13-grams (GPT-3, lm-eval-harness,
written for long documents) would leave a question a handful of n-grams and miss paraphrases; 8 words
are still far longer than shared phrasing. On the shipped data, GSM8K train against test drops 2 of
7,473 problems at 0.5 (the same "travels N miles in 3 hours ... additional hours" problem with other
numbers; the next highest overlap is 0.43, a renamed copy with other numbers, which is kept).

Speed: a text's n-grams are looked up in a hash set first, and only the texts that share one pay for the
per-problem count: 1M training problems against 10k evaluation problems in 18 s on one core here
(56k problems/s; index built in 0.3 s, 351 MB peak with the 1M texts held; scripts/bench_decontam.py). Hashes are Python's string hash (salted per process): the index and the
checks run in one process, so results are the same on every run up to 64-bit hash collisions.

This module does not read datasets itself beyond `load_index` (which names the datasets to index by the
config's `against` entries and reads them with gen_ssd_ray.common.data), and it knows nothing of jobs:
generation drops problems in gen_ssd_ray.common.data.open_problems, fine-tuning drops rows in
gen_ssd_ray.train.data.apply_filters.
"""

from __future__ import annotations

import functools
import logging
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from gen_ssd_ray.common.config import DatasetRef, DecontamConfig

log = logging.getLogger(__name__)

_WORD = re.compile(r"[^\W_]+")
# The label of the fine-tuning filter step that decontamination adds (gen_ssd_ray.train.data); the
# pipeline report finds the step by it.
STEP_PREFIX = "decontaminate"
# Dropped problems shown (at debug level) per check.
_EXAMPLES = 5


def words(text: str) -> list[str]:
    """The normalized words of `text`: NFKC, lowercase, runs of letters and digits."""
    return _WORD.findall(unicodedata.normalize("NFKC", text).lower())


def ngrams(ws: list[str], n: int) -> set[int]:
    """Hashes of the runs of `n` consecutive words; a text of fewer than `n` words (but at least one)
    is one n-gram, itself. No words: no n-grams."""
    if not ws:
        return set()
    if len(ws) <= n:
        return {hash(" ".join(ws))}
    return {hash(" ".join(ws[i : i + n])) for i in range(len(ws) - n + 1)}


@dataclass(frozen=True)
class Match:
    """How a text overlaps the evaluation set: the largest overlap with one evaluation problem (the
    fraction of its n-grams found in the text), which problem that is, and whether the text is an exact
    duplicate of one (same normalized words)."""

    overlap: float
    eval_id: str | None
    exact: bool

    def contaminated(self, threshold: float) -> bool:
        return self.exact or self.overlap > threshold


class EvalIndex:
    """The n-grams of a set of evaluation texts, for checking training texts against them."""

    def __init__(self, texts: Iterable[tuple[str, str]], n: int):
        """`texts`: (id, text) pairs; `n`: words per n-gram."""
        self.n = n
        self.ids: list[str] = []
        self.sizes: list[int] = []
        self.exact: dict[int, int] = {}  # hash of the normalized text -> its problem
        # n-gram -> the one problem holding it (an int), or the list of all of them (a shared phrase)
        self.postings: dict[int, int | list[int]] = {}
        for pid, text in texts:
            ws = words(text)
            grams = ngrams(ws, n)
            if not grams:
                continue
            j = len(self.ids)
            self.ids.append(pid)
            self.sizes.append(len(grams))
            self.exact.setdefault(hash(" ".join(ws)), j)
            for g in grams:
                had = self.postings.get(g)
                if had is None:
                    self.postings[g] = j
                elif isinstance(had, int):
                    self.postings[g] = [had, j]
                else:
                    had.append(j)
        self.keys = self.postings.keys()  # a set view: intersections run in C

    def __len__(self) -> int:
        return len(self.ids)

    def match(self, text: str) -> Match:
        """The overlap of `text` with the closest evaluation problem (see the module docstring)."""
        ws = words(text)
        j = self.exact.get(hash(" ".join(ws)))
        if j is not None and ws:
            return Match(1.0, self.ids[j], True)
        shared = self.keys & ngrams(ws, self.n)
        if not shared:
            return Match(0.0, None, False)
        hits: Counter[int] = Counter()
        for g in shared:
            p = self.postings[g]
            if isinstance(p, int):
                hits[p] += 1
            else:
                hits.update(p)
        best, overlap = max(((k, c / self.sizes[k]) for k, c in hits.items()), key=lambda kv: (kv[1], -kv[0]))
        return Match(overlap, self.ids[best], False)


@dataclass(frozen=True)
class Dropped:
    """What one decontamination check dropped: how many were checked, the dropped ids (problem ids or
    row labels), and a few (id, Match) examples."""

    checked: int
    ids: frozenset[str]
    examples: tuple[tuple[str, Match], ...]

    @property
    def count(self) -> int:
        return len(self.ids)


def describe(cfg: DecontamConfig) -> str:
    """One line naming the check: `decontaminate: 8-gram overlap > 0.5 with embedded:gsm8k/test`."""
    against = ", ".join(ref.label for ref in cfg.against)
    return f"{STEP_PREFIX}: {cfg.ngram}-gram overlap > {cfg.threshold:g} or exact duplicate of {against}"


def active(cfg: DecontamConfig) -> bool:
    """Whether `cfg` checks anything (enabled, with at least one dataset to check against)."""
    return cfg.enabled and bool(cfg.against)


def load_index(cfg: DecontamConfig, key: str = "data.decontaminate") -> EvalIndex:
    """The index of every question of every `cfg.against` dataset (whole sources: no offset or limit),
    built once per process for a given set of datasets and n. Raises DataError naming
    `<key>.against[i]` for a dataset that cannot be read."""
    return _load_index(tuple(cfg.against), cfg.ngram, key)


@functools.lru_cache(maxsize=4)
def _load_index(refs: tuple[DatasetRef, ...], n: int, key: str) -> EvalIndex:
    from gen_ssd_ray.common.data import DataError, open_problems

    def texts():
        for i, ref in enumerate(refs):
            try:
                stream = open_problems(ref.data_config())
                for p in stream:
                    if p.question:
                        yield p.problem_id, p.question
            except DataError as e:
                raise DataError(f"{key}.against[{i}] ({ref.label}): {e}") from None

    index = EvalIndex(texts(), n)
    log.info(
        "decontamination: indexed %d evaluation problems (%d distinct %d-grams) from %s",
        len(index),
        len(index.postings),
        n,
        ", ".join(r.label for r in refs),
    )
    return index


def check(items: Iterable[tuple[str, str | None]], cfg: DecontamConfig, index: EvalIndex) -> Dropped:
    """Check (id, text) pairs against `index`; a pair without text is kept. Logs the count (info) and
    the first few dropped with their closest evaluation problem (debug)."""
    dropped: set[str] = set()
    examples: list[tuple[str, Match]] = []
    checked = 0
    for item_id, text in items:
        checked += 1
        if not text:
            continue
        m = index.match(text)
        if m.contaminated(cfg.threshold):
            dropped.add(item_id)
            if len(examples) < _EXAMPLES:
                examples.append((item_id, m))
    result = Dropped(checked, frozenset(dropped), tuple(examples))
    log_dropped(result.count, checked, cfg, examples, "problems")
    return result


def log_dropped(
    dropped: int, checked: int, cfg: DecontamConfig, examples: Iterable[tuple[str, Match]], what: str
) -> None:
    """Log how many of `checked` were dropped (info) and a few of them with their closest evaluation
    problem (debug)."""
    log.info("%s: dropped %d of %d %s", describe(cfg), dropped, checked, what)
    for item_id, m in examples:
        log.debug(
            "decontamination: dropped %s (%s %s, overlap %.2f)",
            item_id,
            "exact duplicate of" if m.exact else "closest evaluation problem",
            m.eval_id,
            m.overlap,
        )
