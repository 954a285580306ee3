"""The one dispatch loop over a pool of workers: least-loaded admission, deadlines, retries, cancels.

`Dispatcher.run(items)` keeps up to `capacity` calls in flight per worker, each new one on the
least-loaded worker, and yields one `Outcome` per item as calls finish:

- a call that returns: `Outcome(item, result)`;
- a call that raises: `is_transient(exc)` decides. An infrastructure failure (a dead actor, a lost
  object) is retried, first in the queue, up to `max_attempts`; a failure of the item itself (bad
  input) is final at once. A call past its deadline is cancelled and counts as transient.
- after the last attempt: `Outcome(item, error=..., transient=...)`; the caller decides (an error row,
  a problem left for a re-run, a failed job).

Setting `stop` ends the loop after the current wait; calls still in flight are abandoned (the caller
owns the workers and shuts them down).

It calls workers only through the `submit`, `wait`, `get` and `cancel` callables, so it knows nothing
about Ray and is unit-tested with plain futures; `ray_calls()` gives the Ray versions.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from gen_ssd_ray.common.errors import reason

log = logging.getLogger("gen_ssd_ray")

T = TypeVar("T")


@dataclass(frozen=True)
class Outcome(Generic[T]):
    item: T
    result: Any = None
    error: str | None = None  # why the last attempt failed; None on success
    transient: bool = False  # the failure was the infrastructure's (retrying later may succeed)
    attempts: int = 1

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class RayCalls:
    wait: Callable[[list, float], list]
    get: Callable[[Any], Any]
    cancel: Callable[[Any], None]


def ray_calls() -> RayCalls:
    """`wait`, `get` and `cancel` over Ray object refs (one ready ref per wait)."""
    import ray

    def wait(refs: list, timeout_s: float) -> list:
        return ray.wait(refs, num_returns=1, timeout=timeout_s)[0]

    return RayCalls(wait, ray.get, ray.cancel)


class Dispatcher(Generic[T]):
    """See the module docstring. `describe(item)` names an item in log lines."""

    def __init__(
        self,
        *,
        num_workers: int,
        capacity: int,
        submit: Callable[[T, int, int], Any],
        wait: Callable[[list, float], list],
        get: Callable[[Any], Any],
        cancel: Callable[[Any], None],
        deadline_s: float,
        max_attempts: int,
        is_transient: Callable[[BaseException], bool] = lambda exc: True,
        describe: Callable[[T], str] = str,
        stop: threading.Event | None = None,
        poll_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        if num_workers < 1 or capacity < 1 or max_attempts < 1:
            raise ValueError("num_workers, capacity and max_attempts must be >= 1")
        self.submit, self.wait, self.get, self.cancel = submit, wait, get, cancel
        self.capacity, self.deadline_s, self.max_attempts = capacity, deadline_s, max_attempts
        self.is_transient, self.describe, self.poll_s, self.clock = is_transient, describe, poll_s, clock
        self.stop = stop or threading.Event()
        self.load = [0] * num_workers
        # handle -> (item, worker, attempt, deadline)
        self.pending: dict[Any, tuple[T, int, int, float]] = {}

    def run(self, items: Iterable[T]) -> Iterator[Outcome[T]]:
        queue: deque[tuple[T, int]] = deque((item, 1) for item in items)
        while (queue or self.pending) and not self.stop.is_set():
            # 1. Fill every worker up to its capacity, the least loaded first.
            while queue and min(self.load) < self.capacity:
                item, attempt = queue.popleft()
                worker = min(range(len(self.load)), key=self.load.__getitem__)
                handle = self.submit(item, worker, attempt)
                self.pending[handle] = (item, worker, attempt, self.clock() + self.deadline_s)
                self.load[worker] += 1
            # 2. Collect what finished, and what missed its deadline.
            ready = self.wait(list(self.pending), self.poll_s) if self.pending else []
            now = self.clock()
            overdue = [h for h, v in self.pending.items() if v[3] < now and h not in ready]
            for handle in [*ready, *overdue]:
                item, worker, attempt, _ = self.pending.pop(handle)
                self.load[worker] -= 1
                if handle in overdue:
                    self.cancel(handle)
                    error, transient = f"no answer within its deadline of {self.deadline_s:g} s", True
                else:
                    try:
                        result = self.get(handle)
                    except Exception as exc:
                        error, transient = reason(exc), self.is_transient(exc)
                    else:
                        yield Outcome(item, result, attempts=attempt)  # the consumer's errors are its own
                        continue
                # 3. Retry an infrastructure failure first, or report the final one.
                if transient and attempt < self.max_attempts:
                    log.warning("%s failed (attempt %d): %s; retrying", self.describe(item), attempt, error)
                    queue.appendleft((item, attempt + 1))
                    continue
                yield Outcome(item, error=error, transient=transient, attempts=attempt)
