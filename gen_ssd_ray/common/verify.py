"""Answer checking with math-verify in a bounded pool of worker processes.

`Verifier.verify(gold, pred)` / `verify_many(pairs)` answer in three states:

- True / False: math-verify parsed both answers and compared them;
- None, "unverified": the gold or the prediction is missing or empty, either one does not parse,
  the check raised, or it ran past the deadline. An exception inside math-verify's comparison is
  never a False: `check_answer` asks math-verify to raise (`raise_on_error=True`) and the item is
  None, counted as an error.

Counters (`Verifier.counters()`, a small dict for job summaries): `checks` (pairs sent to the
workers), `errors` (the check raised: None), `timeouts` (past the deadline: None), `lost` (the worker
died twice on the item: None) and `pool_restarts` (pools replaced: a timeout, a dead worker).

Preflight: `Verifier.check()` (or `check_verifier()`, which starts and closes a one-worker pool)
verifies `KNOWN_PAIRS` (equal and unequal answers) in the worker processes and raises
`VerifierUnavailable` (an InputError: exit 2, nothing started) naming math-verify and the fix when
the answers are not the known ones: math-verify missing or broken makes every verdict None, which
would otherwise look like a model that never answers right. Jobs call it in `prepare`.

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
checks (a new pool is waited for until a worker answers, so start-up does not eat a deadline); the
other items that were in the killed pool are resubmitted, not lost. A worker that dies on its own
(crash, OOM kill) is handled the same way, and the item that was being waited on is retried once
before it counts as unverified. A worker that dies while the pool is idle breaks the pool before
the next submit: the pool is replaced there too, transparently.

What this module does not know: how answers are extracted (`core.answers`), what a row or a score
is, or Ray. The pool lives in the process that owns the `Verifier` (a Ray actor or the driver);
workers start lazily on first use. Kill-on-timeout uses `ProcessPoolExecutor._processes` (CPython
3.11 has no public way to kill a pool's workers).
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import CancelledError, Future, ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from gen_ssd_ray.common.errors import InputError

log = logging.getLogger(__name__)

CheckFn = Callable[[str, str], bool | None]

# The preflight's pairs: (gold, prediction, expected verdict). Equal in other notations, and unequal.
KNOWN_PAIRS: tuple[tuple[str, str, bool], ...] = (
    ("1,000", "1000.0", True),
    ("\\frac{1}{2}", "0.5", True),
    ("18", "19", False),
)
FIX = (
    "install math-verify with its LaTeX parser in the job's Python environment (the image, or the Ray "
    "runtime_env): pip install 'math-verify[antlr4_13_2]>=0.9'"
)
# Errors logged at WARNING (the rest at DEBUG; all are counted).
_WARN_ERRORS = 5


class VerifierUnavailable(InputError):
    """The answer checker cannot run (math-verify missing or broken): every verdict would be null."""


class PoolUnavailable(RuntimeError):
    """The worker processes die as they start (a new pool broke three times in a row)."""


class CheckError(RuntimeError):
    """math-verify raised while comparing two parsed answers (the verdict is unknown, not False)."""


# ---- the check itself (runs in the worker processes) ---------------------------------------------


def _as_latex(answer: str) -> str:
    """A bare answer as math-verify reads it best: inside a box, unless it already holds one."""
    answer = answer.strip()
    if "\\boxed" in answer or "\\fbox" in answer:
        return answer
    return f"\\boxed{{{answer}}}"


def check_answer(gold: str, pred: str) -> bool | None:
    """Compare two answer strings with math-verify, without its signal-based timeouts.

    True when some parse of `pred` equals some parse of `gold`; False when every comparison said
    unequal; None when either does not parse. Raises when math-verify cannot be imported, when parsing
    raises, and (`CheckError`) when a comparison raised and none said equal: an error is never a
    False. Call it in a worker process (as `Verifier` does, which turns a raise into None and counts
    it) or where an unbounded run time is acceptable: nothing here interrupts a slow comparison.
    """
    from math_verify import parse, verify

    gold_parsed = parse(_as_latex(gold), parsing_timeout=None, raise_on_error=True)  # type: ignore[arg-type]
    if not gold_parsed:
        return None
    pred_parsed = parse(_as_latex(pred), parsing_timeout=None, raise_on_error=True)  # type: ignore[arg-type]
    if not pred_parsed:
        return None
    failure: Exception | None = None
    for g, t in itertools.product(gold_parsed, pred_parsed):  # math-verify's own `any` over the pairs
        try:
            if verify(g, t, timeout_seconds=None, raise_on_error=True):
                return True
        except Exception as e:  # noqa: BLE001 - the verdict is unknown; keep looking for an equal pair
            failure = failure or e
    if failure is not None:
        raise CheckError(f"math-verify raised comparing the answers: {type(failure).__name__}: {failure}")
    return False


class _DropTimeoutDisabledWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Timeout is disabled" not in record.getMessage()


# How often a worker checks that the job that started it is alive.
_PARENT_CHECK_S = 1.0


def _exit_with_parent(parent: int) -> None:
    """Exit once the process that started this worker is gone (killed with SIGKILL, say): a worker
    must never outlive its job, idle forever on a queue nobody writes to."""
    while os.getppid() == parent:
        time.sleep(_PARENT_CHECK_S)
    os._exit(0)


def _init_worker() -> None:
    """Worker start-up: exit with the parent (a watchdog thread), silence math-verify's "you disabled
    the timeout" warning (we bound the time from outside) and import it now, so the first real check
    does not pay for the import."""
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    for name in ("math_verify.parser", "math_verify.grader"):
        logging.getLogger(name).addFilter(_DropTimeoutDisabledWarning())
    try:
        import math_verify  # noqa: F401
    except ImportError:  # reported by the first check instead
        pass


def _ready() -> int:
    return os.getpid()


def _guarded(fn: CheckFn, gold: str, pred: str) -> tuple[str, bool | None]:
    """Run one check in a worker: ("ok", verdict) or ("error", "Type: message"). The exception stays
    in the worker (it may not pickle); its one-line description comes back."""
    try:
        value = fn(gold, pred)
    except Exception as e:  # noqa: BLE001 - any failure of the check is an unknown verdict
        text = str(e).strip().splitlines()
        return "error", f"{type(e).__name__}: {text[-1] if text else ''}"[:500]
    return "ok", None if value is None else bool(value)


def _missing(value: str | None) -> bool:
    return value is None or not str(value).strip()


# ---- the pool ------------------------------------------------------------------------------------


class Verifier:
    """math-verify checks in `workers` processes, each answer within `timeout_s` seconds.

    `worker_fn(gold, pred) -> bool | None` is the check run in the workers; it must be a module-level
    (picklable) function. The default is `check_answer`; tests pass a slow function to exercise the
    deadline. An exception raised by `worker_fn` makes that item None (counted in `errors`). Safe to
    share between threads.

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
        self.restarts = 0  # pools replaced after a timeout or a dead worker (counters()["pool_restarts"])
        self._counts = {"checks": 0, "errors": 0, "timeouts": 0, "lost": 0}

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
        return [value for value, _ in self._run(pairs)]

    def counters(self) -> dict[str, int]:
        """What happened so far (preflight excluded): checks (pairs sent to the workers), errors (the
        check raised), timeouts, lost (a worker died twice on the item), pool_restarts. Every error,
        timeout and lost item is a None verdict."""
        with self._lock:
            return {**self._counts, "pool_restarts": self.restarts}

    def check(self, pairs: Sequence[tuple[str, str, bool]] = KNOWN_PAIRS) -> None:
        """Preflight: verify `pairs` (gold, prediction, expected verdict) in the worker pool.

        Raises `VerifierUnavailable` (an InputError) naming math-verify, what went wrong and the fix
        when any verdict is not the expected one (None included: missing or broken math-verify, a
        worker that cannot start or answer within `timeout_s`). Leaves the pool up for the real work.
        """
        try:
            outcomes = self._run([(g, p) for g, p, _ in pairs], count=False)
        except PoolUnavailable as e:
            raise VerifierUnavailable(
                f"the answer checker (math-verify, in {self.workers} worker processes) does not work: {e}; "
                f"every verdict would be null (unverified). Fix: {FIX}"
            ) from None
        for (gold, pred, expected), (value, problem) in zip(pairs, outcomes, strict=True):
            if value is expected:
                continue
            why = f"{problem}" if problem else f"it answered {value}"
            fix = FIX
            if problem == "timeout":
                fix = (
                    f"raise runtime.verify_timeout_s (now {self.timeout_s:g} s) if the machine is slow, "
                    f"or {FIX}"
                )
            raise VerifierUnavailable(
                f"the answer checker (math-verify, in {self.workers} worker processes) does not work: "
                f"checking {gold!r} against {pred!r} should give {expected}, but {why}; every verdict "
                f"would be null (unverified). Fix: {fix}"
            )

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

    def _run(
        self, pairs: Sequence[tuple[str | None, str | None]], count: bool = True
    ) -> list[tuple[bool | None, str | None]]:
        """(verdict, problem) per pair, in order; problem is None, "error: ...", "timeout" or
        "worker lost". Missing answers are (None, None) and never reach a worker."""
        results: list[tuple[bool | None, str | None]] = [(None, None)] * len(pairs)
        todo = [i for i, (g, p) in enumerate(pairs) if not (_missing(g) or _missing(p))]
        jobs = {i: self._submit(*pairs[i]) for i in todo}
        counts = {"checks": len(todo), "errors": 0, "timeouts": 0, "lost": 0}
        try:
            for k, i in enumerate(todo):
                gold, pred = pairs[i]
                for attempt in (1, 2):
                    fut, pool = jobs[i]
                    status, value = self._wait(fut, pool)
                    if status == "ok":
                        results[i] = (value, None)
                        break
                    if status == "error":
                        counts["errors"] += 1
                        results[i] = (None, f"error: {value}")
                        level = (
                            logging.WARNING
                            if self._counts["errors"] + counts["errors"] <= _WARN_ERRORS
                            else logging.DEBUG
                        )
                        log.log(
                            level, "verify: the check raised %s (gold=%.60r pred=%.60r)", value, gold, pred
                        )
                        break
                    # The pool is gone (killed on a timeout here or in another thread, or a worker
                    # died): move the items still waiting in it to the current pool.
                    for j in todo[k + 1 :]:
                        if jobs[j][1] is pool and not _finished(jobs[j][0]):
                            jobs[j] = self._submit(*pairs[j])
                    if status == "timeout":
                        counts["timeouts"] += 1
                        results[i] = (None, "timeout")
                        log.warning(
                            "verify: no answer within %.1fs (gold=%.60r pred=%.60r)",
                            self.timeout_s,
                            gold,
                            pred,
                        )
                        break
                    if attempt == 1:
                        jobs[i] = self._submit(gold, pred)
                    else:
                        counts["lost"] += 1
                        results[i] = (None, "worker lost")
                        log.warning("verify: worker lost twice (gold=%.60r pred=%.60r)", gold, pred)
        finally:
            if count:
                with self._lock:
                    for key, n in counts.items():
                        self._counts[key] += n
        return results

    def _submit(self, gold: str | None, pred: str | None) -> tuple[Future, ProcessPoolExecutor]:
        """Submit one check to the current pool; a pool broken while idle (a worker died between
        checks) is replaced here, so the caller never sees BrokenProcessPool."""
        for _ in range(3):
            with self._lock:
                if self._closed:
                    raise RuntimeError("Verifier is closed")
                if self._pool is None:
                    self._pool = self._start_pool()
                pool = self._pool
                try:
                    return pool.submit(_guarded, self._worker_fn, gold, pred), pool
                except BrokenProcessPool:
                    pass
            log.warning("verify: a worker process died while idle; starting a new pool")
            self._replace(pool)
        raise PoolUnavailable("the worker processes die as they start (the pool broke three times in a row)")

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

    def _wait(self, fut: Future, pool: ProcessPoolExecutor) -> tuple[str, Any]:
        """("ok", verdict) | ("error", reason) | ("timeout", None) | ("lost", None); replaces the
        pool on timeout/loss."""
        try:
            status, value = fut.result(timeout=self.timeout_s)
        except FutureTimeout:
            self._replace(pool)
            return "timeout", None
        except (BrokenProcessPool, CancelledError):
            self._replace(pool)
            return "lost", None
        except Exception as e:  # not expected: `_guarded` returns the check's errors
            return "error", f"{type(e).__name__}: {e}"
        return status, value

    def _replace(self, pool: ProcessPoolExecutor) -> None:
        """Kill `pool` if it is still the current one; the next submit starts a fresh pool."""
        with self._lock:
            if self._pool is not pool:
                return  # already replaced (by another thread or an earlier item)
            self._pool = None
            self.restarts += 1
        _shutdown(pool, grace_s=0.0)


def check_verifier(timeout_s: float = 10.0, *, worker_fn: CheckFn = check_answer) -> None:
    """Preflight for a job's `prepare`: start a one-worker `Verifier`, run `Verifier.check()`, close
    it (a second or two). Raises `VerifierUnavailable` (exit 2) naming math-verify and the fix."""
    with Verifier(workers=1, timeout_s=timeout_s, worker_fn=worker_fn) as v:
        v.check()


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
