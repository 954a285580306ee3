"""Health of one pool of engines (teacher engines or scorers), as one beam manager sees it.

Contract:
- `order(first)`: the engines to try for a call, `first` (the problem's pinned engine) then the others
  round-robin, leaving out those cooling down after a failure. An empty order means no engine of the
  pool is usable now: the caller fails fast (the driver backs off and retries the problem later)
  instead of sending work that would wait for a deadline.
- `failed(i)`: engine i failed (dead actor, missed deadline, dead engine core). It cools down for
  `base_s * 2**(consecutive failures - 1)`, at most `max_s`: a restarting actor that is not back yet
  is not hammered, and one that is back is used again soon.
- `next_due_s()`: how long until the next cooldown ends (a caller waiting for a pool sleeps that long).
- `due_probes()`: engines whose cooldown ended and that should be probed (a cheap liveness call)
  before real work goes to them again; `probed(i, ok)` records the answer. `ok(i)` after any success
  clears the engine's record.

With `enabled=False` nothing is tracked: every engine is always in the order and a failed one gets
the next call again (the behaviour before pool health, kept for comparison runs).

Pure bookkeeping with an injectable clock: no Ray, no asyncio.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class PoolHealth:
    def __init__(
        self,
        size: int,
        *,
        base_s: float = 5.0,
        max_s: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
        enabled: bool = True,
    ):
        self.size, self.base_s, self.max_s, self.clock = size, base_s, max_s, clock
        self.enabled = enabled
        self.until: dict[int, float] = {}  # engine -> end of its cooldown
        self.failures: dict[int, int] = {}  # engine -> consecutive failures
        self.probing: set[int] = set()

    def usable(self, i: int) -> bool:
        return i not in self.until

    def order(self, first: int) -> list[int]:
        return [j for j in ((first + k) % self.size for k in range(self.size)) if j not in self.until]

    def failed(self, i: int) -> None:
        if not self.enabled:
            return
        n = self.failures.get(i, 0) + 1
        self.failures[i] = n
        # The exponent is bounded: 2 ** (n - 1) overflows a float after ~1000 failures of a flapping engine.
        self.until[i] = self.clock() + min(self.max_s, self.base_s * 2.0 ** min(n - 1, 64))

    def ok(self, i: int) -> None:
        self.until.pop(i, None)
        self.failures.pop(i, None)
        self.probing.discard(i)

    def due_probes(self) -> list[int]:
        now = self.clock()
        due = [i for i, t in self.until.items() if t <= now and i not in self.probing]
        self.probing.update(due)
        return due

    def probed(self, i: int, ok: bool) -> None:
        self.probing.discard(i)
        if ok:
            self.ok(i)
        else:
            self.failed(i)

    def next_due_s(self) -> float | None:
        """Seconds until the next cooldown ends (0 when one has ended and is not being probed), None
        when none is cooling down outside a probe."""
        ends = [t for i, t in self.until.items() if i not in self.probing]
        if not ends:
            return None
        return max(0.0, min(ends) - self.clock())

    @property
    def down(self) -> list[int]:
        return sorted(self.until)
