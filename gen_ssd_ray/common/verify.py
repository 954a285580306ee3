"""Answer checking with math-verify in a bounded pool of worker processes.

`Verifier.verify(gold, pred)` / `verify_many(pairs)` answer in three states:

- True / False: math-verify parsed both answers and compared them;
- None, "unverified": the gold or the prediction is missing or empty, either one does not parse,
  the check raised, or it ran past the deadline.

Inputs are *answer strings* as `gen_ssd_ray.core.answers` extracts them ("18", "1,000", "$18",
"\\frac{1}{2}"), not whole responses. Each is handed to math-verify inside `\\boxed{...}` (unless it
already holds a box), which makes bare numbers, thousands separators, dollar signs and LaTeX parse the
same way: "18" == "18.0" == "$18" == "\\boxed{18}", "1,000" == "1000".

Why processes: math-verify bounds its own work with SIGALRM, which only works on a main thread, and a
sympy simplification can run for minutes. So the checks run in a `ProcessPoolExecutor` whose workers
are started with "spawn" (never fork: the parent may hold Ray and other threads), math-verify's own
timeouts are switched off there (`parsing_timeout=None`, `timeout_seconds=None`), and the deadline is
enforced from outside: every item gets `timeout_s` from the moment it is waited for. On a timeout
the pool's processes are killed and a fresh pool replaces it, so a stuck worker never blocks later
checks (a new pool is waited for until a worker answers, so start-up does not eat a deadline); the other items that were in the killed pool are resubmitted, not lost. A worker that dies on
its own (crash, OOM kill) is handled the same way, and the item that was being waited on is retried
once before it counts as unverified.

What this module does not know: how answers are extracted (`core.answers`), what a row or a score
is, or Ray. The pool lives in the process that owns the `Verifier` (a Ray actor or the driver);
workers start lazily on first use. Kill-on-timeout uses `ProcessPoolExecutor._processes` (CPython
3.11 has no public way to kill a pool's workers).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import CancelledError, Future, ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool

log = logging.getLogger(__name__)

CheckFn = Callable[[str, str], bool | None]


# ---- the check itself (runs in the worker processes) ---------------------------------------------


def _as_latex(answer: str) -> str:
    """A bare answer as math-verify reads it best: inside a box, unless it already holds one."""
    answer = answer.strip()
    if "\\boxed" in answer or "\\fbox" in answer:
        return answer
    return f"\\boxed{{{answer}}}"


def check_answer(gold: str, pred: str) -> bool | None:
    """Compare two answer strings with math-verify, without its signal-based timeouts.

    True/False when both parse, None when either does not. Call it in a worker process (as `Verifier`
    does) or where an unbounded run time is acceptable: nothing here interrupts a slow comparison.
    """
    from math_verify import parse, verify

    gold_parsed = parse(_as_latex(gold), parsing_timeout=None)  # type: ignore[arg-type]
    if not gold_parsed:
        return None
    pred_parsed = parse(_as_latex(pred), parsing_timeout=None)  # type: ignore[arg-type]
    if not pred_parsed:
        return None
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=None))


class _DropTimeoutDisabledWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Timeout is disabled" not in record.getMessage()


def _init_worker() -> None:
    """Worker start-up: silence math-verify's "you disabled the timeout" warning (we bound the time
    from outside) and import it now, so the first real check does not pay for the import."""
    for name in ("math_verify.parser", "math_verify.grader"):
        logging.getLogger(name).addFilter(_DropTimeoutDisabledWarning())
    try:
        import math_verify  # noqa: F401
    except ImportError:  # reported by the first check instead
        pass


def _ready() -> int:
    return os.getpid()


def _missing(value: str | None) -> bool:
    return value is None or not str(value).strip()


# ---- the pool ------------------------------------------------------------------------------------


class Verifier:
    """math-verify checks in `workers` processes, each answer within `timeout_s` seconds.

    `worker_fn(gold, pred) -> bool | None` is the check run in the workers; it must be a module-level
    (picklable) function. The default is `check_answer`; tests pass a slow function to exercise the
    deadline. An exception raised by `worker_fn` makes that item None. Safe to share between threads.

    Always `close()` it (or use it as a context manager): an abandoned pool with a stuck worker would
    hold up interpreter exit, since concurrent.futures joins its pools then.
    """

    def __init__(
        self,
        workers: int = 2,
        timeout_s: float = 10.0,
        *,
        worker_fn: CheckFn = check_answer,
        mp_context: str = "spawn",
        startup_timeout_s: float = 60.0,
    ) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if mp_context not in ("spawn", "forkserver"):
            raise ValueError(f"mp_context must be 'spawn' or 'forkserver' (never fork), got {mp_context!r}")
        self.workers = workers
        self.timeout_s = float(timeout_s)
        self._worker_fn = worker_fn
        self._ctx = multiprocessing.get_context(mp_context)
        self._lock = threading.Lock()
        self._pool: ProcessPoolExecutor | None = None
        self._closed = False
        self.startup_timeout_s = float(startup_timeout_s)  # a new pool's first answer, at most
        self.restarts = 0  # pools replaced after a timeout or a dead worker

    # -- public API --------------------------------------------------------------------------------

    def verify(self, gold: str | None, pred: str | None) -> bool | None:
        return self.verify_many([(gold, pred)])[0]

    def verify_rows(self, rows: Sequence[dict]) -> None:
        """Fill `correct` of every completed output row (gold_answer vs final_answer), in place; rows
        of any other status keep `correct` null (unverified). Generation and evaluation both call it."""
        todo = [r for r in rows if r["status"] == "completed"]
        for r, ok in zip(
            todo, self.verify_many([(r["gold_answer"], r.get("final_answer")) for r in todo]), strict=True
        ):
            r["correct"] = ok

    def verify_many(self, pairs: Sequence[tuple[str | None, str | None]]) -> list[bool | None]:
        """Submit every pair, then collect them in order, each waited for at most `timeout_s`."""
        results: list[bool | None] = [None] * len(pairs)
        todo = [i for i, (g, p) in enumerate(pairs) if not (_missing(g) or _missing(p))]
        jobs = {i: self._submit(*pairs[i]) for i in todo}
        for k, i in enumerate(todo):
            gold, pred = pairs[i]
            for attempt in (1, 2):
                fut, pool = jobs[i]
                status, value = self._wait(fut, pool)
                if status == "ok":
                    results[i] = value
                    break
                # The pool is gone (killed on a timeout here or in another thread, or a worker
                # died): move the items still waiting in it to the current pool.
                for j in todo[k + 1 :]:
                    if jobs[j][1] is pool and not _finished(jobs[j][0]):
                        jobs[j] = self._submit(*pairs[j])
                if status == "timeout":
                    log.warning(
                        "verify: no answer within %.1fs (gold=%.60r pred=%.60r)", self.timeout_s, gold, pred
                    )
                    break
                if attempt == 1:
                    jobs[i] = self._submit(gold, pred)
                else:
                    log.warning("verify: worker lost twice (gold=%.60r pred=%.60r)", gold, pred)
        return results

    def close(self) -> None:
        """Stop the workers (a stuck one is killed). Idempotent; the Verifier is unusable afterwards."""
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
        if pool is not None:
            _shutdown(pool, grace_s=2.0)

    def __enter__(self) -> Verifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ---------------------------------------------------------------------------------

    def _submit(self, gold: str | None, pred: str | None) -> tuple[Future, ProcessPoolExecutor]:
        with self._lock:
            if self._closed:
                raise RuntimeError("Verifier is closed")
            if self._pool is None:
                self._pool = self._start_pool()
            pool = self._pool
            return pool.submit(self._worker_fn, gold, pred), pool

    def _start_pool(self) -> ProcessPoolExecutor:
        """A new pool, waited for until a worker answers, so that process start-up (about a second:
        interpreter, sympy, math-verify) is not charged to the first item's deadline."""
        init = _init_worker if self._worker_fn is check_answer else None
        pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=self._ctx, initializer=init)
        t0 = time.monotonic()
        try:
            pool.submit(_ready).result(timeout=max(self.startup_timeout_s, self.timeout_s))
        except Exception as e:  # still usable: the items will time out if it never comes up
            log.warning("verify: worker pool not ready after %.0fs (%r)", time.monotonic() - t0, e)
        else:
            log.debug("verify: %d-worker pool ready in %.2fs", self.workers, time.monotonic() - t0)
        return pool

    def _wait(self, fut: Future, pool: ProcessPoolExecutor) -> tuple[str, bool | None]:
        """("ok", value) | ("timeout", None) | ("lost", None); replaces the pool on timeout/loss."""
        try:
            value = fut.result(timeout=self.timeout_s)
        except FutureTimeout:
            self._replace(pool)
            return "timeout", None
        except (BrokenProcessPool, CancelledError):
            self._replace(pool)
            return "lost", None
        except Exception as e:  # the check itself raised
            log.debug("verify: check raised %r", e)
            return "ok", None
        return "ok", None if value is None else bool(value)

    def _replace(self, pool: ProcessPoolExecutor) -> None:
        """Kill `pool` if it is still the current one; the next submit starts a fresh pool."""
        with self._lock:
            if self._pool is not pool:
                return  # already replaced (by another thread or an earlier item)
            self._pool = None
            self.restarts += 1
        _shutdown(pool, grace_s=0.0)


def _finished(fut: Future) -> bool:
    """Done with a result or an error of its own (not a lost worker)."""
    if not fut.done() or fut.cancelled():
        return False
    return not isinstance(fut.exception(), BrokenProcessPool)


def _shutdown(pool: ProcessPoolExecutor, grace_s: float) -> None:
    """Shut `pool` down without ever blocking on a stuck worker: after `grace_s`, kill them."""
    procs = list((getattr(pool, "_processes", None) or {}).values())
    if grace_s <= 0:
        for p in procs:
            p.kill()
    pool.shutdown(wait=False, cancel_futures=True)
    for p in procs:
        p.join(timeout=grace_s if grace_s > 0 else 1.0)
        if p.is_alive():
            p.kill()
            p.join(timeout=1.0)
