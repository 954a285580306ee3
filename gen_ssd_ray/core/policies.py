"""Selection and pruning rules, registered by name so configs can pick them.

A selector ranks scored children (candidate continuations of the live beams) and returns the ones to
keep, best first. A pruner decides which children are learnable enough to be kept at all; when it
rejects every child of every live beam, the search ends with status `pruned`.

Add a rule with `@register_selector("name")` / `@register_pruner("name")`; an unknown name raises a
`ValueError` that lists the registered ones.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Child:
    """A scored candidate continuation of one live beam, as the policies see it."""

    parent: int  # index of the parent beam in the live list
    index: int  # candidate index within the parent's expansion
    chunk_nll: float  # sum of the candidate's token NLLs under the student
    chunk_tokens: int
    prefix_nll: float  # the parent's accumulated NLL sum and token count
    prefix_tokens: int

    @property
    def chunk_ppl(self) -> float:
        return math.exp(self.chunk_nll / self.chunk_tokens) if self.chunk_tokens else math.inf

    @property
    def cumulative_ppl(self) -> float:
        n = self.prefix_tokens + self.chunk_tokens
        return math.exp((self.prefix_nll + self.chunk_nll) / n) if n else math.inf


Selector = Callable[[Sequence[Child], int], list[Child]]
Pruner = Callable[[Child, float | None], bool]  # (child, threshold) -> keep?

SELECTION_POLICIES: dict[str, Selector] = {}
PRUNING_POLICIES: dict[str, Pruner] = {}


def register_selector(name: str) -> Callable[[Selector], Selector]:
    def wrap(fn: Selector) -> Selector:
        SELECTION_POLICIES[name] = fn
        return fn

    return wrap


def register_pruner(name: str) -> Callable[[Pruner], Pruner]:
    def wrap(fn: Pruner) -> Pruner:
        PRUNING_POLICIES[name] = fn
        return fn

    return wrap


def _lookup(table: dict, kind: str, name: str):
    try:
        return table[name]
    except KeyError:
        raise ValueError(f"unknown {kind} policy {name!r}; registered: {sorted(table)}") from None


def get_selector(name: str) -> Selector:
    return _lookup(SELECTION_POLICIES, "selection", name)


def get_pruner(name: str) -> Pruner:
    return _lookup(PRUNING_POLICIES, "pruning", name)


@register_selector("min_ppl")
def select_min_chunk_ppl(children: Sequence[Child], width: int) -> list[Child]:
    """Gen-SSD's rule: the candidates the student finds most predictable (lowest chunk PPL)."""
    return sorted(children, key=lambda c: (c.chunk_ppl, c.parent, c.index))[:width]


@register_selector("min_cumulative_ppl")
def select_min_cumulative_ppl(children: Sequence[Child], width: int) -> list[Child]:
    """Rank whole partial solutions (prefix + candidate) by PPL; equals `min_ppl` when width is 1."""
    return sorted(children, key=lambda c: (c.cumulative_ppl, c.parent, c.index))[:width]


@register_pruner("threshold")
def prune_above_threshold(child: Child, threshold: float | None) -> bool:
    """Keep a candidate only if its chunk PPL is at most the threshold (None keeps everything)."""
    return threshold is None or child.chunk_ppl <= threshold


@register_pruner("none")
def prune_nothing(child: Child, threshold: float | None) -> bool:
    return True
