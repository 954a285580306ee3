"""The one SIGINT/SIGTERM policy of every job.

SIGINT (Ctrl-C) and SIGTERM (`ray job stop`, a preempted node) mean the same thing: stop, keep what
finished, exit 130 so that re-running the same command continues.

- Work that owns its state runs under `stop_on_signals()`: a signal only sets the returned event,
  never raises, so a shard commit is never cut in half. Generation holds it from `ray.init` to the
  last commit (engine start-up, the dispatch loop, the final flush); evaluation around its dispatch
  loop. The loop stops admitting work and the job raises `JobInterrupted`.
- Everywhere else (config loading and `prepare`, engine start-up outside generation, Ray Train's
  `fit`, between pipeline stages) the job runs under `raise_on_signals()`, which the entry point
  (gen_ssd_ray.common.cli.run_job) holds from the start: both signals raise KeyboardInterrupt where
  the job is, and the entry point turns it into exit 130.

Every long wait is interruptible in both modes: a wait in the main thread polls (a raising handler
runs between polls), and a wait that runs under `stop_on_signals()` (engine start-up inside
generation, a lock wait) calls `check_stop(what)` between polls, which raises `JobInterrupted` once a
signal set the flag (`stop_requested()` reads it). So Ctrl-C and `ray job stop` end any phase with
exit 130. (`ray job stop` sends SIGTERM, or RAY_JOB_STOP_SIGNAL, to the entrypoint and every process
below it, then SIGKILL after RAY_JOB_STOP_WAIT_TIME_S, default 3 s.)

Handlers are only installed in the main thread (elsewhere these are no-ops) and the previous handlers
are restored on exit; `ray.init` sets its own SIGTERM handler, so `gen_ssd_ray.common.cluster.init_ray`
puts the job's back.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_active: list[threading.Event] = []  # the flags of the open stop_on_signals() blocks, innermost last


@contextlib.contextmanager
def _handlers(handler) -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {s: signal.getsignal(s) for s in _SIGNALS}
    for s in _SIGNALS:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in saved.items():
            signal.signal(s, h)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[threading.Event]:
    """Within the block, SIGINT and SIGTERM set the yielded event."""
    stop = threading.Event()
    with _handlers(lambda *_: stop.set()):
        _active.append(stop)
        try:
            yield stop
        finally:
            _active.remove(stop)


def stop_requested() -> bool:
    """Whether a signal set the flag of an open `stop_on_signals()` block."""
    return any(e.is_set() for e in _active)


def check_stop(what: str) -> None:
    """Raise JobInterrupted (naming `what`) if a signal set a stop flag; a long wait calls it between
    polls so that it ends promptly under `stop_on_signals()` too."""
    if stop_requested():
        from gen_ssd_ray.common.errors import JobInterrupted

        raise JobInterrupted(f"interrupted while waiting for {what}")


@contextlib.contextmanager
def raise_on_signals() -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM raise KeyboardInterrupt."""
    with _handlers(signal.default_int_handler):
        yield
