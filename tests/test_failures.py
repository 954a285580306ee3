"""Failure classification: what is retried (never committed) and what becomes an error row."""

from __future__ import annotations

import pytest
from ray.exceptions import ActorDiedError, ObjectLostError, RayTaskError

from gen_ssd_ray.common.errors import reason as _reason
from gen_ssd_ray.generate.driver import is_transient as _transient
from gen_ssd_ray.generate.manager import EnginesUnavailable


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
