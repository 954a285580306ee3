"""Data-generation methods, registered by name: Gen-SSD and the baselines users compare it with.

A method says two things, and nothing else:
- how the search is run (`search_params`): Gen-SSD expands chunk by chunk with K candidates scored by
  the student; the baselines sample whole solutions (one expansion of `max_new_tokens`, K = 1), which
  the student still scores once, so every row has the same columns (student PPL, costs) whatever the
  method;
- which verified trajectories of a problem it keeps for fine-tuning (`select`, the `selected` column):
  - `gen_ssd` (the paper): every completed, correct trajectory;
  - `standard_kd` (rejection sampling): every completed, correct trajectory of N whole samples;
  - `posthoc_ppl` (post-hoc selection, the MoRSD family): of N whole samples, the one correct
    trajectory with the lowest student perplexity.

Pure: no engine, Ray or torch import. Add a method with `@register_method("name")`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from gen_ssd_ray.core.search import SearchParams


@dataclass(frozen=True)
class Method:
    name: str
    whole_solutions: bool  # one expansion of max_new_tokens per trajectory, K = 1, no pruning
    select: Callable[[Sequence[dict[str, Any]]], list[bool]]
    description: str

    def search_params(self, params: SearchParams) -> SearchParams:
        if not self.whole_solutions:
            return params
        return dataclasses.replace(
            params, chunk_tokens=params.max_new_tokens, num_candidates=1, beam_width=1, prune_ppl=None
        )


METHODS: dict[str, Method] = {}


def register_method(name: str, *, whole_solutions: bool, description: str):
    def deco(fn: Callable[[Sequence[dict[str, Any]]], list[bool]]):
        METHODS[name] = Method(name, whole_solutions, fn, description)
        return fn

    return deco


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {name!r}") from None


def _ok(row: dict[str, Any]) -> bool:
    return row.get("status") == "completed" and row.get("correct") is True


@register_method("gen_ssd", whole_solutions=False, description="generation-time student self-selection")
def _select_all_correct(rows: Sequence[dict[str, Any]]) -> list[bool]:
    return [_ok(r) for r in rows]


register_method(
    "standard_kd", whole_solutions=True, description="whole teacher solutions, the correct ones kept"
)(_select_all_correct)


@register_method(
    "posthoc_ppl",
    whole_solutions=True,
    description="N whole solutions, the correct one with the lowest student PPL kept",
)
def _select_lowest_ppl(rows: Sequence[dict[str, Any]]) -> list[bool]:
    ranked = [
        (r["student_ppl"], r.get("trajectory_index", i), i)
        for i, r in enumerate(rows)
        if _ok(r) and r.get("student_ppl") is not None
    ]
    best = min(ranked)[2] if ranked else None
    return [i == best for i in range(len(rows))]
