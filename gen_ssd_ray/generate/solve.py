"""Solving problems on the beam managers: `solve_all`, the loop between the generation driver
(gen_ssd_ray.generate.driver, which reads problems and commits rows) and the actors.

What it knows:
- `solve_all` feeds problems to beam managers through the shared dispatcher (gen_ssd_ray.common.dispatch):
  bounded admission per teacher engine (`admission`, from the engines' KV capacity), each problem pinned
  to the least-loaded engine and sent to the least-loaded live manager (`Managers`); it yields
  `(problem, rows)` as problems finish, error rows (`error_rows`) for problems that fail by themselves.
- Infrastructure failures (`is_transient`) are retried; each is counted per problem across attempts
  and runs (gen_ssd_ray.generate.failures). A problem at `runtime.max_problem_failures` leaves the main
  loop and is confirmed alone after the others (`_confirm`), so a poison problem becomes an error row
  instead of failing every run, and bystanders commit normally.
- Every wait for actors (`get_until`, `wait_ready`) is bounded by runtime.startup_timeout_s and ends at
  once on a signal (`Stopped`).

What it does not know: files, verification, selection, the summary (the driver's).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Iterator
from functools import partial
from typing import TYPE_CHECKING, Any

from gen_ssd_ray.common.errors import JobFailed
from gen_ssd_ray.generate.config import GenerateConfig
from gen_ssd_ray.generate.rows import ERROR, TrajectoryRow

if TYPE_CHECKING:
    from gen_ssd_ray.generate.driver import RunStats

log = logging.getLogger("gen_ssd_ray")


class Managers:
    """Which manager runs which call: the least-loaded usable manager gets the next problem.

    A manager whose actor failed (it died with its node and Ray restarts it, or it was killed) cools
    down like an engine (gen_ssd_ray.generate.health): its problems are retried on the others, and
    after the cooldown it gets one problem, the probe, and no other until that one ends (a restarted
    one answers it; a dead one fails again and cools down twice as long). Failures while it cools down do not count. When every manager has
    been down for `give_up_s` (a restart takes at most the start-up timeout), each is replaced by a
    new actor (`replace(i)`, once per run); when the replacements stay down as long too (or there is
    no `replace`), the job stops."""

    def __init__(
        self,
        count: int,
        cooldown_s: float,
        give_up_s: float,
        clock: Callable[[], float] = time.monotonic,
        replace: Callable[[int], None] | None = None,
    ):
        from gen_ssd_ray.generate.health import PoolHealth

        self.load = [0] * count
        self.health = PoolHealth(count, base_s=cooldown_s, max_s=32 * cooldown_s, clock=clock)
        self.give_up_s, self.clock = give_up_s, clock
        self.of: dict[Any, int] = {}
        self.all_down_since: float | None = None
        self.replace, self.replaced = replace, 0

    def pick(self) -> int:
        h = self.health
        if self.all_down_since is not None and self.clock() - self.all_down_since > self.give_up_s:
            if self.replace is None or self.replaced:
                raise JobFailed(
                    f"every beam manager has been down for {self.give_up_s:g} s"
                    + (" (and so have their replacements)" if self.replaced else "")
                    + "; see the actor logs above, then re-run the same command"
                )
            for i in sorted(h.until):
                self.replace(i)  # a new actor: calls in flight on the old one fail and are retried
                h.ok(i)
            self.replaced += 1
            self.all_down_since = None
        h.due_probes()  # a manager's cooldown ended: its next problem is the probe
        # A probing manager gets one problem until it answers: least-loaded would otherwise send it
        # every new problem (its failed calls left it empty) while it may still be restarting.
        usable = [
            i for i in range(len(self.load)) if i not in h.until or (i in h.probing and self.load[i] == 0)
        ]
        if usable:
            return min(usable, key=self.load.__getitem__)
        if self.all_down_since is None:  # until one of them answers again (`ok`)
            self.all_down_since = self.clock()
        return min(h.until, key=h.until.__getitem__)  # the first one back (fails fast if it is not)

    def failed(self, m: int) -> None:
        h = self.health
        if m not in h.until or m in h.probing:  # not already cooling down: this failure counts
            h.probed(m, False)

    def ok(self, m: int) -> None:
        self.health.ok(m)
        self.all_down_since = None

    def started(self, ref, m: int) -> None:
        self.of[ref] = m
        self.load[m] += 1

    def finished(self, ref) -> int:
        m = self.of.pop(ref)
        self.load[m] -= 1
        return m


def solve_all(
    cfg: GenerateConfig,
    pools,
    todo: list | Iterator,
    fingerprint: str,
    stats: RunStats,
    stop,
    *,
    calls=None,
    capacity: int | None = None,
    ledger=None,
    ready: Callable[[int], None] | None = None,
    replace: Callable[[int], None] | None = None,
    journal=None,
) -> Iterator[tuple[Any, list[TrajectoryRow]]]:
    """Yield `(problem, rows)` as problems finish (error rows for problems that fail by themselves);
    problems whose infrastructure kept failing (runtime.max_attempts times, and for longer than
    runtime.call_timeout_s, retried with backoff meanwhile) are counted in `stats.failed` instead.
    `todo` is read lazily, as engines have room.

    Poison problems: every infrastructure failure of a problem is counted in the output folder's
    `_failures.json` (gen_ssd_ray.generate.failures), across attempts and runs. A problem whose count
    reaches `runtime.max_problem_failures` leaves the main loop (so it cannot kill managers or engines
    that the others need) and, once the others are done, is confirmed alone (`_confirm`): problems at
    the limit run together on one beam manager and the group is halved while it fails, so a problem
    that fails alone is committed as an error row naming its count and last error, and bystanders
    (failures count against every problem in flight where they struck) are committed normally.

    `journal` (gen_ssd_ray.generate.journal.Journal, or None): each problem is sent with its journaled
    trajectories to restore and the target its manager journals to.

    `calls`, `capacity`, `ledger`, `ready` (wait until manager i answers) and `replace` (start a new
    manager i) default to the Ray versions; tests pass fakes."""
    from ray.exceptions import RayActorError, RayTaskError

    from gen_ssd_ray.common.dispatch import Dispatcher, ray_calls
    from gen_ssd_ray.generate.failures import FailureLedger

    r = cfg.effective().runtime  # deadlines in wall-clock seconds (simulated engines: compressed)
    calls = calls or ray_calls()
    ledger = ledger if ledger is not None else FailureLedger(cfg.output.dir, r.max_problem_failures)
    managers = Managers(
        len(pools.managers), r.engine_cooldown_s, give_up_s=r.startup_timeout_s, replace=replace
    )
    quarantine: list = []  # problems at the limit: confirmed alone after the others
    pinned: dict[Any, int] = {}  # problem id -> the manager its confirmation runs on

    def submit(problem, engine: int, attempt: int):
        m = pinned.get(problem.problem_id)
        if m is None:
            m = managers.pick()
        if journal is None:
            ref = pools.managers[m].solve.remote(problem, engine)
        else:
            ref = pools.managers[m].solve.remote(problem, engine, journal.take(problem), journal.target)
        managers.started(ref, m)
        return ref

    def get(ref):
        m = managers.finished(ref)
        try:
            out = calls.get(ref)
        except RayActorError as e:
            # The manager itself failed (a RayTaskError is the manager's answer: engine deaths arrive
            # as EnginesUnavailable, even when their cause is an actor error).
            if not isinstance(e, RayTaskError):
                managers.failed(m)
            raise
        except Exception:
            managers.ok(m)
            raise
        managers.ok(m)
        return out

    def cancel(ref) -> None:
        managers.finished(ref)
        calls.cancel(ref)

    def count(problem, exc: BaseException | None, error: str) -> bool | None:
        """Count an infrastructure failure against the problem: whether it reached the limit; None
        when the failure is not the problem's (it never ran: its manager was restarting, or no engine
        of a pool came back within the manager's wait, an outage)."""
        if _never_ran(exc):
            return None
        ledger.record(problem.problem_id, error)
        return ledger.at_limit(problem.problem_id)

    def on_transient(problem, exc, error):
        if count(problem, exc, error):
            quarantine.append(problem)
            return _QUARANTINED
        return None

    def main_loop(items) -> Iterator:
        for q in items:  # at the limit since an earlier run: straight to the confirmation
            if ledger.at_limit(q.problem_id):
                quarantine.append(q)
            else:
                yield q

    steps = -(-cfg.search.max_new_tokens // cfg.search.chunk_tokens)
    compression = r.call_timeout_s / cfg.runtime.call_timeout_s
    deadline_s = r.call_timeout_s * 2 * (2 * steps + 2)

    def dispatcher(capacity: int, max_attempts: int, retry_window_s: float, hook) -> Dispatcher:
        return Dispatcher(
            num_workers=cfg.teacher.num_engines,
            capacity=capacity,
            submit=submit,
            watch=calls.watch,
            get=get,
            cancel=cancel,
            # A liveness bound for a problem, not flow control: each of its calls may take its own
            # deadline and a late-but-advancing grace (gen_ssd_ray.generate.manager).
            deadline_s=deadline_s,
            max_attempts=max_attempts,
            # while engines are missing (a lost node the autoscaler replaces), problems wait this long
            retry_window_s=retry_window_s,
            initial_backoff_s=1.0 * compression,
            max_backoff_s=60.0 * compression,
            is_transient=is_transient,
            describe=lambda q: f"problem {q.problem_id}",
            stop=stop,
            on_transient=hook,
        )

    todo = main_loop(iter(todo))
    first = next(todo, None)
    try:
        if first is not None:
            if capacity is None:
                try:
                    capacity = admission(cfg, pools, first, stop)
                except Stopped:
                    stats.failed += 1
                    return
            d = dispatcher(capacity, r.max_attempts, r.retry_window_s, on_transient)
            stats.dispatch = {"inflight_per_engine": capacity, "started_at": time.time()}
            for out in d.run(itertools.chain([first], _noting_last(todo, stats.dispatch))):
                if out.ok:
                    ledger.forget(out.item.problem_id)
                    yield out.item, out.result
                elif out.error == _QUARANTINED:
                    continue
                elif out.transient:
                    log.error(
                        "problem %s left for a re-run after %d attempts: %s",
                        out.item.problem_id,
                        out.attempts,
                        out.error,
                    )
                    stats.failed += 1
                else:
                    ledger.forget(out.item.problem_id)
                    yield out.item, error_rows(cfg, out.item, out.error, fingerprint)
                stats.dispatch.update(
                    peak_in_flight=d.stats.peak_in_flight, retries=d.stats.retries, results=d.stats.results
                )
            stats.dispatch["ms_per_result_p99"] = round(d.stats.loop_s.quantile(0.99) * 1e3, 3)
        if quarantine and not stop.is_set():
            yield from _confirm(
                cfg,
                quarantine,
                ledger,
                managers,
                pinned,
                dispatcher,
                count,
                ready,
                pools,
                fingerprint,
                stats,
                stop,
                capacity,
            )
        elif quarantine:
            stats.failed += len(quarantine)
    finally:
        ledger.save()


_QUARANTINED = "__quarantined__"  # an Outcome's error: the problem waits for its confirmation alone


def _never_ran(exc: BaseException | None) -> bool:
    """A failure that is not the problem's: its manager was restarting (ActorUnavailableError) or
    every engine of a pool stayed down for the manager's whole wait (PoolOutage)."""
    from ray.exceptions import ActorUnavailableError

    from gen_ssd_ray.generate.manager import PoolOutage

    return isinstance(exc, ActorUnavailableError | PoolOutage) or isinstance(
        getattr(exc, "cause", None), PoolOutage
    )


def _confirm(
    cfg,
    quarantine,
    ledger,
    managers,
    pinned,
    dispatcher,
    count,
    ready,
    pools,
    fingerprint,
    stats,
    stop,
    capacity: int | None,
):
    """Confirm problems at `runtime.max_problem_failures` alone (see `solve_all`): each group runs on
    one manager once its engines are up, one attempt per problem; a group whose problems fail is
    halved, a problem that fails alone is committed as an error row, the others as usual. A failure
    that is not the problem's (an outage) is no verdict: the problem is tried again (3 times at most,
    then left for a re-run). `capacity` (problems in flight per engine, None: from `admission`) bounds
    a group's calls as in the main loop. Yields `(problem, rows)`."""
    import math

    if ready is None:
        ready = partial(wait_ready, pools, cfg.effective().runtime.startup_timeout_s, stop)
    limit = cfg.runtime.max_problem_failures
    log.warning(
        "%d problems reached runtime.max_problem_failures=%d infrastructure failures; confirming them "
        "alone on one beam manager",
        len(quarantine),
        limit,
    )
    groups = [list(quarantine)]
    quarantine.clear()
    outages: dict[str, int] = {}
    while groups:
        group = groups.pop(0)
        if stop.is_set():
            stats.failed += len(group) + sum(map(len, groups))
            return
        m = managers.pick()
        try:
            ready(m)
            if capacity is None:
                capacity = admission(cfg, pools, group[0], stop)
        except Stopped:
            stats.failed += len(group) + sum(map(len, groups))
            return
        except Exception as e:
            log.error("beam manager %d or its engines are not available for the confirmation (%s)", m, e)
            stats.failed += len(group) + sum(map(len, groups))
            return
        for q in group:
            pinned[q.problem_id] = m
        failed: list = []
        no_verdict: list = []
        missed: set = set()

        def hook(problem, exc, error, missed=missed):
            if count(problem, exc, error) is None:
                missed.add(problem.problem_id)
            return None

        d = dispatcher(min(capacity, math.ceil(len(group) / cfg.teacher.num_engines)), 1, 0.0, hook)
        for out in d.run(group):
            pinned.pop(out.item.problem_id, None)
            if out.ok:
                ledger.forget(out.item.problem_id)
                yield out.item, out.result
            elif not out.transient:
                ledger.forget(out.item.problem_id)
                yield out.item, error_rows(cfg, out.item, out.error, fingerprint)
            elif out.item.problem_id in missed:
                no_verdict.append(out.item)
            else:
                failed.append(out.item)
        if stop.is_set():
            stats.failed += len(failed) + len(no_verdict) + sum(map(len, groups))
            return
        for q in no_verdict:
            outages[q.problem_id] = outages.get(q.problem_id, 0) + 1
        retry = [q for q in no_verdict if outages[q.problem_id] <= 3]
        stats.failed += len(no_verdict) - len(retry)
        if retry:
            groups.append(retry)
        if len(group) == 1 and failed:
            q = failed[0]
            n = ledger.count(q.problem_id)
            reason = (
                f"infrastructure failed {n} times on this problem (runtime.max_problem_failures={limit}, "
                f"counted across runs; it failed again alone on one beam manager); last: "
                f"{ledger.last_error(q.problem_id)}"
            )
            log.error("problem %s committed as an error row: %s", q.problem_id, reason)
            ledger.forget(q.problem_id)
            yield q, error_rows(cfg, q, reason, fingerprint)
        elif failed and len(failed) == len(group):
            half = len(failed) // 2
            groups[:0] = [failed[:half], failed[half:]]
        elif failed:
            groups.insert(0, failed)


def wait_ready(pools, timeout_s: float, stop, m: int) -> None:
    """Until beam manager `m` and every engine actor answer (restarted ones have loaded their model).
    Raises GetTimeoutError after `timeout_s`, `Stopped` as soon as `stop` is set (Ctrl-C)."""
    from ray.exceptions import ActorUnavailableError

    from gen_ssd_ray.engines.actors import actors_of

    actors = [pools.managers[m], *actors_of(pools.teachers), *actors_of(pools.scorers)]
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            get_until([a.ready.remote() for a in actors], deadline, stop)
            return
        except ActorUnavailableError:  # restarting: ask again until it is back
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


class Stopped(Exception):
    """A wait ended because the job was asked to stop (SIGINT / SIGTERM)."""


def get_until(refs: list, deadline: float, stop, poll_s: float = 1.0) -> list:
    """`ray.get(refs)`, waiting in `poll_s` slices until the monotonic `deadline` (GetTimeoutError) and
    ending at once with `Stopped` when `stop` is set: no wait here outlives a Ctrl-C."""
    import ray
    from ray.exceptions import GetTimeoutError

    while True:
        if stop is not None and stop.is_set():
            raise Stopped()
        left = deadline - time.monotonic()
        if left <= 0:
            raise GetTimeoutError(f"{len(refs)} actors did not answer in time")
        _, pending = ray.wait(refs, num_returns=len(refs), timeout=min(poll_s, left))
        if not pending:
            return ray.get(refs)


def replace_manager(cfg: GenerateConfig, pools, teacher_path: str, student_path: str, m: int) -> None:
    """Start a new beam manager in place of manager `m` (the old actor is killed)."""
    import ray

    from gen_ssd_ray.common.config import derive
    from gen_ssd_ray.generate.pools import build_managers

    log.warning("replacing beam manager %d with a new actor", m)
    try:
        ray.kill(pools.managers[m])
    except Exception:  # already gone
        pass
    one = derive(cfg, {"runtime.num_beam_managers": 1})
    pools.managers[m] = build_managers(one, teacher_path, student_path, pools.teachers, pools.scorers)[0]


def _noting_last(items: Iterator, note: dict) -> Iterator:
    """`items`, noting in `note["last_admitted_at"]` when the last one was taken (the dispatcher reads
    lazily, so that is when the last problem was admitted)."""
    yield from items
    note["last_admitted_at"] = time.time()


def admission(cfg: GenerateConfig, pools, sample, stop=None) -> int:
    """Problems in flight per teacher engine from the engines' reported KV capacity (the smallest)
    and the length of a rendered prompt (gen_ssd_ray.generate.admission). Waits at most
    runtime.startup_timeout_s for the actors (GetTimeoutError), and ends with `Stopped` on a signal."""
    from gen_ssd_ray.engines.actors import actors_of
    from gen_ssd_ray.generate.admission import inflight_per_engine

    deadline = time.monotonic() + cfg.effective().runtime.startup_timeout_s
    ready = get_until([a.ready.remote() for a in actors_of(pools.teachers)], deadline, stop)
    caps = [c for info in ready for c in info.get("capacity", [])]
    scorers = get_until([a.ready.remote() for a in actors_of(pools.scorers)], deadline, stop)
    scorer_kv = [c["kv_tokens"] for info in scorers for c in info.get("capacity", []) if c]
    prompt = len(get_until([pools.managers[0].render_prompt_ids.remote(sample.question)], deadline, stop)[0])
    kv = min((c["kv_tokens"] for c in caps), default=0)
    seqs = min((c["max_num_seqs"] for c in caps), default=cfg.teacher.max_num_seqs)
    n = inflight_per_engine(cfg, kv, seqs, prompt, scorer_kv)
    log.info(
        "admission: %d problems in flight per teacher engine (teacher KV %d tokens, scorers' KV %d "
        "tokens, %d-token prompts, cap teacher.max_inflight_problems=%d)",
        n,
        kv,
        sum(scorer_kv),
        prompt,
        cfg.teacher.max_inflight_problems,
    )
    return n


def is_transient(exc: BaseException) -> bool:
    """Infrastructure failures (retry, never commit) versus a problem that fails deterministically.

    Transient: any Ray system error (actor or worker died, object lost, out of memory, cancelled),
    and errors raised inside a manager that say the engines were unavailable or too slow.
    Deterministic: any other exception raised by the manager's own code for this problem.
    """
    from ray.exceptions import RayError, RayTaskError

    from gen_ssd_ray.generate.manager import EnginesUnavailable

    if not isinstance(exc, RayTaskError):
        return isinstance(exc, RayError | EnginesUnavailable | TimeoutError)
    cause = getattr(exc, "cause", None)
    return isinstance(cause, EnginesUnavailable | TimeoutError | RayError)


def error_rows(cfg: GenerateConfig, problem, reason: str, fp: str) -> list[TrajectoryRow]:
    from gen_ssd_ray.generate.manager import trajectory_seed

    return [
        {
            "problem_id": problem.problem_id,
            "trajectory_index": i,
            "question": problem.question,
            "gold_answer": problem.gold_answer,
            "status": ERROR,
            "error": reason,
            "teacher_model": cfg.teacher.model,
            "student_model": cfg.student.model,
            "seed": trajectory_seed(cfg.search.seed, problem.problem_id, i),
            "config_fingerprint": fp,
            "method": cfg.method,
            "selected": False,
        }
        for i in range(cfg.search.trajectories_per_problem)
    ]
