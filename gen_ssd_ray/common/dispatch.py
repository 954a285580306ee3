"""The one dispatch loop over a pool of workers: least-loaded admission, deadlines, retries with
backoff, cancels; O(log n) work per result whatever is in flight, on an input read lazily.

`Dispatcher.run(items)` keeps up to `capacity` calls in flight per worker, each new one on the
least-loaded worker, and yields one `Outcome` per item as calls finish:

- `items` is any iterable, read one item at a time and only when a worker has room and no retry is
  due (due retries go first). What the loop holds is what is in flight plus what waits for a retry,
  so a caller can stream a million items.
- a call that returns: `Outcome(item, result)`;
- a call that raises: `is_transient(exc)` decides. A failure of the item itself (bad input) is final
  at once. An infrastructure failure (a dead actor, a lost object, engines unavailable) is retried
  after a backoff: `initial_backoff_s` doubling with each failure of the item up to `max_backoff_s`,
  times 1 + `jitter` x a random fraction. Other items go ahead while it waits.
- a call past `deadline_s` (None: no deadline) is cancelled and counts as transient. The deadline
  detects a hung worker; it is not flow control.
- a transient failure is given up only once the item failed at least `max_attempts` times AND its first
  failure is at least `retry_window_s` ago, so while capacity is missing (a node lost until the
  autoscaler brings it back) items wait instead of draining into failures. Then, and for a final
  failure: `Outcome(item, error=..., transient=..., attempts=...)`; the caller decides what it means
  (an error row, a problem left for a re-run, a failed job).
- `on_transient(item, exc, error)`, when given, sees every transient failure as it happens (`exc` is
  the exception, None for a missed deadline; `error` its one-line reason) and may end the item at once
  by returning a final reason: then `Outcome(item, error=<that reason>, transient=False)`, however
  many attempts are left (e.g. a problem that failed its infrastructure too often across runs). None
  lets the retry policy above decide.

Setting `stop` ends the loop within `poll_s`; calls still in flight are abandoned (the caller owns the
workers and shuts them down). The loop never spins: with nothing to do it blocks on its completion
queue until a call finishes, a deadline or a backoff falls due, or `poll_s` passes.

How the cost stays O(log n) per result: `watch(handle, on_done)` makes each finished call put its
handle on a completion queue (the loop takes one at a time, never scanning what is pending);
deadlines and backoffs are heaps, and only their due entries are looked at (a finished call's
deadline entry is dropped when it comes due, or when the heap is rebuilt at twice the pending count).
`stats` counts results, retries, the peak in-flight count and the loop's own time per result.

It calls workers only through the `submit`, `watch`, `get` and `cancel` callables, so it knows nothing
about Ray and is unit-tested with plain futures; `ray_calls()` gives the Ray versions.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import queue
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial
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
    watch: Callable[[Any, Callable[[], None]], None]
    get: Callable[[Any], Any]
    cancel: Callable[[Any], None]


def ray_calls() -> RayCalls:
    """`watch`, `get` and `cancel` over Ray object refs (`watch` through `ObjectRef.future()`)."""
    import ray

    def watch(ref: Any, on_done: Callable[[], None]) -> None:
        ref.future().add_done_callback(lambda _: on_done())

    return RayCalls(watch, ray.get, ray.cancel)


class Histogram:
    """Durations in log-spaced buckets 5% wide (1 us to ~5 min): bounded memory, quantiles to 5%."""

    LOW_S, RATIO, BUCKETS = 1e-6, 1.05, 400

    def __init__(self) -> None:
        self.counts = [0] * self.BUCKETS
        self.count, self.total_s, self.max_s = 0, 0.0, 0.0

    def add(self, seconds: float) -> None:
        i = 0 if seconds <= self.LOW_S else math.ceil(math.log(seconds / self.LOW_S, self.RATIO))
        self.counts[min(i, self.BUCKETS - 1)] += 1
        self.count += 1
        self.total_s += seconds
        self.max_s = max(self.max_s, seconds)

    def quantile(self, q: float) -> float:
        """Seconds that a fraction `q` of the durations do not exceed (a bucket's upper edge)."""
        need, seen = q * self.count, 0
        for i, n in enumerate(self.counts):
            seen += n
            if n and seen >= need:
                return min(self.LOW_S * self.RATIO**i, self.max_s)
        return 0.0


@dataclass
class DispatchStats:
    results: int = 0  # calls that ended: returned, raised, or cancelled past their deadline
    retries: int = 0  # transient failures scheduled for another attempt
    given_up: int = 0  # items that ended in a transient failure (attempts and retry window spent)
    peak_in_flight: int = 0
    touched: int = 0  # pending entries the loop looked at (ended calls, due deadlines, heap rebuilds)
    # The loop's own time per ended call (admission, submit, get, heaps; not waiting, not the caller's
    # time between outcomes): seconds, e.g. `loop_s.quantile(0.99) * 1e3` is p99 ms per result.
    loop_s: Histogram = field(default_factory=Histogram)


class _Item(Generic[T]):
    """An item and its attempts so far."""

    __slots__ = ("item", "attempts", "failures", "first_failure")

    def __init__(self, item: T):
        self.item, self.attempts, self.failures = item, 0, 0
        self.first_failure: float | None = None


class _Call:
    """One call in flight."""

    __slots__ = ("entry", "worker", "seq", "deadline")

    def __init__(self, entry: _Item, worker: int, seq: int, deadline: float | None):
        self.entry, self.worker, self.seq, self.deadline = entry, worker, seq, deadline


class Dispatcher(Generic[T]):
    """See the module docstring. `describe(item)` names an item in log lines.

    Args:
        submit: `(item, worker, attempt) -> handle`, starts a call (attempt counts from 1).
        watch: `(handle, on_done)`, calls `on_done()` once, from any thread, when the call ended.
        get: `(handle) -> result`, the ended call's result; raises what the call raised.
        cancel: `(handle)`, gives up a call past its deadline (its late end is ignored).
        rng: source of the backoff jitter (seed it for reproducible spacing).
    """

    def __init__(
        self,
        *,
        num_workers: int,
        capacity: int,
        submit: Callable[[T, int, int], Any],
        watch: Callable[[Any, Callable[[], None]], None],
        get: Callable[[Any], Any],
        cancel: Callable[[Any], None],
        deadline_s: float | None,
        max_attempts: int,
        retry_window_s: float = 600.0,
        initial_backoff_s: float = 1.0,
        max_backoff_s: float = 60.0,
        jitter: float = 0.5,
        rng: random.Random | None = None,
        is_transient: Callable[[BaseException], bool] = lambda exc: True,
        describe: Callable[[T], str] = str,
        stop: threading.Event | None = None,
        poll_s: float = 1.0,
        on_transient: Callable[[T, BaseException | None, str], str | None] | None = None,
    ):
        if num_workers < 1 or capacity < 1 or max_attempts < 1:
            raise ValueError("num_workers, capacity and max_attempts must be >= 1")
        if min(retry_window_s, initial_backoff_s, jitter) < 0 or max_backoff_s < initial_backoff_s:
            raise ValueError("retry_window_s, backoffs and jitter must be >= 0, max_backoff_s >= initial")
        if deadline_s is not None and deadline_s <= 0:
            raise ValueError(f"deadline_s must be > 0 or None, got {deadline_s}")
        self.submit, self.watch, self.get, self.cancel = submit, watch, get, cancel
        self.capacity, self.deadline_s, self.max_attempts = capacity, deadline_s, max_attempts
        self.retry_window_s, self.jitter = retry_window_s, jitter
        self.initial_backoff_s, self.max_backoff_s = initial_backoff_s, max_backoff_s
        self.rng = rng or random.Random()
        self.is_transient, self.describe, self.poll_s = is_transient, describe, poll_s
        self.on_transient = on_transient
        self.stop = stop or threading.Event()
        self.stats = DispatchStats()
        self.load = [0] * num_workers
        self.pending: dict[Any, _Call] = {}  # handle -> call
        self._room = num_workers * capacity
        self._done: queue.SimpleQueue = queue.SimpleQueue()  # handles of ended calls
        self._deadlines: list[tuple[float, int, Any]] = []  # (deadline, seq, handle); lazy deletion
        self._backoff: list[tuple[float, int, _Item]] = []  # (ready time, seq, item)
        self._seq = itertools.count()
        self._exhausted = False
        self._busy_s, self._since = 0.0, time.perf_counter()  # the loop's own time since the last result
        self._warned_at, self._unwarned = -math.inf, 0  # retry warnings: at most one per 10 s

    @property
    def in_flight(self) -> int:
        return len(self.pending)

    @property
    def waiting(self) -> int:
        """Items waiting for their backoff to end."""
        return len(self._backoff)

    def run(self, items: Iterable[T]) -> Iterator[Outcome[T]]:
        source = iter(items)
        self._since = time.perf_counter()
        while not self.stop.is_set():
            # 1. Cancel the calls past their deadline (only due heap entries are looked at).
            for handle in self._overdue(time.monotonic()):
                out = self._end(handle, overdue=True)
                if out is not None:
                    yield from self._hand_over(out)
                    if self.stop.is_set():
                        return
            # 2. Fill the workers: due retries first, then the next items of the input.
            self._admit(source)
            if self._exhausted and not self.pending and not self._backoff:
                return
            # 3. Take one ended call (blocking until one ends or a deadline/backoff falls due).
            handle = self._next_done()
            if handle is not None and handle in self.pending:  # not a cancelled call's late end
                out = self._end(handle)
                if out is not None:
                    yield from self._hand_over(out)

    def _hand_over(self, out: Outcome[T]) -> Iterator[Outcome[T]]:
        self._pause()
        yield out  # the consumer's time (and errors) are its own
        self._since = time.perf_counter()

    def _pause(self) -> None:
        self._busy_s += time.perf_counter() - self._since

    def _admit(self, source: Iterator[T]) -> None:
        while len(self.pending) < self._room:
            if self._backoff and self._backoff[0][0] <= time.monotonic():
                entry = heapq.heappop(self._backoff)[2]
            elif not self._exhausted:
                try:
                    entry = _Item(next(source))
                except StopIteration:
                    self._exhausted = True
                    return
            else:
                return
            self._start(entry)

    def _start(self, entry: _Item) -> None:
        worker = min(range(len(self.load)), key=self.load.__getitem__)
        entry.attempts += 1
        handle = self.submit(entry.item, worker, entry.attempts)
        seq, deadline = next(self._seq), None
        if self.deadline_s is not None:
            deadline = time.monotonic() + self.deadline_s
            heapq.heappush(self._deadlines, (deadline, seq, handle))
            if len(self._deadlines) > 2 * len(self.pending) + 1024:
                self._rebuild_deadlines()
        self.pending[handle] = _Call(entry, worker, seq, deadline)
        self.load[worker] += 1
        self.stats.peak_in_flight = max(self.stats.peak_in_flight, len(self.pending))
        self.watch(handle, partial(self._done.put, handle))

    def _rebuild_deadlines(self) -> None:
        """Drop the entries of ended calls: O(pending), once per `pending` ended calls or more."""
        self._deadlines = [(c.deadline, c.seq, h) for h, c in self.pending.items()]
        heapq.heapify(self._deadlines)
        self.stats.touched += len(self._deadlines)

    def _overdue(self, now: float) -> list[Any]:
        late = []
        while self._deadlines and self._deadlines[0][0] <= now:
            _, seq, handle = heapq.heappop(self._deadlines)
            self.stats.touched += 1
            call = self.pending.get(handle)
            if call is not None and call.seq == seq:
                late.append(handle)
        return late

    def _next_done(self) -> Any:
        """The handle of an ended call, or None after waiting until the next deadline, backoff or poll."""
        try:
            return self._done.get_nowait()
        except queue.Empty:
            pass
        now, timeout = time.monotonic(), self.poll_s
        if self._deadlines:
            timeout = min(timeout, self._deadlines[0][0] - now)
        if self._backoff and len(self.pending) < self._room:
            timeout = min(timeout, self._backoff[0][0] - now)
        self._pause()
        try:
            return self._done.get(timeout=max(timeout, 0.0))
        except queue.Empty:
            return None
        finally:
            self._since = time.perf_counter()

    def _end(self, handle: Any, overdue: bool = False) -> Outcome[T] | None:
        """Settle an ended (or overdue) call: its outcome, or None if it is retried later."""
        call = self.pending.pop(handle)
        self.load[call.worker] -= 1
        self.stats.results += 1
        self.stats.touched += 1
        entry = call.entry
        try:
            exc: BaseException | None = None
            if overdue:
                self.cancel(handle)
                error, transient = f"no answer within its deadline of {self.deadline_s:g} s", True
            else:
                try:
                    return Outcome(entry.item, self.get(handle), attempts=entry.attempts)
                except Exception as e:
                    exc, error, transient = e, reason(e), self.is_transient(e)
            if transient and self.on_transient is not None:
                final = self.on_transient(entry.item, exc, error)
                if final is not None:
                    return Outcome(entry.item, error=final, transient=False, attempts=entry.attempts)
            return self._failed(entry, error, transient)
        finally:
            now = time.perf_counter()
            self.stats.loop_s.add(self._busy_s + now - self._since)
            self._busy_s, self._since = 0.0, now

    def _failed(self, entry: _Item, error: str, transient: bool) -> Outcome[T] | None:
        """Schedule a retry after a backoff, or the final outcome (attempts and retry window spent)."""
        now = time.monotonic()
        entry.failures += 1
        if entry.first_failure is None:
            entry.first_failure = now
        retry = entry.failures < self.max_attempts or now - entry.first_failure < self.retry_window_s
        if not (transient and retry):
            self.stats.given_up += int(transient)
            return Outcome(entry.item, error=error, transient=transient, attempts=entry.attempts)
        base = self.initial_backoff_s * 2.0 ** min(entry.failures - 1, 60)
        delay = min(base, self.max_backoff_s) * (1 + self.jitter * self.rng.random())
        heapq.heappush(self._backoff, (now + delay, next(self._seq), entry))
        self.stats.retries += 1
        self._warn_retry(entry, error, delay, now)
        return None

    def _warn_retry(self, entry: _Item, error: str, delay: float, now: float) -> None:
        """One warning per 10 s at most (a lost node fails thousands of calls at once)."""
        msg = "%s failed (attempt %d): %s; retrying in %.1f s"
        log.debug(msg, self.describe(entry.item), entry.attempts, error, delay)
        self._unwarned += 1
        if now - self._warned_at >= 10.0:
            log.warning(
                msg + " (%d transient failures since the last warning; %d items waiting to retry)",
                self.describe(entry.item),
                entry.attempts,
                error,
                delay,
                self._unwarned,
                len(self._backoff),
            )
            self._warned_at, self._unwarned = now, 0
