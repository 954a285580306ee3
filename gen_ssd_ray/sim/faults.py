"""The fault schedule inside simulated engines: when an engine is dead, hung or slow.

`EngineFaults(schedule, target, index, clock, restarted)` filters `sim.faults`
(gen_ssd_ray.common.config.FaultSpec) to one engine and answers, at the current simulated time
(counted from `sim.epoch`, or when null from the engine's first request, `start()`):
- `dead()`: the engine core is gone. An actor that Ray restarted gets a fresh engine with no faults,
  as a real restart does.
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
    def __init__(
        self, schedule: Sequence[FaultSpec], target: str, index: int, clock: SimClock, restarted: bool = False
    ):
        self.clock = clock
        self.t0: float | None = 0.0 if clock.epoch_given else None
        self.faults = [] if restarted else [f for f in schedule if f.target == target and f.index == index]

    def start(self) -> None:
        """The engine's first request: the schedule counts from here when `sim.epoch` is null."""
        if self.t0 is None:
            self.t0 = self.clock.now()

    def _active(self, kind: str, now: float) -> list[FaultSpec]:
        if self.t0 is None:
            return []
        now -= self.t0
        return [
            f
            for f in self.faults
            if f.kind == kind and f.at_s <= now and (f.duration_s is None or now < f.at_s + f.duration_s)
        ]

    def dead(self) -> bool:
        return bool(self._active("dead", self.clock.now()))

    def hung(self) -> bool:
        return bool(self._active("hung", self.clock.now()))

    def slow_factor(self) -> float:
        factor = 1.0
        for f in self._active("slow", self.clock.now()):
            factor *= f.factor
        return factor
