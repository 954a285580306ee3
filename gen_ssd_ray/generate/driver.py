"""The generation job's driver: everything `python -m jobs.generate` does, in order.

1. Resolve models and read the problems (failing before any actor starts on a bad model or file).
2. Open the output folder (refusing a different config fingerprint) and skip committed problems.
3. Start (or join) Ray, start teacher / scorer / beam-manager actors with resources from the config.
4. Feed problems to beam managers through the shared dispatcher (gen_ssd_ray.common.dispatch): bounded
   admission per teacher engine (`teacher.max_inflight_problems`), each problem pinned to the
   least-loaded engine (prefix-cache affinity) and sent to the least-loaded live manager; collect
   finished problems, verify answers, commit Parquet shards.
5. Show progress and end with a summary.

Failures: an infrastructure failure (a dead actor, engines unavailable, a missed deadline) is retried
up to `runtime.max_attempts`, then the problem is left uncommitted for a re-run (`JobFailed`, exit 1);
a failure of the problem itself becomes error rows. Infrastructure failures are also counted per
problem across attempts and runs (`_failures.json` in the output folder): a problem that reaches
`runtime.max_problem_failures` is confirmed alone after the others and, if it fails there too,
committed as an error row saying so (`solve_all`), so a problem that reliably kills its engine or
manager cannot make every re-run exit 1. A beam manager down for good is replaced by a new actor once.
A write that fails (a full disk) ends the job with `JobFailed` (exit 1) naming the folder; nothing
committed is lost. SIGINT/SIGTERM stop admitting work, commit what finished and end in
`JobInterrupted` (exit 130).

Exactly-once: a problem is committed only as part of a whole shard; a re-run skips committed ids.
Identity is content: each committed problem records its content hash; `prepare` refuses a resume over
changed content (exit 2), or with `output.force=true` redoes exactly the changed problems
(gen_ssd_ray.generate.content).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from gen_ssd_ray.common.cluster import init_ray
from gen_ssd_ray.common.config import to_yaml
from gen_ssd_ray.common.errors import JobFailed, JobInterrupted
from gen_ssd_ray.generate.config import GenerateConfig, run_fingerprint
from gen_ssd_ray.generate.content import check_resume, content_hash
from gen_ssd_ray.generate.output import OutputWriteError
from gen_ssd_ray.generate.rows import ERROR, TrajectoryRow

log = logging.getLogger("gen_ssd_ray")


# The cost columns of an output row that a run adds up.
COST_COLUMNS = (
    "teacher_tokens_generated",
    "student_tokens_processed",
    "student_tokens_scored",
    "teacher_prompt_tokens",
    "teacher_cached_prompt_tokens",
)


@dataclass
class RunStats:
    """What one run did: problem counts, trajectories by status, verdicts and summed costs."""

    total: int = 0
    skipped: int = 0
    problems_done: int = 0
    failed: int = 0  # left uncommitted for a re-run (engines failed on every attempt)
    interrupted: bool = False
    shards_written: int = 0
    statuses: Counter = field(default_factory=Counter)
    verdicts: Counter = field(default_factory=Counter)  # True / False; None (unverified) is not counted
    costs: Counter = field(default_factory=Counter)  # COST_COLUMNS summed
    dispatch: dict = field(default_factory=dict)  # admission and the dispatcher's counters
    score_calls: list = field(default_factory=list)  # per scorer, calls answered (all managers)
    # The answer checker's counters (checks, errors, timeouts, lost, pool_restarts): an error, timeout
    # or lost check leaves that trajectory unverified (`correct` null), never wrong.
    verifier: dict = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)

    def add(self, rows: list[TrajectoryRow]) -> None:
        self.problems_done += 1
        for r in rows:
            self.statuses[r["status"]] += 1
            if r.get("correct") is not None:
                self.verdicts[bool(r["correct"])] += 1
            self.costs.update({c: r.get(c) or 0 for c in COST_COLUMNS})

    def summary(self, out_dir: str) -> dict[str, Any]:
        elapsed = time.perf_counter() - self.started
        c = self.costs

        def ratio(a: str, b: str, digits: int) -> float | None:
            return round(c[a] / c[b], digits) if c[b] else None

        return {
            "output_dir": out_dir,
            "problems_total": self.total,
            "problems_skipped_already_committed": self.skipped,
            "problems_done_this_run": self.problems_done,
            "problems_failed_retry_later": self.failed,
            "interrupted": self.interrupted,
            "trajectories_by_status": dict(self.statuses),
            "correct": self.verdicts[True],
            "verified": self.verdicts[True] + self.verdicts[False],
            "teacher/tokens_generated": c["teacher_tokens_generated"],
            "teacher/tokens_per_s": round(c["teacher_tokens_generated"] / elapsed, 1) if elapsed else None,
            "teacher/prefix_cache_hit_rate": ratio(
                "teacher_cached_prompt_tokens", "teacher_prompt_tokens", 3
            ),
            "scorer/tokens_processed_per_scored": ratio(
                "student_tokens_processed", "student_tokens_scored", 3
            ),
            "scorer/calls": self.score_calls,
            # score calls of the busiest scorer over the idlest (1 is even; None: a scorer got none)
            "scorer/calls_max_over_min": round(max(self.score_calls) / min(self.score_calls), 3)
            if self.score_calls and min(self.score_calls)
            else None,
            "elapsed_s": round(elapsed, 1),
            "dispatch": self.dispatch,
            "verifier": self.verifier,
        }


@dataclass
class Prepared:
    teacher_path: str
    student_path: str
    problems: Any  # a ProblemStream (gen_ssd_ray.common.data): iterable, with `count`
    writer: Any
    fingerprint: str


def prepare(cfg: GenerateConfig) -> Prepared:
    """Everything that can fail on bad input, before any actor starts.

    Raises ModelNotFoundError, DataError, VerifierUnavailable, FingerprintMismatchError, ManifestError,
    OutputLockedError or ContentChangedError (InputErrors) with a message naming the config key and the fix.
    """
    from gen_ssd_ray.common.data import open_problems
    from gen_ssd_ray.common.models import resolve_model
    from gen_ssd_ray.common.verify import check_verifier
    from gen_ssd_ray.generate.output import ShardWriter

    teacher_path = resolve_model(cfg.teacher.model)
    student_path = resolve_model(cfg.student.model)
    check_models(cfg, teacher_path, student_path)
    problems = open_problems(cfg.data)  # checked now, read lazily as engines have room
    fp = run_fingerprint(cfg, teacher_path, student_path)
    check_verifier(cfg.runtime.verify_timeout_s)  # math-verify runs (else nothing could be selected)
    writer = ShardWriter(
        cfg.output.dir,
        fingerprint=fp,
        config_yaml=to_yaml(cfg),
        shard_size=cfg.output.shard_size,
        force=cfg.output.force,
    )
    try:
        check_resume(cfg, problems, writer)  # committed problems whose content changed since
    except BaseException:
        writer.close()
        raise
    return Prepared(teacher_path, student_path, problems, writer, fp)


def check_models(cfg: GenerateConfig, teacher_path: str, student_path: str) -> None:
    """What would fail every problem, as one InputError: the teacher's and the student's tokenizer and
    chat template with `cfg.prompt`, and room for a prompt in each context (gen_ssd_ray.common.prompts)."""
    from gen_ssd_ray.common.prompts import check_chat_model
    from gen_ssd_ray.generate.config import search_params
    from gen_ssd_ray.generate.manager import _max_positions

    new = search_params(cfg).max_new_tokens
    t = cfg.teacher
    check_chat_model(
        teacher_path,
        f"teacher.model={t.model!r}",
        cfg.prompt,
        t.trust_remote_code,
        max_prompt_tokens=t.max_model_len - new,
        budget=f"teacher.max_model_len={t.max_model_len} - search.max_new_tokens={new}",
    )
    s = cfg.student
    positions = _max_positions(student_path, s.trust_remote_code)
    check_chat_model(
        student_path,
        f"student.model={s.model!r}",
        cfg.prompt,
        s.trust_remote_code,
        max_prompt_tokens=positions - new if positions else None,
        budget=f"the student's max_position_embeddings={positions} - search.max_new_tokens={new}",
    )


def run_generate(cfg: GenerateConfig, prepared: Prepared | None = None, pools=None) -> dict[str, Any]:
    """Run the job and return its summary (interrupted runs and problems left for a re-run are in it:
    `check_finished` turns them into the shared failure model). `pools` (from `build_pools`) lets a
    caller such as the pipeline or the benchmark reuse live actors."""
    from gen_ssd_ray.common.interrupts import stop_on_signals
    from gen_ssd_ray.common.progress import Progress
    from gen_ssd_ray.common.verify import PoolUnavailable, Verifier
    from gen_ssd_ray.generate.pools import build_pools, shutdown_pools

    p = prepared or prepare(cfg)
    total = p.problems.count
    stats = RunStats(total=total or 0)
    committed = p.writer  # `in` looks up the committed-id index: memory bounded by it
    todo = _uncommitted(p.problems, committed, stats)
    first = next(todo, None)
    log.info("%s problems, %d already committed in %s", total, stats.skipped, cfg.output.dir)
    if first is None:
        p.writer.close()
        stats.total = stats.total or stats.skipped
        return stats.summary(cfg.output.dir)
    todo = itertools.chain([first], todo)

    init_ray(cfg.runtime.ray_address, cfg.runtime.local_num_cpus)
    # From here to the end a signal only sets a flag, never raises: engine start-up stops at once
    # (wait_ready checks the flag), the loop stops admitting work, and the last shard is committed even
    # if a second signal arrives.
    write_error: OutputWriteError | None = None  # a full disk: the job fails (exit 1), nothing is lost
    verifier_error: PoolUnavailable | None = None  # math-verify workers die as they start: exit 1
    with stop_on_signals() as stop:
        verifier = Verifier(workers=cfg.runtime.verify_workers, timeout_s=cfg.runtime.verify_timeout_s)
        progress = None
        own_pools = pools is None
        try:
            pools = pools or build_pools(cfg, p.teacher_path, p.student_path)
            stats.started = time.perf_counter()  # rates exclude engine start-up
            already = min(total or 0, len(p.writer.committed_ids))  # skipped ones are counted lazily
            progress = Progress("generate", total, already, cfg.runtime.progress)
            replace = partial(_replace_manager, cfg, pools, p.teacher_path, p.student_path)
            for problem, rows in solve_all(cfg, pools, todo, p.fingerprint, stats, stop, replace=replace):
                verifier.verify_rows(rows)
                _select(cfg.method, rows)
                if p.writer.add(problem.problem_id, rows, content_hash(problem)):
                    stats.shards_written += 1
                stats.add(rows)
                tokens = sum(r.get("teacher_tokens_generated") or 0 for r in rows)
                progress.update(1, tokens, pruned=stats.statuses["pruned"], errors=stats.statuses[ERROR])
            stats.interrupted = stop.is_set()
            if stats.interrupted:
                log.warning(
                    "interrupted: committed the finished problems; re-run the same command to continue"
                )
        except OutputWriteError as e:
            write_error = e
        except PoolUnavailable as e:
            verifier_error = e
        finally:
            try:
                if pools is not None:
                    stats.score_calls = _score_calls(pools)
                if p.writer.close():
                    stats.shards_written += 1
            except OutputWriteError as e:  # never hides an error already on its way out
                write_error = write_error or e
            finally:
                if progress is not None:
                    progress.close()
                stats.verifier = verifier.counters()
                verifier.close()
                if own_pools and pools is not None:
                    shutdown_pools(pools)
    summary = stats.summary(cfg.output.dir)
    summary["teacher_model_path"], summary["student_model_path"] = p.teacher_path, p.student_path
    if write_error is not None:
        raise JobFailed(str(write_error), summary) from write_error
    if verifier_error is not None:
        raise JobFailed(
            f"the answer checker (math-verify) stopped working: {verifier_error}; committed problems are "
            "kept, re-run the same command to continue",
            summary,
        ) from verifier_error
    return summary


def _score_calls(pools) -> list[int]:
    """Score calls answered per scorer, summed over the live beam managers ([] if none answers)."""
    import ray

    total: list[int] = []
    for m in pools.managers:
        try:
            calls = ray.get(m.stats.remote(), timeout=30)["score_calls"]
        except Exception:  # a manager lost with its node: its counts are gone
            continue
        total = [a + b for a, b in zip(total, calls, strict=True)] if total else list(calls)
    return total


def _uncommitted(problems, writer, stats: RunStats) -> Iterator:
    """The problems not committed yet, lazily; counts the skipped ones in `stats`."""
    for q in problems:
        if q.problem_id in writer:
            stats.skipped += 1
        else:
            yield q
    stats.total = stats.total or stats.skipped + stats.problems_done + stats.failed


def check_finished(summary: dict[str, Any], what: str = "generation") -> dict[str, Any]:
    """The summary of a finished run; JobInterrupted / JobFailed (carrying it) otherwise."""
    if summary.get("interrupted"):
        raise JobInterrupted(f"{what} interrupted; finished problems are committed", summary)
    if summary.get("problems_failed_retry_later"):
        raise JobFailed(
            f"{what}: {summary['problems_failed_retry_later']} problems were not committed because engines "
            "failed (see the log); re-run the same command to retry them",
            summary,
        )
    return summary


class _Managers:
    """Which manager runs which call: the least-loaded usable manager gets the next problem.

    A manager whose actor failed (it died with its node and Ray restarts it, or it was killed) cools
    down like an engine (gen_ssd_ray.generate.health): its problems are retried on the others, and
    after the cooldown it gets a problem again (a restarted one answers it; a dead one fails again
    and cools down twice as long). Failures while it cools down do not count. When every manager has
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
        usable = [i for i in range(len(self.load)) if i not in h.until or i in h.probing]
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

    `calls`, `capacity`, `ledger`, `ready` (wait until manager i answers) and `replace` (start a new
    manager i) default to the Ray versions; tests pass fakes."""
    from ray.exceptions import RayActorError, RayTaskError

    from gen_ssd_ray.common.dispatch import Dispatcher, ray_calls
    from gen_ssd_ray.generate.failures import FailureLedger

    r = cfg.effective().runtime  # deadlines in wall-clock seconds (simulated engines: compressed)
    calls = calls or ray_calls()
    ledger = ledger if ledger is not None else FailureLedger(cfg.output.dir, r.max_problem_failures)
    managers = _Managers(
        len(pools.managers), r.engine_cooldown_s, give_up_s=r.startup_timeout_s, replace=replace
    )
    quarantine: list = []  # problems at the limit: confirmed alone after the others
    pinned: dict[Any, int] = {}  # problem id -> the manager its confirmation runs on

    def submit(problem, engine: int, attempt: int):
        m = pinned.get(problem.problem_id)
        if m is None:
            m = managers.pick()
        ref = pools.managers[m].solve.remote(problem, engine)
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
                except _Stopped:
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
        ready = partial(_wait_ready, pools, cfg.effective().runtime.startup_timeout_s, stop)
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
        except _Stopped:
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


def _wait_ready(pools, timeout_s: float, stop, m: int) -> None:
    """Until beam manager `m` and every engine actor answer (restarted ones have loaded their model).
    Raises GetTimeoutError after `timeout_s`, `_Stopped` as soon as `stop` is set (Ctrl-C)."""
    from ray.exceptions import ActorUnavailableError

    from gen_ssd_ray.engines.actors import actors_of

    actors = [pools.managers[m], *actors_of(pools.teachers), *actors_of(pools.scorers)]
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            _get([a.ready.remote() for a in actors], deadline, stop)
            return
        except ActorUnavailableError:  # restarting: ask again until it is back
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


class _Stopped(Exception):
    """A wait ended because the job was asked to stop (SIGINT / SIGTERM)."""


def _get(refs: list, deadline: float, stop, poll_s: float = 1.0) -> list:
    """`ray.get(refs)`, waiting in `poll_s` slices until the monotonic `deadline` (GetTimeoutError) and
    ending at once with `_Stopped` when `stop` is set: no wait here outlives a Ctrl-C."""
    import ray
    from ray.exceptions import GetTimeoutError

    while True:
        if stop is not None and stop.is_set():
            raise _Stopped()
        left = deadline - time.monotonic()
        if left <= 0:
            raise GetTimeoutError(f"{len(refs)} actors did not answer in time")
        _, pending = ray.wait(refs, num_returns=len(refs), timeout=min(poll_s, left))
        if not pending:
            return ray.get(refs)


def _replace_manager(cfg: GenerateConfig, pools, teacher_path: str, student_path: str, m: int) -> None:
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
    runtime.startup_timeout_s for the actors (GetTimeoutError), and ends with `_Stopped` on a signal."""
    from gen_ssd_ray.engines.actors import actors_of
    from gen_ssd_ray.generate.admission import inflight_per_engine

    deadline = time.monotonic() + cfg.effective().runtime.startup_timeout_s
    ready = _get([a.ready.remote() for a in actors_of(pools.teachers)], deadline, stop)
    caps = [c for info in ready for c in info.get("capacity", [])]
    scorers = _get([a.ready.remote() for a in actors_of(pools.scorers)], deadline, stop)
    scorer_kv = [c["kv_tokens"] for info in scorers for c in info.get("capacity", []) if c]
    prompt = len(_get([pools.managers[0].render_prompt_ids.remote(sample.question)], deadline, stop)[0])
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


def _select(method: str, rows: list[TrajectoryRow]) -> None:
    """The method's pick for fine-tuning among a problem's verified trajectories (`selected`)."""
    from gen_ssd_ray.core.methods import get_method

    for r, keep in zip(rows, get_method(method).select(rows), strict=True):
        r["selected"] = keep


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


def format_summary(summary: dict[str, Any]) -> str:
    out = Path(summary["output_dir"]).resolve()
    st = summary["trajectories_by_status"]
    lines = [
        "",
        f"Output: {out}",
        "  Parquet shards part-*.parquet (one row per trajectory), _manifest.{json,log} (committed shards),",
        "  _config.yaml (the resolved config). Read with pandas.read_parquet / pyarrow.dataset / ray.data",
        "  (after a forced redo of edited problems: gen_ssd_ray.generate.output.read_output, which drops the"
        " superseded rows).",
        f"Problems: {summary['problems_total']} total, {summary['problems_skipped_already_committed']} were already "
        f"committed, {summary['problems_done_this_run']} done in this run.",
        "Trajectories: "
        + (", ".join(f"{k} {v}" for k, v in sorted(st.items())) or "none this run")
        + "  (completed = ended with EOS; pruned = every candidate above search.prune_ppl;"
        " truncated = hit search.max_new_tokens; error = see the `error` column)",
        f"Correct: {summary['correct']} of {summary['verified']} verified completed trajectories.",
        f"Teacher: {summary['teacher/tokens_generated']} tokens, {summary['teacher/tokens_per_s']} tok/s, "
        f"prefix-cache hit rate {summary['teacher/prefix_cache_hit_rate']}; scorer tokens processed per token "
        f"scored {summary['scorer/tokens_processed_per_scored']}. Elapsed {summary['elapsed_s']} s.",
        "Re-running the same command resumes: committed problems are skipped.",
    ]
    v = summary.get("verifier") or {}
    if unchecked := v.get("errors", 0) + v.get("timeouts", 0) + v.get("lost", 0):
        lines.append(
            f"Answer checks: {unchecked} of {v.get('checks', 0)} failed ({v.get('errors', 0)} errors, "
            f"{v.get('timeouts', 0)} timeouts, {v.get('lost', 0)} lost); those trajectories are unverified."
        )
    if summary.get("problems_failed_retry_later"):
        lines.append(
            f"{summary['problems_failed_retry_later']} problems were not committed because engines failed "
            "(see the log); re-run the same command to retry them."
        )
    return "\n".join(lines)
