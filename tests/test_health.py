"""Pool health (gen_ssd_ray.generate.health) on a fake clock: call order, cooldowns, probes."""

from __future__ import annotations

import pytest

from gen_ssd_ray.generate.health import PoolHealth


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock() -> Clock:
    return Clock()


def pool(clock: Clock, size: int = 4) -> PoolHealth:
    return PoolHealth(size, base_s=5.0, max_s=30.0, clock=clock)


def cooldown_of(health: PoolHealth, clock: Clock, i: int) -> float:
    """Seconds until engine i is due for a probe, found by stepping the fake clock (0.5 s steps);
    leaves the clock where it was and the engine unprobed."""
    start = clock.t
    try:
        while True:
            if i in health.due_probes():
                health.probing.discard(i)
                return clock.t - start
            clock.t += 0.5
    finally:
        clock.t = start


def test_order_starts_at_first_and_rotates(clock):
    health = pool(clock)
    assert health.order(0) == [0, 1, 2, 3]
    assert health.order(2) == [2, 3, 0, 1]
    assert health.order(3) == [3, 0, 1, 2]
    assert health.order(6) == [2, 3, 0, 1]  # a pinned index beyond the pool wraps
    assert health.down == [] and all(health.usable(i) for i in range(4))


def test_order_skips_engines_cooling_down(clock):
    health = pool(clock)
    health.failed(3)
    health.failed(0)
    assert health.order(2) == [2, 1]
    assert health.order(3) == [1, 2]  # the pinned engine itself is skipped
    assert health.down == [0, 3] and not health.usable(3) and health.usable(1)


def test_cooldown_doubles_per_consecutive_failure_and_is_capped(clock):
    health = pool(clock)
    expected = [5.0, 10.0, 20.0, 30.0, 30.0]
    for n, seconds in enumerate(expected, start=1):
        health.failed(1)
        assert health.failures[1] == n
        assert cooldown_of(health, clock, 1) == seconds
        assert health.order(1) == [2, 3, 0]


def test_many_failures_stay_at_the_cap(clock):
    health = pool(clock)
    for _ in range(2000):  # a long-flapping engine: 2 ** 1999 seconds would overflow a float
        health.failed(0)
    assert cooldown_of(health, clock, 0) == 30.0


def test_ok_clears_the_record(clock):
    health = pool(clock)
    for _ in range(3):
        health.failed(2)
    health.ok(2)
    assert health.order(2) == [2, 3, 0, 1] and health.down == []
    health.failed(2)  # consecutive failures counted afresh: the base cooldown again
    assert cooldown_of(health, clock, 2) == 5.0
    health.ok(3)  # an engine without a record: nothing to clear
    assert health.order(3) == [3, 0, 1]


def test_a_due_engine_is_probed_once(clock):
    health = pool(clock)
    health.failed(1)
    clock.t += 4.9
    assert health.due_probes() == []
    clock.t += 0.1
    assert health.due_probes() == [1]
    assert health.due_probes() == []  # being probed: not handed out twice
    clock.t += 100
    assert health.due_probes() == []
    assert health.order(0) == [0, 2, 3]  # not used before the probe answers


def test_probe_success_makes_the_engine_usable(clock):
    health = pool(clock)
    health.failed(1)
    health.failed(1)
    clock.t += 10
    assert health.due_probes() == [1]
    health.probed(1, True)
    assert health.usable(1) and health.order(1) == [1, 2, 3, 0] and health.down == []
    assert health.due_probes() == []
    health.failed(1)  # the record was cleared
    assert cooldown_of(health, clock, 1) == 5.0


def test_probe_failure_doubles_the_cooldown(clock):
    health = pool(clock)
    health.failed(1)
    clock.t += 5
    assert health.due_probes() == [1]
    health.probed(1, False)
    assert not health.usable(1) and health.order(1) == [2, 3, 0]
    clock.t += 9.9
    assert health.due_probes() == []
    clock.t += 0.1
    assert health.due_probes() == [1]  # due again, and probed again
    health.probed(1, False)
    assert cooldown_of(health, clock, 1) == 20.0


def test_several_engines_due_at_once(clock):
    health = pool(clock)
    health.failed(0)
    clock.t += 2
    health.failed(2)
    clock.t += 3
    assert health.due_probes() == [0]
    clock.t += 2
    assert health.due_probes() == [2]
    health.probed(2, True)
    health.probed(0, False)
    assert health.order(0) == [1, 2, 3] and health.down == [0]


def test_all_down_gives_an_empty_order(clock):
    health = pool(clock, size=3)
    for i in range(3):
        health.failed(i)
    assert health.order(0) == [] and health.order(2) == [] and health.down == [0, 1, 2]
    clock.t += 5
    assert sorted(health.due_probes()) == [0, 1, 2]
    assert health.order(0) == []  # due, but not probed yet
    health.probed(1, True)
    assert health.order(0) == [1]


def test_disabled_health_tracks_nothing(clock):
    health = PoolHealth(3, base_s=5.0, max_s=30.0, clock=clock, enabled=False)
    for _ in range(3):
        health.failed(1)
    assert health.order(1) == [1, 2, 0] and health.usable(1)
    assert health.down == [] and health.due_probes() == []


def test_next_due_is_the_earliest_cooldown_end(clock):
    health = pool(clock)
    assert health.next_due_s() is None
    health.failed(0)
    health.failed(1)
    health.failed(1)  # 10 s
    assert health.next_due_s() == 5.0
    clock.t += 7.0
    assert health.next_due_s() == 0.0


def test_next_due_leaves_out_engines_being_probed(clock):
    health = pool(clock)
    health.failed(0)
    clock.t += 6.0
    assert health.due_probes() == [0]
    assert health.next_due_s() is None  # its probe decides; nothing else is due
