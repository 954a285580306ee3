"""Answer checking (gen_ssd_ray.common.verify): math-verify in worker processes with an outer deadline."""

import os
import time

import pytest

from gen_ssd_ray.common.verify import Verifier, check_answer


def slow_check(gold: str, pred: str) -> bool | None:
    """Test worker: sleeps `pred` seconds if it is a number, then says gold == pred; pred "raise"
    raises, pred "die" kills the worker process."""
    if pred == "raise":
        raise RuntimeError("boom")
    if pred == "die":
        os._exit(3)  # a worker crash
    try:
        time.sleep(float(pred))
    except ValueError:
        pass
    return gold == pred


@pytest.fixture(scope="module")
def verifier():
    with Verifier(workers=2, timeout_s=20.0) as v:  # generous: the first call spawns the workers
        yield v


@pytest.mark.parametrize(
    "gold, pred",
    [
        ("18", "18"),
        ("18", "18.0"),
        ("18", "$18"),
        ("18", "\\$18"),
        ("18", "\\boxed{18}"),
        ("18", "$\\boxed{18}$"),
        ("1,000", "1000"),
        ("1000", "1,000"),
        ("-7", "-7.00"),
        ("0.5", "\\frac{1}{2}"),
        ("\\frac{1}{2}", "0.5"),
        ("\\frac{3}{4}", "3/4"),
        ("2", "\\text{2}"),
        ("x + 1", "1 + x"),
    ],
)
def test_equal(verifier, gold, pred):
    assert verifier.verify(gold, pred) is True


@pytest.mark.parametrize(
    "gold, pred",
    [("18", "19"), ("1000", "100"), ("\\frac{1}{2}", "0.6"), ("18", "hello"), ("-7", "7")],
)
def test_not_equal(verifier, gold, pred):
    assert verifier.verify(gold, pred) is False


@pytest.mark.parametrize(
    "gold, pred",
    [(None, "18"), ("18", None), ("", "18"), ("18", "   "), ("18", "\\boxed{"), ("\\boxed{", "18")],
)
def test_unverified(verifier, gold, pred):
    assert verifier.verify(gold, pred) is None


def test_verify_many_keeps_order(verifier):
    pairs = [("18", "18"), ("18", "19"), (None, "1"), ("1,000", "1000"), ("5", "")] * 3
    assert verifier.verify_many(pairs) == [True, False, None, True, None] * 3
    assert verifier.verify_many([]) == []


def test_check_answer_in_process():
    assert check_answer("72", "72.0") is True
    assert check_answer("72", "27") is False
    assert check_answer("72", "\\boxed{") is None


def test_deadline_kills_stuck_worker_and_pool_recovers():
    with Verifier(workers=1, timeout_s=1.0, worker_fn=slow_check) as v:
        assert v.verify("0", "0") is True  # the pool is up
        t = time.monotonic()
        # item 0 hangs; 1 and 2 wait behind it in the same pool and must be resubmitted, not lost
        out = v.verify_many([("x", "60"), ("0.1", "0.1"), ("a", "0")])
        assert out == [None, True, False]
        assert time.monotonic() - t < 15
        assert v.restarts == 1
        assert v.verify("0", "0") is True  # the fresh pool works
        assert v.verify("0", "raise") is None  # the check raising is unverified, no restart
        assert v.restarts == 1


def test_dead_worker_is_retried_once_then_unverified():
    with Verifier(workers=1, timeout_s=5.0, worker_fn=slow_check) as v:
        assert v.verify_many([("0", "0"), ("x", "die"), ("a", "0"), ("0", "0")]) == [True, None, False, True]
        assert v.restarts == 2  # the crash, then the retry's crash
        assert v.verify("0", "0") is True


def test_closed_verifier_refuses():
    v = Verifier(workers=1, timeout_s=1.0, worker_fn=slow_check)
    v.close()
    v.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        v.verify("1", "1")
    assert v.verify(None, "1") is None  # nothing to submit


def test_rejects_fork_and_bad_args():
    with pytest.raises(ValueError, match="never fork"):
        Verifier(mp_context="fork")
    with pytest.raises(ValueError):
        Verifier(workers=0)
    with pytest.raises(ValueError):
        Verifier(timeout_s=0)
