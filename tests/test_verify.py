"""Answer checking (gen_ssd_ray.common.verify): math-verify in worker processes with an outer deadline."""

import os
import time
from pathlib import Path

import pytest

from gen_ssd_ray.common.errors import InputError
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


# ---- hardening (issue 11): a verifier that cannot run fails loudly; errors are null and counted ----

# Fake math_verify packages, put first on sys.path (spawned workers inherit the parent's sys.path), so
# the workers import them instead of the real one. Each stands for one way the checker can be broken.
_PARSE_OK = "def parse(s, parsing_timeout=5, raise_on_error=False, **kw):\n    return [s]\n"
FAKE_MATH_VERIFY = {
    # not installed / its LaTeX parser missing at import time
    "import_fails": "raise ImportError(\"No module named 'antlr4'\")\n",
    # installed without its LaTeX parser: parse swallows the ImportError and finds nothing
    "parser_missing": (
        "def parse(s, parsing_timeout=5, raise_on_error=False, **kw):\n"
        "    if raise_on_error:\n"
        "        raise ImportError('antlr4-python3-runtime is not installed')\n"
        "    return []\n"
        "def verify(*a, **kw):\n    return False\n"
    ),
    # parses nothing, silently
    "parses_nothing": "def parse(*a, **kw):\n    return []\ndef verify(*a, **kw):\n    return True\n",
    # every comparison raises inside math-verify (which, left alone, returns False)
    "compare_raises": _PARSE_OK
    + (
        "def verify(g, t, timeout_seconds=5, raise_on_error=False, **kw):\n"
        "    if raise_on_error:\n"
        "        raise TypeError('cannot compare')\n"
        "    return False\n"
    ),
    # answers, but wrongly: everything is equal
    "always_equal": _PARSE_OK + "def verify(*a, **kw):\n    return True\n",
    # answers, but wrongly: nothing is equal
    "never_equal": _PARSE_OK + "def verify(*a, **kw):\n    return False\n",
    # the API changed under us
    "api_changed": "def parse(s):\n    return [s]\ndef verify(g, t):\n    return g == t\n",
    # the worker process dies importing it (a crashing native extension)
    "import_crashes": "import os\nos._exit(7)\n",
    # hangs on every check
    "hangs": "import time\n"
    + _PARSE_OK.replace("return [s]", "time.sleep(600)")
    + "def verify(*a, **kw):\n    return True\n",
}


def fake_math_verify(root, body: str) -> str:
    pkg = root / "math_verify"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(body)
    return str(root)


@pytest.mark.parametrize("kind", sorted(FAKE_MATH_VERIFY))
def test_preflight_refuses_a_broken_math_verify(tmp_path, monkeypatch, kind):
    from gen_ssd_ray.common import verify as verify_mod
    from gen_ssd_ray.common.errors import InputError

    monkeypatch.syspath_prepend(fake_math_verify(tmp_path, FAKE_MATH_VERIFY[kind]))
    t0 = time.monotonic()
    with pytest.raises(InputError) as e:
        verify_mod.check_verifier(timeout_s=1.0)
    msg = str(e.value)
    assert "\n" not in msg and "math-verify" in msg and "pip install 'math-verify[antlr4_13_2]" in msg
    if kind == "hangs":
        assert "runtime.verify_timeout_s" in msg
    assert time.monotonic() - t0 < 30


def test_preflight_passes_with_the_real_math_verify():
    from gen_ssd_ray.common.verify import check_verifier

    check_verifier(timeout_s=20.0)


def test_errors_inside_comparison_are_null_and_counted(tmp_path, monkeypatch):
    body = _PARSE_OK + (
        "def verify(g, t, timeout_seconds=5, raise_on_error=False, **kw):\n"
        "    if 'boom' in t:\n"
        "        if raise_on_error:\n"
        "            raise ValueError('sympy exploded')\n"
        "        return False\n"
        "    return g.strip() == t.strip()\n"
    )
    monkeypatch.syspath_prepend(fake_math_verify(tmp_path, body))
    with Verifier(workers=1, timeout_s=20.0) as v:
        out = v.verify_many([("1", "1"), ("1", "boom"), ("1", "2"), (None, "1"), ("2", "boom 2")])
        assert out == [True, None, False, None, None]  # an error is unknown, never False
        assert v.counters() == {"checks": 4, "errors": 2, "timeouts": 0, "lost": 0, "pool_restarts": 0}


def test_counters_count_errors_timeouts_and_lost_workers():
    # generous deadline: each fresh worker imports this test module before its first check
    with Verifier(workers=1, timeout_s=6.0, worker_fn=slow_check) as v:
        v.check([("0", "0", True), ("a", "0", False)])  # the preflight is not counted
        assert v.counters() == {"checks": 0, "errors": 0, "timeouts": 0, "lost": 0, "pool_restarts": 0}
        assert v.verify_many([("0", "raise"), ("x", "60"), ("x", "die"), ("0.1", "0.1")]) == [
            None,
            None,
            None,
            True,
        ]
        c = v.counters()
        assert (c["checks"], c["errors"], c["timeouts"], c["lost"]) == (4, 1, 1, 1)
        assert c["pool_restarts"] == 3  # the timeout, then the crash and its retry's crash
        with pytest.raises(InputError, match="should give True"):
            v.check([("x", "raise", True)])


# ---- a worker that dies while the pool is idle -----------------------------------------------------


def _worker_pids(v: Verifier) -> list[int]:
    return list((v._pool._processes or {}).keys())


def _kill_and_wait(pids: list[int]) -> None:
    import signal

    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    time.sleep(1.0)  # the pool's manager thread notices and marks the pool broken


@pytest.mark.parametrize("how", ["one", "all"])
def test_worker_killed_while_idle_is_replaced_transparently(how):
    with Verifier(workers=2, timeout_s=20.0) as v:
        assert v.verify("18", "18.0") is True
        pids = _worker_pids(v)
        assert pids  # started on demand: one or two
        _kill_and_wait(pids[:1] if how == "one" else pids)
        assert v.verify("1,000", "1000") is True
        assert v.verify_many([("18", "19"), ("0.5", "\\frac{1}{2}")]) == [False, True]
        assert v.counters()["pool_restarts"] == 1 and v.counters()["lost"] == 0
        assert not set(_worker_pids(v)) & set(pids)


def test_worker_killed_while_idle_repeatedly():
    with Verifier(workers=1, timeout_s=10.0, worker_fn=slow_check) as v:
        for _ in range(3):
            assert v.verify("0", "0") is True
            _kill_and_wait(_worker_pids(v))
        assert v.verify_many([("0", "0"), ("1", "0")]) == [True, False]
        assert v.counters()["pool_restarts"] == 3


def test_real_comparison_error_is_null_not_false():
    """A gold answer math-verify raises on when comparing (1/0: "Can't evaluate nan or zoo") was False."""
    with pytest.raises(Exception, match="zoo"):
        check_answer("1/0", "18")
    with Verifier(workers=1, timeout_s=20.0) as v:
        assert v.verify_many([("1/0", "18"), ("18", "18")]) == [None, True]
        assert v.counters()["errors"] == 1


_KILLED_JOB = """
import time
from gen_ssd_ray.common.verify import Verifier
v = Verifier(workers=2, timeout_s=10)
assert v.verify('1', '1') is True
print('PIDS', ' '.join(str(p) for p in v._pool._processes), flush=True)
time.sleep(120)
"""


def test_workers_exit_when_their_job_is_killed():
    """SIGKILL of the job (no cleanup runs): its verifier workers exit too, never idle forever."""
    import signal
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", _KILLED_JOB], stdout=subprocess.PIPE, text=True)
    try:
        line = next(line for line in proc.stdout if line.startswith("PIDS"))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    workers = [int(p) for p in line.split()[1:]]
    assert workers  # the pool starts workers as checks need them
    deadline = time.monotonic() + 30
    while (alive := [p for p in workers if _running(p)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive, f"workers {alive} outlived their job"


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
