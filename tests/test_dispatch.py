"""The shared dispatcher (gen_ssd_ray.common.dispatch) without Ray: admission, deadlines, retries."""

from __future__ import annotations

import threading

import pytest

from gen_ssd_ray.common.dispatch import Dispatcher


class Pool:
    """Workers as plain objects: a call is finished when the test says so (scripted per item)."""

    def __init__(self, script: dict, clock: list[float]):
        # item -> list of what each attempt does: a value, an exception, or "hang" (never returns)
        self.script = {k: list(v) for k, v in script.items()}
        self.clock = clock
        self.calls: list[tuple] = []  # (item, worker, attempt)
        self.cancelled: list = []
        self.max_inflight = 0
        self.inflight: dict[int, tuple] = {}
        self.next = 0

    def submit(self, item, worker, attempt):
        self.calls.append((item, worker, attempt))
        self.next += 1
        self.inflight[self.next] = (item, self.script[item].pop(0))
        self.max_inflight = max(self.max_inflight, len(self.inflight))
        return self.next

    def wait(self, handles, timeout_s):
        ready = [h for h in handles if self.inflight[h][1] != "hang"][:1]
        if not ready:
            self.clock[0] += timeout_s  # time passes while nothing finishes
        return ready

    def get(self, h):
        _, what = self.inflight.pop(h)
        if isinstance(what, BaseException):
            raise what
        return what

    def cancel(self, h):
        self.cancelled.append(self.inflight.pop(h)[0])


class Transient(Exception):
    pass


def dispatcher(pool: Pool, clock: list[float], **kw) -> Dispatcher:
    args = dict(
        num_workers=2,
        capacity=2,
        submit=pool.submit,
        wait=pool.wait,
        get=pool.get,
        cancel=pool.cancel,
        deadline_s=10.0,
        max_attempts=3,
        is_transient=lambda e: isinstance(e, Transient),
        clock=lambda: clock[0],
    )
    return Dispatcher(**{**args, **kw})


def test_every_item_once_least_loaded_within_capacity():
    clock = [0.0]
    pool = Pool({i: [i * 10] for i in range(7)}, clock)
    out = list(dispatcher(pool, clock).run(range(7)))
    assert sorted((o.item, o.result) for o in out) == [(i, i * 10) for i in range(7)]
    assert all(o.ok and o.attempts == 1 for o in out)
    assert pool.max_inflight <= 4  # 2 workers x capacity 2
    assert [w for _, w, _ in pool.calls[:4]] == [0, 1, 0, 1]  # the least-loaded worker first


def test_transient_failures_are_retried_first_then_given_up():
    clock = [0.0]
    pool = Pool({"a": [Transient("died"), "ok"], "b": [Transient("x")] * 3, "c": ["c"]}, clock)
    out = {o.item: o for o in dispatcher(pool, clock, num_workers=1, capacity=1).run(["a", "b", "c"])}
    assert out["a"].ok and out["a"].result == "ok" and out["a"].attempts == 2
    assert not out["b"].ok and out["b"].transient and out["b"].attempts == 3
    assert out["b"].error == "Transient: x"
    # a retry goes to the front of the queue: a, a, b, b, b, c
    assert [c[0] for c in pool.calls] == ["a", "a", "b", "b", "b", "c"]


def test_a_failure_of_the_item_itself_is_final_at_once():
    clock = [0.0]
    pool = Pool({"bad": [ValueError("prompt too long")]}, clock)
    (out,) = dispatcher(pool, clock).run(["bad"])
    assert not out.ok and not out.transient and out.attempts == 1
    assert out.error == "ValueError: prompt too long"


def test_overdue_calls_are_cancelled_and_retried():
    clock = [0.0]
    pool = Pool({"slow": ["hang", "done"]}, clock)
    (out,) = dispatcher(pool, clock, deadline_s=5.0, poll_s=2.0).run(["slow"])
    assert out.ok and out.result == "done" and out.attempts == 2
    assert pool.cancelled == ["slow"]


def test_overdue_on_every_attempt_reports_the_deadline():
    clock = [0.0]
    pool = Pool({"slow": ["hang"] * 2}, clock)
    (out,) = dispatcher(pool, clock, deadline_s=5.0, max_attempts=2).run(["slow"])
    assert not out.ok and out.transient and "deadline of 5 s" in out.error
    assert pool.cancelled == ["slow", "slow"]


def test_stop_ends_the_loop_after_the_current_wait():
    clock = [0.0]
    stop = threading.Event()
    pool = Pool({i: [i] for i in range(10)}, clock)
    d = dispatcher(pool, clock, num_workers=1, capacity=1, stop=stop)
    got = []
    for o in d.run(range(10)):
        got.append(o.item)
        if len(got) == 3:
            stop.set()
    assert got == [0, 1, 2]


def test_bad_geometry_is_refused():
    clock = [0.0]
    with pytest.raises(ValueError):
        dispatcher(Pool({}, clock), clock, capacity=0)
