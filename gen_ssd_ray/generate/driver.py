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
committed as an error row saying so (gen_ssd_ray.generate.solve), so a problem that reliably kills its engine or
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
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from gen_ssd_ray.common.cluster import init_ray
from gen_ssd_ray.common.config import to_yaml
from gen_ssd_ray.common.errors import JobFailed, JobInterrupted
from gen_ssd_ray.common.tracking import open_tracker
from gen_ssd_ray.generate.config import GenerateConfig, run_fingerprint
from gen_ssd_ray.generate.content import check_resume, content_hash
from gen_ssd_ray.generate.output import OutputWriteError
from gen_ssd_ray.generate.rows import ERROR, PRUNED, TrajectoryRow
from gen_ssd_ray.generate.solve import replace_manager, solve_all

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
    # The journal (gen_ssd_ray.generate.journal): `resume/*` restored this run, `journal/*` written.
    resume: dict = field(default_factory=dict)
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
            **self.resume,
        }

    def metrics(self, done: int) -> dict[str, float | None]:
        """The run's figures so far for the trackers (gen_ssd_ray.common.tracking); `done`: problems
        committed in the folder, this run's and earlier ones."""
        elapsed, c, st = time.perf_counter() - self.started, self.costs, self.statuses
        trajectories, verified = sum(st.values()), self.verdicts[True] + self.verdicts[False]

        def frac(a: float, b: float) -> float | None:
            return a / b if b else None

        return {
            "generate/problems_done": done,
            "generate/progress": frac(done, self.total),
            "generate/problems_failed": self.failed,
            "generate/trajectories": trajectories,
            "generate/correct": self.verdicts[True],
            "generate/verified": verified,
            "teacher/tokens_per_s": frac(c["teacher_tokens_generated"], elapsed),
            "teacher/prefix_cache_hit_rate": frac(
                c["teacher_cached_prompt_tokens"], c["teacher_prompt_tokens"]
            ),
            "scorer/tokens_processed_per_scored": frac(
                c["student_tokens_processed"], c["student_tokens_scored"]
            ),
            "search/pruned_frac": frac(st[PRUNED], trajectories),
            "search/error_frac": frac(st[ERROR], trajectories),
            "search/correct_frac": frac(self.verdicts[True], verified),
            "generate/elapsed_s": elapsed,
        }


@dataclass
class Prepared:
    teacher_path: str
    student_path: str
    problems: Any  # a ProblemStream (gen_ssd_ray.common.data): iterable, with `count`
    writer: Any
    fingerprint: str

    def counts(self) -> dict[str, Any]:
        """What `prepare` counted, for the run's summary: the problems `data.decontaminate` dropped
        (they never reach the beam managers)."""
        return {"problems_dropped_contaminated": self.problems.dropped_contaminated}


def prepare(cfg: GenerateConfig) -> Prepared:
    """Everything that can fail on bad input, before any actor starts.

    Raises ModelNotFoundError, DataError, VerifierUnavailable, FingerprintMismatchError, ManifestError,
    OutputLockedError or ContentChangedError (InputErrors) with a message naming the config key and the fix.
    """
    from gen_ssd_ray.common.data import open_problems
    from gen_ssd_ray.common.models import resolve_model
    from gen_ssd_ray.common.verify import check_verifier
    from gen_ssd_ray.generate.output import ShardWriter

    teacher_path = resolve_model(cfg.teacher.model, "teacher.model", cfg.teacher.revision)
    student_path = resolve_model(cfg.student.model, "student.model", cfg.student.revision)
    check_models(cfg, teacher_path, student_path)
    # Checked now, read lazily as engines have room; problems overlapping data.decontaminate.against are
    # dropped here (one pass over the slice) and never reach the beam managers.
    problems = open_problems(cfg.data)
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
    from gen_ssd_ray.generate.metrics import JobMetrics, engine_metrics
    from gen_ssd_ray.generate.pools import build_pools, shutdown_pools

    p = prepared or prepare(cfg)
    journal = _open_journal(cfg, p)
    total = p.problems.count
    stats = RunStats(total=total or 0)
    committed = p.writer  # `in` looks up the committed-id index: memory bounded by it
    todo = _uncommitted(p.problems, committed, stats)
    first = next(todo, None)
    log.info("%s problems, %d already committed in %s", total, stats.skipped, cfg.output.dir)
    if first is None:
        p.writer.close()
        _finish_journal(journal, p.writer, stats, None)
        stats.total = stats.total or stats.skipped
        return {**stats.summary(cfg.output.dir), **p.counts()}
    todo = itertools.chain([first], todo)

    init_ray(cfg.runtime.ray_address, cfg.runtime.local_num_cpus)
    tracker = open_tracker(cfg.logging, "generate", cfg.output.dir, config=cfg)  # a no-op without backends
    # From here to the end a signal only sets a flag, never raises: engine start-up stops at once
    # (wait_ready checks the flag), the loop stops admitting work, and the last shard is committed even
    # if a second signal arrives.
    write_error: OutputWriteError | None = None  # a full disk: the job fails (exit 1), nothing is lost
    verifier_error: PoolUnavailable | None = None  # math-verify workers die as they start: exit 1
    with stop_on_signals() as stop:
        verifier = Verifier(workers=cfg.runtime.verify_workers, timeout_s=cfg.runtime.verify_timeout_s)
        progress = None
        ray_metrics = None
        own_pools = pools is None
        try:
            with engine_metrics(cfg.runtime.metrics):  # vLLM's engine metrics in the engines it starts
                pools = pools or build_pools(cfg, p.teacher_path, p.student_path)
            stats.started = time.perf_counter()  # rates exclude engine start-up
            already = min(total or 0, len(p.writer.committed_ids))  # skipped ones are counted lazily
            progress = Progress("generate", total, already, cfg.runtime.progress)
            todo_count = total - already if total else None
            ray_metrics = JobMetrics(cfg.output.dir, cfg.method, todo_count, enabled=cfg.runtime.metrics)
            todo = ray_metrics.admitting(todo)  # the dispatcher reads a problem when it hands it out
            replace = partial(replace_manager, cfg, pools, p.teacher_path, p.student_path)
            solved = solve_all(cfg, pools, todo, p.fingerprint, stats, stop, replace=replace, journal=journal)
            for problem, rows in solved:
                verifier.verify_rows(rows)
                _select(cfg.method, rows)
                if p.writer.add(problem.problem_id, rows, content_hash(problem)):
                    stats.shards_written += 1
                stats.add(rows)
                tokens = sum(r.get("teacher_tokens_generated") or 0 for r in rows)
                progress.update(1, tokens, pruned=stats.statuses["pruned"], errors=stats.statuses[ERROR])
                if tracker.enabled:  # no figures computed per problem when nothing tracks them
                    tracker.log(stats.metrics(progress.done), progress.done)
                ray_metrics.committed(rows, stats.failed)  # the Ray dashboard (gen_ssd_ray.generate.metrics)
                if journal is not None:
                    journal.done(problem.problem_id)
                    journal.maybe_compact(lambda: p.writer.committed_ids)
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
                    _flush_journals(pools, journal, cfg.effective().runtime.call_timeout_s)
                    stats.score_calls = _score_calls(pools)
                if p.writer.close():
                    stats.shards_written += 1
                _finish_journal(journal, p.writer, stats, pools)
            except OutputWriteError as e:  # never hides an error already on its way out
                write_error = write_error or e
            finally:
                if progress is not None:
                    progress.close()
                    tracker.log(stats.metrics(progress.done), progress.done)  # the end state
                tracker.close()
                if ray_metrics is not None:
                    ray_metrics.finish(stats.failed)
                stats.verifier = verifier.counters()
                verifier.close()
                if own_pools and pools is not None:
                    shutdown_pools(pools)
    summary = {**stats.summary(cfg.output.dir), **p.counts()}
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


def _open_journal(cfg: GenerateConfig, p: Prepared):
    """The run's journal (gen_ssd_ray.generate.journal), compacted, with what to restore; None when
    `runtime.journal_interval_s` is 0 or the journal cannot be read (the run goes on without it)."""
    from gen_ssd_ray.generate.journal import Journal

    interval = cfg.effective().runtime.journal_interval_s
    if interval <= 0:
        return None
    committed = p.writer.committed_ids
    try:
        return Journal.open(cfg.output.dir, p.fingerprint, committed.__contains__, interval)
    except OSError as e:
        log.warning(
            "journal: cannot open %s/_journal (%s); in-flight work is not journaled", cfg.output.dir, e
        )
        return None


def _flush_journals(pools, journal, timeout_s: float) -> None:
    """Ask every beam manager to write its buffered journal steps (a stop, SIGTERM, loses none of
    them), waiting at most `timeout_s`."""
    import ray

    if journal is None:
        return
    refs = [m.flush_journal.remote() for m in pools.managers]
    try:
        ray.wait(refs, num_returns=len(refs), timeout=max(5.0, timeout_s))
    except Exception as e:  # a manager lost: its steps since the last interval are regenerated
        log.warning("journal: flushing the beam managers failed (%s)", e)


def _finish_journal(journal, writer, stats: RunStats, pools) -> None:
    """Compact the journal against the committed problems and put its counters in the summary."""
    if journal is None:
        return
    journal.finish(writer.committed_ids)
    stats.resume = journal.counters()
    if pools is None:
        return
    import ray

    written: Counter = Counter()
    for m in pools.managers:
        try:
            per_uri = ray.get(m.stats.remote(), timeout=30).get("journal", {})
        except Exception:
            continue
        written.update(per_uri.get(journal.storage.uri, {}))
    stats.resume.update({f"journal/{k}_written": v for k, v in sorted(written.items())})


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


def _select(method: str, rows: list[TrajectoryRow]) -> None:
    """The method's pick for fine-tuning among a problem's verified trajectories (`selected`)."""
    from gen_ssd_ray.core.methods import get_method

    for r, keep in zip(rows, get_method(method).select(rows), strict=True):
        r["selected"] = keep


def format_summary(summary: dict[str, Any]) -> str:
    from gen_ssd_ray.common.storage import is_remote

    out = summary["output_dir"]  # an object-store URI as given; a local folder resolved
    out = out if is_remote(out) else Path(out).resolve()
    st = summary["trajectories_by_status"]
    lines = [
        "",
        f"Output: {out}",
        "  Parquet shards part-*.parquet (one row per trajectory), _manifest.{json,log} (committed shards),",
        "  _config.yaml (the resolved config). Read with pandas.read_parquet / pyarrow.dataset / ray.data",
        "  (after a forced redo of edited problems: gen_ssd_ray.generate.manifest.read_output, which drops the"
        " superseded rows).",
        f"Problems: {summary['problems_total']} total, {summary['problems_skipped_already_committed']} were already "
        f"committed, {summary['problems_done_this_run']} done in this run"
        + (
            f"; {summary['problems_dropped_contaminated']} dropped before generation as overlapping the "
            "evaluation set (data.decontaminate)."
            if "problems_dropped_contaminated" in summary
            else "."
        ),
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
