"""The shared dispatcher (gen_ssd_ray.common.dispatch) without Ray: admission, lazy input, deadlines,
retries with backoff and a retry window, stop, and O(1) work per result. Calls are plain futures;
time is real but tiny (milliseconds), and assertions on spacing are lower bounds only."""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import Future

import pytest

from gen_ssd_ray.common.dispatch import Dispatcher


class Transient(Exception):
    pass


class Pool:
    """Workers as plain futures, scripted per item: each attempt is a value, an exception, "hang"
    (never ends) or ("after", seconds, value) (ends from a timer thread). Unscripted items return
    themselves at once."""

    def __init__(self, script: dict | None = None):
        self.script = {k: list(v) for k, v in (script or {}).items()}
        self.calls: list[tuple] = []  # (item, worker, attempt, monotonic time)
        self.cancelled: list = []
        self.item_of: dict[Future, object] = {}
        self.watches = self.gets = 0
        self.timers: list[threading.Timer] = []

    def submit(self, item, worker, attempt):
        self.calls.append((item, worker, attempt, time.monotonic()))
        steps = self.script.get(item)
        what = steps.pop(0) if steps else item
        fut: Future = Future()
        self.item_of[fut] = item
        if isinstance(what, BaseException):
            fut.set_exception(what)
        elif isinstance(what, tuple) and what[0] == "after":
            timer = threading.Timer(what[1], fut.set_result, (what[2],))
            self.timers.append(timer)
            timer.start()
        elif what != "hang":
            fut.set_result(what)
        return fut

    def watch(self, fut: Future, on_done) -> None:
        self.watches += 1
        fut.add_done_callback(lambda _: on_done())

    def get(self, fut: Future):
        self.gets += 1
        return fut.result()

    def cancel(self, fut: Future) -> None:
        self.cancelled.append(self.item_of[fut])
        fut.cancel()  # its done callback fires: the dispatcher must ignore the late end

    def spacing(self, item) -> list[float]:
        times = [t for i, _, _, t in self.calls if i == item]
        return [b - a for a, b in zip(times, times[1:], strict=False)]


def dispatcher(pool: Pool, **kw) -> Dispatcher:
    args = dict(
        num_workers=2,
        capacity=2,
        submit=pool.submit,
        watch=pool.watch,
        get=pool.get,
        cancel=pool.cancel,
        deadline_s=10.0,
        max_attempts=3,
        retry_window_s=0.0,
        initial_backoff_s=0.001,
        max_backoff_s=0.004,
        rng=random.Random(0),
        is_transient=lambda e: isinstance(e, Transient),
        poll_s=0.05,
    )
    return Dispatcher(**{**args, **kw})


def test_every_item_once_least_loaded_within_capacity():
    pool = Pool({i: [i * 10] for i in range(7)})
    d = dispatcher(pool)
    out = list(d.run(range(7)))
    assert sorted((o.item, o.result) for o in out) == [(i, i * 10) for i in range(7)]
    assert all(o.ok and o.attempts == 1 for o in out)
    assert d.stats.peak_in_flight <= 4  # 2 workers x capacity 2
    assert [w for _, w, _, _ in pool.calls[:4]] == [0, 1, 0, 1]  # the least-loaded worker first
    assert d.stats.results == 7 and d.stats.loop_s.count == 7


def test_input_is_read_lazily_and_bounded_by_what_is_in_flight():
    pool = Pool({i: [Transient("died"), i] for i in range(0, 3000, 7)})  # every 7th item fails once
    d = dispatcher(pool, num_workers=3, capacity=4)
    pulled, finished, excess = [0], [0], []

    def items():
        for i in range(3000):
            pulled[0] += 1
            excess.append(pulled[0] - finished[0] - d.waiting)
            yield i

    for o in d.run(items()):
        assert o.ok
        finished[0] += 1
    assert finished[0] == 3000 and d.stats.retries == len(range(0, 3000, 7))
    assert max(excess) <= 3 * 4  # pulled - finished <= workers x capacity + retries pending


def test_a_backing_off_item_does_not_block_others_and_due_retries_go_first():
    pool = Pool({"a": [Transient("died"), "a"], "b": [("after", 0.05, "b")]})
    d = dispatcher(pool, num_workers=1, capacity=1)
    out = {o.item: o for o in d.run(["a", "b", "c"])}
    assert all(o.ok for o in out.values()) and out["a"].attempts == 2
    # a backs off (1-1.5 ms) while b runs (50 ms); then the due retry of a goes before the new item c
    assert [c[0] for c in pool.calls] == ["a", "b", "a", "c"]


def test_transient_failures_back_off_exponentially_then_succeed():
    # fails 4 times, more than max_attempts, but within the retry window: waits instead of failing
    pool = Pool({"x": [Transient("engines unavailable")] * 4 + ["ok"]})
    d = dispatcher(pool, initial_backoff_s=0.01, max_backoff_s=0.04, max_attempts=2, retry_window_s=10.0)
    (out,) = d.run(["x"])
    assert out.ok and out.result == "ok" and out.attempts == 5
    assert d.stats.retries == 4 and d.stats.given_up == 0
    for gap, backoff in zip(pool.spacing("x"), [0.01, 0.02, 0.04, 0.04], strict=True):
        assert gap >= backoff  # jitter only adds (up to 50%)


def test_given_up_only_after_max_attempts_and_the_retry_window():
    pool = Pool({"x": [Transient("node lost")] * 1000})
    d = dispatcher(pool, initial_backoff_s=0.005, max_backoff_s=0.01, max_attempts=2, retry_window_s=0.1)
    (out,) = d.run(["x"])
    assert not out.ok and out.transient and out.error == "Transient: node lost"
    assert out.attempts > 2  # max_attempts alone does not end it: the window must be spent too
    times = [t for _, _, _, t in pool.calls]
    assert times[-1] - times[0] >= 0.1
    assert d.stats.given_up == 1


def test_max_attempts_alone_with_no_window():
    pool = Pool({"a": [Transient("died"), "ok"], "b": [Transient("x")] * 3, "c": ["c"]})
    out = {o.item: o for o in dispatcher(pool, num_workers=1, capacity=1).run(["a", "b", "c"])}
    assert out["a"].ok and out["a"].result == "ok" and out["a"].attempts == 2
    assert not out["b"].ok and out["b"].transient and out["b"].attempts == 3
    assert out["b"].error == "Transient: x" and out["c"].ok


def test_a_failure_of_the_item_itself_is_final_at_once():
    pool = Pool({"bad": [ValueError("prompt too long")]})
    (out,) = dispatcher(pool, retry_window_s=60.0).run(["bad"])
    assert not out.ok and not out.transient and out.attempts == 1
    assert out.error == "ValueError: prompt too long"


def test_overdue_calls_are_cancelled_and_retried():
    pool = Pool({"slow": ["hang", "done"]})
    (out,) = dispatcher(pool, deadline_s=0.05).run(["slow"])
    assert out.ok and out.result == "done" and out.attempts == 2
    assert pool.cancelled == ["slow"]  # and its late end (the cancelled future) was ignored


def test_overdue_on_every_attempt_reports_the_deadline():
    pool = Pool({"slow": ["hang"] * 2})
    (out,) = dispatcher(pool, deadline_s=0.05, max_attempts=2).run(["slow"])
    assert not out.ok and out.transient and "deadline of 0.05 s" in out.error
    assert pool.cancelled == ["slow", "slow"]


def test_no_deadline_waits_for_a_slow_call():
    pool = Pool({"slow": [("after", 0.2, "done")]})
    d = dispatcher(pool, deadline_s=None)
    (out,) = d.run(["slow"])
    assert out.ok and out.attempts == 1 and pool.cancelled == []
    assert d.stats.touched == 1  # no deadline entries at all


def test_stop_ends_the_loop_after_the_current_outcome():
    stop = threading.Event()
    pool = Pool()
    d = dispatcher(pool, num_workers=1, capacity=1, stop=stop)
    got = []
    for o in d.run(range(10)):
        got.append(o.item)
        if len(got) == 3:
            stop.set()
    assert got == [0, 1, 2]


def test_while_everything_backs_off_the_loop_sleeps_but_sees_completions_and_stop():
    stop = threading.Event()
    pool = Pool({"a": [Transient("died")], "b": [("after", 0.1, "b")]})
    d = dispatcher(
        pool, initial_backoff_s=30.0, max_backoff_s=30.0, retry_window_s=60.0, poll_s=1.0, stop=stop
    )
    t0, cpu0 = time.monotonic(), time.thread_time()
    outs = []
    for o in d.run(["a", "b"]):
        outs.append((o.item, time.monotonic() - t0))
        threading.Timer(0.2, stop.set).start()  # now only "a" remains, backing off for 30 s
    wall, cpu = time.monotonic() - t0, time.thread_time() - cpu0
    assert [i for i, _ in outs] == ["b"] and outs[0][1] < 0.5  # b's end woke the loop (poll_s is 1 s)
    assert wall < 2.5  # stop was seen within poll_s
    assert cpu < 0.2 * wall  # slept, never spun
    assert d.waiting == 1 and [c[0] for c in pool.calls] == ["a", "b"]


class CountingDict(dict):
    """The dispatcher's pending table, counting every entry it reads (a scan counts them all)."""

    touched = 0

    def __iter__(self):
        self.touched += len(self)
        return super().__iter__()

    def items(self):
        self.touched += len(self)
        return super().items()

    def values(self):
        self.touched += len(self)
        return super().values()

    def keys(self):
        self.touched += len(self)
        return super().keys()

    def __contains__(self, key):
        self.touched += 1
        return super().__contains__(key)

    def get(self, key, default=None):
        self.touched += 1
        return super().get(key, default)

    def pop(self, key, *default):
        self.touched += 1
        return super().pop(key, *default)


@pytest.mark.parametrize("deadline_s", [None, 30.0])
def test_work_per_result_is_linear_in_the_number_of_items(deadline_s):
    def run(n: int) -> tuple[Pool, Dispatcher]:
        pool = Pool()
        d = dispatcher(pool, num_workers=4, capacity=256, deadline_s=deadline_s)  # ~1,000 pending
        d.pending = CountingDict()
        assert sum(1 for _ in d.run(range(n))) == n
        assert d.pending.touched <= 4 * n  # reads of the pending table, scans included
        return pool, d

    small, d_small = run(2_000)
    big, d_big = run(20_000)
    for pool, d, n in [(small, d_small, 2_000), (big, d_big, 20_000)]:
        assert pool.watches == pool.gets == d.stats.results == n  # one watch and one get per call
        assert d.stats.touched <= 2 * n  # ended calls + due deadline entries + heap rebuilds
        assert d.stats.peak_in_flight == 1024
    # per result, 10x the items costs about the same (a scan of what is pending would cost ~10x)
    assert d_big.stats.touched / 20_000 <= 2 * d_small.stats.touched / 2_000


def test_bad_geometry_is_refused():
    with pytest.raises(ValueError):
        dispatcher(Pool(), capacity=0)
    with pytest.raises(ValueError):
        dispatcher(Pool(), deadline_s=0)
    with pytest.raises(ValueError):
        dispatcher(Pool(), initial_backoff_s=2.0, max_backoff_s=1.0)


def test_on_transient_sees_each_transient_failure_and_can_end_the_item_at_once():
    """A poison item (it fails its worker every time) is ended by the caller's count, not retried for
    the whole retry window; other items are unaffected, and failures of the item itself are not shown."""
    seen = []

    def on_transient(item, exc, error):
        seen.append((item, type(exc).__name__ if exc else None, error))
        n = sum(1 for s in seen if s[0] == item)
        return f"failed {n} times" if n >= 3 else None

    pool = Pool({"poison": [Transient("boom")] * 10, "bad": [ValueError("own fault")], "late": ["hang"]})
    d = dispatcher(
        pool,
        max_attempts=10,
        retry_window_s=600.0,
        deadline_s=0.05,
        is_transient=lambda e: isinstance(e, Transient),
        on_transient=on_transient,
    )
    out = {o.item: o for o in d.run(["a", "poison", "bad", "late", "b"])}
    assert out["poison"].error == "failed 3 times" and not out["poison"].transient
    assert out["poison"].attempts == 3
    assert out["a"].ok and out["b"].ok and out["late"].ok  # "late" hung once, then answered
    assert not out["bad"].transient and "own fault" in out["bad"].error
    assert ("late", None, "no answer within its deadline of 0.05 s") in seen  # deadlines are shown
    assert all(item != "bad" for item, _, _ in seen)
