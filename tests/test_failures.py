"""Failure classification: what is retried (never committed) and what becomes an error row."""

from __future__ import annotations

import pytest
from ray.exceptions import ActorDiedError, ObjectLostError, RayTaskError

from gen_ssd_ray.common.errors import reason as _reason
from gen_ssd_ray.generate.manager import EnginesUnavailable
from gen_ssd_ray.generate.solve import is_transient as _transient


def task_error(cause: Exception) -> Exception:
    """The exception `ray.get` raises when a manager's `solve` raised `cause`."""
    return RayTaskError("solve", "Traceback ...", cause).as_instanceof_cause()


@pytest.mark.parametrize(
    "exc",
    [
        task_error(EnginesUnavailable("expand@0: ActorDiedError")),
        task_error(TimeoutError()),
        ActorDiedError(),
        ObjectLostError("00" * 28, "owner", "call site"),
    ],
    ids=["engines-unavailable", "deadline", "manager-died", "object-lost"],
)
def test_infrastructure_failures_are_retried(exc):
    assert _transient(exc)


@pytest.mark.parametrize("cause", [ValueError("prompt too long"), KeyError("x"), RuntimeError("bad input")])
def test_errors_from_the_problem_itself_become_error_rows(cause):
    exc = task_error(cause)
    assert not _transient(exc)
    assert _reason(exc).startswith(type(cause).__name__)


# ---- which beam manager gets the next problem (generate.solve.Managers) ---------------------------


class Clock:
    t = 100.0

    def __call__(self) -> float:
        return self.t


def test_managers_least_loaded_first_and_a_failed_one_cools_down():
    from gen_ssd_ray.generate.solve import Managers

    clock = Clock()
    m = Managers(3, cooldown_s=10.0, give_up_s=100.0, clock=clock)
    m.started("a", m.pick())
    m.started("b", m.pick())
    assert sorted(m.of.values()) == [0, 1] and m.pick() == 2
    m.failed(m.finished("a"))  # manager 0's actor failed (died with its node)
    assert m.load == [0, 1, 0] and m.pick() == 2  # the least loaded is cooling down: skipped
    m.failed(0)  # a late failure while it cools down does not count again
    assert m.health.failures[0] == 1
    clock.t += 10.0  # cooldown over: its next problem is the probe (a restarted actor answers it)
    assert m.pick() == 0
    m.ok(0)
    assert m.health.failures == {}


def test_a_probing_manager_gets_one_problem_until_it_answers():
    """Found by bench-fixes (node loss, SPREAD): a manager restarting on another node was probed by
    every new problem (least-loaded: its failed calls had left it empty), 1,152 retries; now one."""
    from gen_ssd_ray.generate.solve import Managers

    clock = Clock()
    m = Managers(2, cooldown_s=10.0, give_up_s=100.0, clock=clock)
    for ref in "abcd":
        m.started(ref, m.pick())
    for ref in "ac":  # manager 0 died with its node: both its calls fail
        m.failed(m.finished(ref))
    clock.t += 10.0
    assert m.pick() == 0  # cooldown over: the probe
    m.started("probe", 0)
    for ref in "efgh":  # not more problems on the probe's manager while the probe runs
        assert m.pick() == 1
        m.started(ref, 1)
    m.ok(m.finished("probe"))  # it answered: back to least-loaded
    assert m.pick() == 0


def test_managers_all_down_pick_the_first_back_then_give_up_after_the_start_up_time():
    from gen_ssd_ray.common.errors import JobFailed
    from gen_ssd_ray.generate.solve import Managers

    clock = Clock()
    m = Managers(2, cooldown_s=10.0, give_up_s=100.0, clock=clock)
    m.failed(0)
    clock.t += 1.0
    m.failed(1)
    for _ in range(20):  # failing fast while cooling down costs nothing
        assert m.pick() == 0
        m.failed(0)
    clock.t += 50.0
    m.pick()  # probes due; the probes fail
    m.failed(0)
    m.failed(1)
    clock.t += 60.0
    with pytest.raises(JobFailed, match="every beam manager has been down"):
        m.pick()
