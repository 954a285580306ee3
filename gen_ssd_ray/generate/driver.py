"""The generation job's driver: everything `python -m jobs.generate` does, in order.

1. Resolve models and read the problems (failing before any actor starts on a bad model or file).
2. Open the output folder (refusing a different config fingerprint) and skip committed problems.
3. Start (or join) Ray, start teacher / scorer / beam-manager actors with resources from the config.
4. Feed problems to beam managers with bounded admission per teacher engine, pinning each problem to
   the least-loaded engine; collect finished problems, verify answers, commit Parquet shards.
5. Show progress and end with a summary.

Exactly-once: a problem is committed only as part of a whole shard; a re-run skips committed ids.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gen_ssd_ray.common.cluster import init_ray
from gen_ssd_ray.generate.config import GenerateConfig, run_fingerprint, to_yaml

log = logging.getLogger("gen_ssd_ray")


@dataclass
class RunStats:
    total: int = 0
    skipped: int = 0
    statuses: Counter = field(default_factory=Counter)
    correct: int = 0
    verified: int = 0
    teacher_tokens: int = 0
    student_processed: int = 0
    student_scored: int = 0
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    problems_done: int = 0
    failed: int = 0
    interrupted: bool = False
    shards_written: int = 0
    started: float = field(default_factory=time.perf_counter)

    def add(self, rows: list[dict[str, Any]]) -> None:
        self.problems_done += 1
        for r in rows:
            self.statuses[r["status"]] += 1
            if r.get("correct") is not None:
                self.verified += 1
                self.correct += bool(r["correct"])
            self.teacher_tokens += r.get("teacher_tokens_generated") or 0
            self.student_processed += r.get("student_tokens_processed") or 0
            self.student_scored += r.get("student_tokens_scored") or 0
            self.prompt_tokens += r.get("teacher_prompt_tokens") or 0
            self.cached_prompt_tokens += r.get("teacher_cached_prompt_tokens") or 0

    def summary(self, out_dir: str) -> dict[str, Any]:
        elapsed = time.perf_counter() - self.started
        return {
            "output_dir": out_dir,
            "problems_total": self.total,
            "problems_skipped_already_committed": self.skipped,
            "problems_done_this_run": self.problems_done,
            "problems_failed_retry_later": self.failed,
            "interrupted": self.interrupted,
            "trajectories_by_status": dict(self.statuses),
            "correct": self.correct,
            "verified": self.verified,
            "teacher/tokens_generated": self.teacher_tokens,
            "teacher/tokens_per_s": round(self.teacher_tokens / elapsed, 1) if elapsed else None,
            "teacher/prefix_cache_hit_rate": round(self.cached_prompt_tokens / self.prompt_tokens, 3)
            if self.prompt_tokens
            else None,
            "scorer/tokens_processed_per_scored": round(self.student_processed / self.student_scored, 3)
            if self.student_scored
            else None,
            "elapsed_s": round(elapsed, 1),
        }


@dataclass
class Prepared:
    teacher_path: str
    student_path: str
    problems: list
    writer: Any
    fingerprint: str


def prepare(cfg: GenerateConfig) -> Prepared:
    """Everything that can fail on bad input, before any actor starts.

    Raises ModelNotFoundError, DataError or FingerprintMismatchError (all ValueErrors) with a message
    naming the config key and the fix.
    """
    from gen_ssd_ray.common.data import load_problems
    from gen_ssd_ray.common.models import resolve_model
    from gen_ssd_ray.generate.output import ShardWriter

    teacher_path = resolve_model(cfg.teacher.model)
    student_path = resolve_model(cfg.student.model)
    problems = load_problems(cfg.data)
    fp = run_fingerprint(cfg, teacher_path, student_path)
    writer = ShardWriter(
        cfg.output.dir,
        fingerprint=fp,
        config_yaml=to_yaml(cfg),
        shard_size=cfg.output.shard_size,
        force=cfg.output.force,
    )
    return Prepared(teacher_path, student_path, problems, writer, fp)


def run_generate(cfg: GenerateConfig, prepared: Prepared | None = None, pools=None) -> dict[str, Any]:
    """Run the job. `pools` (from `build_pools`) lets a caller such as the benchmark reuse live actors."""
    from gen_ssd_ray.common.progress import Progress
    from gen_ssd_ray.common.verify import Verifier
    from gen_ssd_ray.engines.actors import build_pools, shutdown_pools

    p = prepared or prepare(cfg)
    stats = RunStats(total=len(p.problems))
    committed = p.writer.committed_ids
    todo = [q for q in p.problems if q.problem_id not in committed]
    stats.skipped = len(p.problems) - len(todo)
    log.info("%d problems, %d already committed in %s", len(p.problems), stats.skipped, cfg.output.dir)
    if not todo:
        p.writer.close()
        return stats.summary(cfg.output.dir)

    init_ray(cfg.runtime.ray_address, cfg.runtime.local_num_cpus)
    stop = threading.Event()
    if threading.current_thread() is threading.main_thread():
        # Ctrl-C / `ray job stop` (SIGTERM): stop admitting work, commit what finished, exit 130.
        # Installed after ray.init, which sets its own SIGTERM handler; a flag, never an exception,
        # so a shard commit is never cut in half.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
    verifier = Verifier(workers=cfg.runtime.verify_workers, timeout_s=cfg.runtime.verify_timeout_s)
    progress = None
    own_pools = pools is None
    try:
        pools = pools or build_pools(cfg, p.teacher_path, p.student_path)
        stats.started = time.perf_counter()  # rates exclude engine start-up
        progress = Progress(total=len(p.problems), initial=stats.skipped, enabled=cfg.runtime.progress)
        for problem, rows in Dispatcher(cfg, pools, stats, p.fingerprint, stop).run(todo):
            _verify(verifier, rows)
            _select(cfg.method, rows)
            if p.writer.add(problem.problem_id, rows):
                stats.shards_written += 1
            stats.add(rows)
            progress.update(stats)
        if stop.is_set():
            stats.interrupted = True
            log.warning("interrupted: committed the finished problems; re-run the same command to continue")
    finally:
        if p.writer.close():
            stats.shards_written += 1
        if progress is not None:
            progress.close()
        verifier.close()
        if own_pools and pools is not None:
            shutdown_pools(pools)
    summary = stats.summary(cfg.output.dir)
    summary["teacher_model_path"], summary["student_model_path"] = p.teacher_path, p.student_path
    return summary


class Dispatcher:
    """Feeds problems to beam managers and yields `(problem, rows)` as they finish.

    Admission is bounded per teacher engine (`teacher.max_inflight_problems`); each new problem goes
    to the least-loaded engine (it stays there: prefix-cache affinity) and the least-loaded live
    manager. Every `solve` call has a deadline (enough for every step's calls to use their own
    deadline). Infrastructure failures are retried up to `runtime.max_attempts`, then left
    uncommitted for a re-run (counted in `stats.failed`); deterministic failures come back as error
    rows. Setting `stop` ends the loop after the current wait.
    """

    def __init__(
        self,
        cfg: GenerateConfig,
        pools,
        stats: RunStats,
        fingerprint: str,
        stop: threading.Event | None = None,
    ):
        self.cfg, self.pools, self.stats, self.fingerprint = cfg, pools, stats, fingerprint
        self.stop = stop or threading.Event()
        self.engine_load = [0] * cfg.teacher.num_engines
        self.manager_load = [0] * len(pools.managers)
        self.dead_managers: set[int] = set()
        # ref -> (problem, engine, manager, attempt, deadline)
        self.pending: dict[Any, tuple[Any, int, int, int, float]] = {}
        steps = -(-cfg.search.max_new_tokens // cfg.search.chunk_tokens)
        self.solve_timeout_s = cfg.runtime.call_timeout_s * (2 * steps + 2)
        self.queue: list[tuple[Any, int]] = []

    def _submit(self, problem, attempt: int) -> None:
        live = [i for i in range(len(self.manager_load)) if i not in self.dead_managers]
        if not live:
            raise RuntimeError("every beam manager died; see the actor logs above")
        e = min(range(len(self.engine_load)), key=self.engine_load.__getitem__)
        m = min(live, key=self.manager_load.__getitem__)
        ref = self.pools.managers[m].solve.remote(problem, e)
        self.pending[ref] = (problem, e, m, attempt, time.monotonic() + self.solve_timeout_s)
        self.engine_load[e] += 1
        self.manager_load[m] += 1

    def _pop(self, ref):
        problem, e, m, attempt, _ = self.pending.pop(ref)
        self.engine_load[e] -= 1
        self.manager_load[m] -= 1
        return problem, m, attempt

    def _retry_or_give_up(self, problem, attempt: int, reason: str) -> None:
        if attempt < self.cfg.runtime.max_attempts:
            log.warning("problem %s failed (attempt %d): %s; retrying", problem.problem_id, attempt, reason)
            self.queue.append((problem, attempt + 1))
        else:
            log.error(
                "problem %s left for a re-run after %d attempts: %s", problem.problem_id, attempt, reason
            )
            self.stats.failed += 1

    def _expire_overdue(self) -> None:
        import ray

        now = time.monotonic()
        for ref in [r for r, v in self.pending.items() if v[4] < now]:
            ray.cancel(ref)
            problem, _, attempt = self._pop(ref)
            self._retry_or_give_up(
                problem, attempt, f"solve missed its deadline of {self.solve_timeout_s:.0f} s"
            )

    def run(self, todo: list):
        import ray
        from ray.exceptions import RayActorError

        self.queue = [(q, 1) for q in reversed(todo)]
        capacity = self.cfg.teacher.max_inflight_problems
        while (self.queue or self.pending) and not self.stop.is_set():
            while self.queue and min(self.engine_load) < capacity:
                self._submit(*self.queue.pop())
            self._expire_overdue()
            ready, _ = ray.wait(list(self.pending), num_returns=1, timeout=1.0)
            for ref in ready:
                problem, m, attempt = self._pop(ref)
                try:
                    rows = ray.get(ref)
                except Exception as exc:
                    failure = exc
                else:
                    yield problem, rows
                    continue
                if isinstance(failure, RayActorError):  # the manager itself died; engine deaths
                    self.dead_managers.add(m)  # arrive as EnginesUnavailable from a live manager
                if _transient(failure):
                    self._retry_or_give_up(problem, attempt, _reason(failure))
                else:
                    yield problem, error_rows(self.cfg, problem, _reason(failure), self.fingerprint)


def _reason(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None) or exc
    text = str(cause).strip()
    return f"{type(cause).__name__}: {text.splitlines()[-1] if text else ''}"


def _transient(exc: BaseException) -> bool:
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


def _verify(verifier, rows: list[dict[str, Any]]) -> None:
    todo = [r for r in rows if r["status"] == "completed"]
    results = verifier.verify_many([(r["gold_answer"], r.get("final_answer")) for r in todo])
    for r, ok in zip(todo, results, strict=True):
        r["correct"] = ok


def _select(method: str, rows: list[dict[str, Any]]) -> None:
    """The method's pick for fine-tuning among a problem's verified trajectories (`selected`)."""
    from gen_ssd_ray.core.methods import get_method

    for r, keep in zip(rows, get_method(method).select(rows), strict=True):
        r["selected"] = keep


def error_rows(cfg: GenerateConfig, problem, reason: str, fp: str) -> list[dict[str, Any]]:
    from gen_ssd_ray.generate.manager import trajectory_seed

    return [
        {
            "problem_id": problem.problem_id,
            "trajectory_index": i,
            "question": problem.question,
            "gold_answer": problem.gold_answer,
            "status": "error",
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
        "  Parquet shards part-*.parquet (one row per trajectory), _manifest.json (committed shards),",
        "  _config.yaml (the resolved config). Read with pandas.read_parquet / pyarrow.dataset / ray.data.",
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
    if summary.get("problems_failed_retry_later"):
        lines.append(
            f"{summary['problems_failed_retry_later']} problems were not committed because engines failed "
            "(see the log); re-run the same command to retry them."
        )
    return "\n".join(lines)
