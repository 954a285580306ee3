"""Scorer routing (gen_ssd_ray.generate.routing): sticky, every scorer used, bounded load, fallback."""

from __future__ import annotations

import random

import pytest

from gen_ssd_ray.generate.routing import ScorerRouter


def test_a_group_sticks_to_its_scorer_until_released():
    r = ScorerRouter(4)
    first = r.order("p1/t0")
    assert r.order("p1/t0") == first and sorted(first) == [0, 1, 2, 3]
    r.release("p1/t0")
    assert r.load == [0, 0, 0, 0] and r.of == {}


@pytest.mark.parametrize("scorers, live", [(4, 8), (4, 512), (8, 64), (16, 1000)])
def test_every_scorer_gets_a_bounded_share(scorers, live):
    r = ScorerRouter(scorers)
    for i in range(live):
        r.order(f"p{i}/t0")
    cap = -(-int(1.25 * live) // scorers)
    assert max(r.load) <= cap and min(r.load) >= 1
    assert sum(r.load) == live


def test_calls_stay_balanced_under_churn():
    # 2 engines' worth of trajectories over 4 scorers (the old `engine % scorers` left 2 idle)
    rng = random.Random(0)
    r = ScorerRouter(4)
    live: list[str] = []
    calls = [0] * 4
    for step in range(20_000):
        if len(live) < 64 or rng.random() < 0.1:
            live.append(f"g{step}")
        g = rng.choice(live)
        calls[r.order(g)[0]] += 1
        if rng.random() < 0.1:
            live.remove(g)
            r.release(g)
    assert max(calls) / min(calls) <= 1.5


def test_a_down_scorer_moves_its_group_to_the_next_in_its_ranking():
    r = ScorerRouter(3)
    order = r.order("g")
    r.moved("g", order[1])
    assert r.order("g")[0] == order[1] and r.load[order[0]] == 0 and r.load[order[1]] == 1
    assert r.ranking("g") == ScorerRouter(3).ranking("g")  # the same on every manager
