"""The fault schedule inside simulated engines: when an engine is dead, hung or slow.

`EngineFaults(schedule, target, index, clock)` filters `sim.faults` (gen_ssd_ray.common.config.FaultSpec)
to one engine and answers, at the clock's current simulated time:
- `dead()`: the engine core is gone. Only faults that start after this backend was built count: an
  actor restarted after the fault gets a fresh engine core, as a real restart does.
- `hung()`: the engine stops stepping (calls never return, the actor still answers).
- `slow_factor()`: step times are multiplied by it.
Faults that happen to actors, nodes, managers and the driver are applied from outside by the
harness (gen_ssd_ray.sim.harness), not here.
"""

from __future__ import annotations

from collections.abc import Sequence

from gen_ssd_ray.common.config import FaultSpec
from gen_ssd_ray.sim.profile import SimClock


class EngineFaults:
    def __init__(self, schedule: Sequence[FaultSpec], target: str, index: int, clock: SimClock):
        self.clock = clock
        self.built_at = clock.now()
        self.faults = [f for f in schedule if f.target == target and f.index == index]

    def _active(self, kind: str, now: float) -> list[FaultSpec]:
        return [
            f
            for f in self.faults
            if f.kind == kind and f.at_s <= now and (f.duration_s is None or now < f.at_s + f.duration_s)
        ]

    def dead(self) -> bool:
        now = self.clock.now()
        return any(f.at_s >= self.built_at for f in self._active("dead", now))

    def hung(self) -> bool:
        return bool(self._active("hung", self.clock.now()))

    def slow_factor(self) -> float:
        factor = 1.0
        for f in self._active("slow", self.clock.now()):
            factor *= f.factor
        return factor
