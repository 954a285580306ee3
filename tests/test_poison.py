"""Poison problems (gen_ssd_ray.generate.solve.solve_all, gen_ssd_ray.generate.failures): a problem
that reliably breaks its infrastructure is counted across attempts and runs, confirmed alone, and
committed as an error row saying so; everything else in the run is unaffected.

The driver's real dispatch loop runs against fake beam managers (plain futures, no Ray cluster) that
fail on one specific problem in each way the infrastructure can fail: the manager dies with every
problem in flight on it, the engines are unavailable (the manager's answer), the problem hangs past
its deadline. Time is compressed (simulated engines' `sim.time_compression`), so backoffs and
deadlines are milliseconds.
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import Future
from pathlib import Path
from types import SimpleNamespace

import pytest
from ray.exceptions import ActorDiedError, RayTaskError

from gen_ssd_ray.common.dispatch import RayCalls
from gen_ssd_ray.common.errors import JobFailed
from gen_ssd_ray.generate.driver import RunStats
from gen_ssd_ray.generate.failures import FAILURES_NAME, FailureLedger
from gen_ssd_ray.generate.manager import EnginesUnavailable
from gen_ssd_ray.generate.solve import Managers, solve_all


def task_error(cause: Exception) -> Exception:
    return RayTaskError("solve", "Traceback ...", cause).as_instanceof_cause()


class FakeManager:
    """A beam manager whose `solve.remote(problem, engine)` is a future. `script[problem_id]` says what
    that problem does: ("die", after_s) kills the manager after_s seconds into the call (every call in
    flight on it fails with ActorDiedError; the manager is back at once, as a restarted actor);
    ("raise", exc) fails the call; ("hang",) never answers; ("slow", s) answers after s seconds.
    Anything else answers after `base_s`."""

    def __init__(self, script: dict, base_s: float = 0.005):
        self.script, self.base_s = script, base_s
        self.inflight: set[Future] = set()
        self.deaths = 0
        self.calls: list[str] = []
        self.lock = threading.Lock()
        self.solve = SimpleNamespace(remote=self._solve)
        self.timers: list[threading.Timer] = []

    def _later(self, s: float, fn) -> None:
        t = threading.Timer(s, fn)
        t.daemon = True
        self.timers.append(t)
        t.start()

    def _solve(self, problem, engine):
        fut: Future = Future()
        pid = problem.problem_id
        with self.lock:
            self.inflight.add(fut)
            self.calls.append(pid)
        what = self.script.get(pid, ("slow", self.base_s))
        if what[0] == "die":
            self._later(what[1], self._die)
        elif what[0] == "raise":
            self._settle(fut, exc=what[1])
        elif what[0] == "slow":
            self._later(
                what[1], lambda: self._settle(fut, result=[{"problem_id": pid, "status": "completed"}])
            )
        return fut

    def _settle(self, fut: Future, result=None, exc=None) -> None:
        with self.lock:
            if fut not in self.inflight:
                return
            self.inflight.discard(fut)
        if not fut.done():
            fut.set_exception(exc) if exc is not None else fut.set_result(result)

    def _die(self) -> None:
        with self.lock:
            victims, self.inflight = list(self.inflight), set()
            self.deaths += 1
        for fut in victims:
            if not fut.done():
                fut.set_exception(ActorDiedError())


def fake_calls() -> RayCalls:
    def cancel(fut):
        fut.cancel()

    return RayCalls(lambda fut, cb: fut.add_done_callback(lambda _: cb()), lambda fut: fut.result(), cancel)


def config(tmp_path, *extra):
    from gen_ssd_ray.sim.harness import sim_config

    return sim_config(
        [
            f"output.dir={tmp_path / 'out'}",
            "teacher.num_engines=2",
            "sim.time_compression=20000",  # call deadline 0.03 s, backoffs from 0.05 ms, cooldown 0.5 ms
            "runtime.max_problem_failures=3",
            *extra,
        ]
    )


def problems(ids):
    return [SimpleNamespace(problem_id=i, question=f"q {i}", gold_answer="1", error=None) for i in ids]


def run(cfg, script, ids, base_s=0.005):
    mgr = FakeManager(script, base_s)
    pools = SimpleNamespace(managers=[mgr])
    stats = RunStats(total=len(ids))
    ledger = FailureLedger(cfg.output.dir, cfg.runtime.max_problem_failures)
    out = {}
    for q, rows in solve_all(
        cfg, pools, problems(ids), "fp", stats, threading.Event(),
        calls=fake_calls(), capacity=4, ledger=ledger, ready=lambda m: None,
    ):  # fmt: skip
        assert q.problem_id not in out  # yielded (committed) once
        out[q.problem_id] = rows
    for t in mgr.timers:
        t.cancel()
    return out, stats, mgr


IDS = [f"p{i}" for i in range(12)]

POISONS = {
    "kills-its-manager": ("die", 0.003),
    "engines-unavailable": (
        "raise",
        task_error(EnginesUnavailable("expand@0: EngineDead; expand@1: EngineDead")),
    ),
    "hangs-past-its-deadline": ("hang",),
}


@pytest.mark.parametrize("what", POISONS.values(), ids=POISONS.keys())
def test_poison_problem_becomes_an_error_row_and_the_rest_commits(tmp_path, what):
    cfg = config(tmp_path, "runtime.max_attempts=50", "runtime.retry_window_s=1e9")
    out, stats, mgr = run(cfg, {"p3": what}, IDS)
    assert set(out) == set(IDS) and stats.failed == 0  # the run exits 0
    err = out["p3"][0]["error"]
    assert out["p3"][0]["status"] == "error"
    assert "infrastructure failed" in err and "runtime.max_problem_failures=3" in err, err
    assert all(r["status"] == "completed" for pid in IDS if pid != "p3" for r in out[pid])
    # the limit, then its confirmation (the suspects together, halved while they fail): never retried
    # for the whole retry window
    assert 3 < mgr.calls.count("p3") <= 3 + 1 + 4
    saved = json.loads((tmp_path / "out" / FAILURES_NAME).read_text())
    assert "p3" not in saved["problems"]  # committed: forgotten


def test_a_bystander_in_flight_at_every_death_is_confirmed_alone_and_committed(tmp_path):
    """`slow` is in flight on the manager each time the poison kills it, so it reaches the limit too;
    the confirmation (together, then halved) tells them apart."""
    cfg = config(tmp_path, "runtime.max_attempts=50", "runtime.retry_window_s=1e9")
    script = {"p3": ("die", 0.02), "slow": ("slow", 0.2)}
    out, stats, mgr = run(cfg, script, ["slow", "p3", "p5"])
    assert stats.failed == 0
    assert out["p3"][0]["status"] == "error" and "failed again alone" in out["p3"][0]["error"]
    assert out["slow"][0]["status"] == "completed" and out["p5"][0]["status"] == "completed"


def test_failures_count_across_runs_until_the_limit(tmp_path):
    """Each run gives a problem one attempt (max_attempts=1, no retry window): runs 1 and 2 leave it
    for a re-run (exit 1), run 3 reaches the limit and commits it as an error row (exit 0)."""
    cfg = config(tmp_path, "runtime.max_attempts=1", "runtime.retry_window_s=0")
    script = {"p1": ("raise", ActorDiedError())}  # its manager dies with only it in flight
    ids = ["p0", "p1", "p2"]
    for attempt in (1, 2):
        out, stats, _ = run(cfg, script, ids)
        assert stats.failed == 1 and "p1" not in out, attempt
        saved = json.loads((tmp_path / "out" / FAILURES_NAME).read_text())
        assert saved["problems"]["p1"]["count"] == attempt
        assert "ActorDiedError" in saved["problems"]["p1"]["last_error"]
        ids = ["p1"]  # the others are committed
    out, stats, mgr = run(cfg, script, ids)
    assert stats.failed == 0 and out["p1"][0]["status"] == "error"
    assert "infrastructure failed 4 times" in out["p1"][0]["error"]  # 3 + its confirmation alone
    assert mgr.calls == ["p1", "p1"]


def test_a_problem_already_at_the_limit_goes_straight_to_its_confirmation(tmp_path):
    cfg = config(tmp_path)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / FAILURES_NAME).write_text(
        json.dumps({"version": 1, "problems": {"p1": {"count": 3, "last_error": "ActorDiedError: x"}}})
    )
    out, stats, mgr = run(cfg, {}, ["p0", "p1"])  # it does not fail any more: committed normally
    assert out["p1"][0]["status"] == "completed" and stats.failed == 0
    assert mgr.calls == ["p0", "p1"]
    assert json.loads((out_dir / FAILURES_NAME).read_text())["problems"] == {}


def test_zero_never_gives_up(tmp_path):
    cfg = config(
        tmp_path, "runtime.max_problem_failures=0", "runtime.max_attempts=4", "runtime.retry_window_s=0"
    )
    out, stats, _ = run(cfg, {"p1": ("raise", ActorDiedError())}, ["p0", "p1"])
    assert "p1" not in out and "p0" in out and stats.failed == 1


@pytest.mark.parametrize("text", ["", "{", "[]", '{"version": 1, "problems": {"a": {"count": "x"}}}', "\0\0"])
def test_an_unreadable_ledger_is_moved_aside_and_counting_restarts(tmp_path, text):
    (tmp_path / FAILURES_NAME).write_text(text)
    ledger = FailureLedger(tmp_path, 3)
    assert ledger.problems == {}
    assert list(tmp_path.glob(f"{FAILURES_NAME}.corrupt-*"))
    ledger.record("a", "boom")
    ledger.save()
    assert json.loads((tmp_path / FAILURES_NAME).read_text())["problems"]["a"]["count"] == 1


@pytest.mark.parametrize("bad", ["-1", "1.5", "'x'"])
def test_max_problem_failures_is_validated(tmp_path, bad):
    from gen_ssd_ray.common.config import ConfigError

    with pytest.raises(ConfigError, match="runtime.max_problem_failures"):
        config(tmp_path, f"runtime.max_problem_failures={bad}").validate()


class Clock:
    t = 100.0

    def __call__(self) -> float:
        return self.t


def test_managers_down_for_good_are_replaced_once_then_the_job_stops():
    clock, replaced = Clock(), []
    m = Managers(1, cooldown_s=10.0, give_up_s=100.0, clock=clock, replace=replaced.append)
    m.failed(0)  # the only manager died (restarts exhausted: it never answers again)
    assert m.pick() == 0
    clock.t += 101.0
    assert m.pick() == 0 and replaced == [0]  # a new actor instead of aborting the run
    assert m.all_down_since is None and 0 not in m.health.until
    m.ok(0)  # the replacement answers: the run goes on
    m.failed(0)
    m.pick()
    clock.t += 101.0
    with pytest.raises(JobFailed, match="and so have their replacements"):
        m.pick()


def test_an_outage_is_not_counted_against_the_problems_waiting_in_it(tmp_path):
    """Every engine down for the manager's whole wait (PoolOutage) or a restarting manager: the
    problem never ran, so nothing is counted and it is left for a re-run, never an error row."""
    from ray.exceptions import ActorUnavailableError

    from gen_ssd_ray.generate.manager import PoolOutage

    cfg = config(
        tmp_path, "runtime.max_attempts=4", "runtime.retry_window_s=0", "runtime.max_problem_failures=1"
    )
    script = {
        "p1": ("raise", task_error(PoolOutage("expand: every engine of the pool is down"))),
        "p2": ("raise", ActorUnavailableError("restarting", None)),
    }
    out, stats, _ = run(cfg, script, ["p0", "p1", "p2"])
    assert set(out) == {"p0"} and stats.failed == 2
    assert FailureLedger(tmp_path / "out", 1).problems == {}  # nothing counted (nothing written)


def test_the_confirmation_keeps_to_the_admission_capacity(tmp_path):
    """Hundreds of problems at the limit together (a flapping pool charged them all): their
    confirmation puts no more in flight than the main loop would (capacity per engine x engines)."""
    cfg = config(tmp_path)
    out_dir = Path(cfg.output.dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ids = [f"p{i}" for i in range(200)]
    at_limit = {i: {"count": cfg.runtime.max_problem_failures, "last_error": "x"} for i in ids}
    (out_dir / FAILURES_NAME).write_text(json.dumps({"version": 1, "problems": at_limit}))
    mgr = FakeManager({}, 0.01)
    peak, solve = [0], mgr.solve.remote

    def counted(problem, engine):
        ref = solve(problem, engine)
        peak[0] = max(peak[0], len(mgr.inflight))
        return ref

    mgr.solve.remote = counted
    stats, ledger = RunStats(total=len(ids)), FailureLedger(cfg.output.dir, cfg.runtime.max_problem_failures)
    done = [
        q.problem_id
        for q, _ in solve_all(
            cfg,
            SimpleNamespace(managers=[mgr]),
            problems(ids),
            "fp",
            stats,
            threading.Event(),
            calls=fake_calls(),
            capacity=4,
            ledger=ledger,
            ready=lambda m: None,
        )  # fmt: skip
    ]
    assert sorted(done) == sorted(ids) and stats.failed == 0
    assert 0 < peak[0] <= 4 * cfg.teacher.num_engines


def test_problems_reaching_the_limit_together_are_saved_once_a_second(tmp_path, monkeypatch):
    import gen_ssd_ray.generate.failures as failures

    writes = []
    monkeypatch.setattr(failures, "atomic_write_json", lambda path, obj: writes.append(len(obj["problems"])))
    at_limit = {f"p{i}": {"count": 4, "last_error": "x"} for i in range(3000)}
    (tmp_path / FAILURES_NAME).write_text(json.dumps({"version": 1, "problems": at_limit}))
    ledger = FailureLedger(tmp_path, 5)
    for i in range(3000):  # a lost node: every problem it held reaches the limit at once
        ledger.record(f"p{i}", "EngineDead")
    assert len(writes) <= 2  # not 3000 rewrites of the whole file
    ledger.save()
    assert writes[-1] == 3000


def test_waits_for_actors_end_at_once_on_a_signal_and_at_their_deadline(monkeypatch):
    """`get_until` (the confirmation's and admission's wait for actors) never outlives Ctrl-C or its
    deadline: before, one `ray.get` waited up to runtime.startup_timeout_s whatever happened."""
    import time

    import ray
    from ray.exceptions import GetTimeoutError

    from gen_ssd_ray.generate.solve import Stopped, get_until

    monkeypatch.setattr(ray, "wait", lambda refs, num_returns, timeout: (time.sleep(timeout), ([], refs))[1])
    stop = threading.Event()
    threading.Timer(0.3, stop.set).start()
    t = time.monotonic()
    with pytest.raises(Stopped):
        get_until(["ref"], time.monotonic() + 600, stop, poll_s=0.1)
    assert time.monotonic() - t < 5
    with pytest.raises(GetTimeoutError):
        get_until(["ref"], time.monotonic() + 0.3, threading.Event(), poll_s=0.1)
