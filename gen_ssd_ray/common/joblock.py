"""One writer per job folder, and every lock wait bounded.

What this module knows:
- `hold_job_folder(folder, job)` (a context manager) / `lock_job_folder(folder, job)` (a held
  `FolderLock` to release later): the lock every job takes on the folder it writes (generation's output
  folder, a fine-tune's, an evaluation's, the pipeline's). It is an exclusive, non-blocking ``flock`` on
  ``<folder>/_lock`` (the same file and the same semantics as generation's `ShardWriter`, so the two
  exclude each other): a second job on the folder is refused at once with `FolderLockedError` (an
  `InputError`: exit 2, nothing started), whose one-line message names the folder, the holder and the fix.
- `hold_lock(path, ...)`: the same lock on any file, waiting at most `wait_s` seconds (polling, so a
  signal ends the wait: KeyboardInterrupt, or JobInterrupted under `stop_on_signals()`); past it,
  `LockTimeoutError` names the lock file, the holder and the fix. Used by
  `gen_ssd_ray.common.models.materialize` (the model-cache build lock).
- The holder writes one JSON line into the lock file (job, pid, host, start time) and clears it when it
  lets go; a refused caller reads it to say who holds the lock. The content is information only: the
  kernel's ``flock`` is the lock, released when the holder's descriptor closes, so a holder that died
  (even by SIGKILL) never leaves a stale lock, and a leftover line is simply overwritten.

Each FolderLock opens its own descriptor, so within one process a second lock on the same file is
refused (or waits) exactly as in another process: the lock is not re-entrant.

What it does not know: it does not serialize threads sharing one `FolderLock` object, and ``flock`` is
only as reliable as the filesystem (local disks and NFSv4 honour it across hosts; some FUSE/object-store
mounts do not). A child forked while the lock is held (not spawned: spawned and exec'd children never
inherit it) keeps it until it exits.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gen_ssd_ray.common.errors import InputError
from gen_ssd_ray.common.interrupts import check_stop

# The lock file inside a job folder; generation's ShardWriter uses the same name (generate/output.py).
LOCK_NAME = "_lock"
# Default bound of a waiting lock (`hold_lock`): far above the ~35 s an embedded-model build takes.
# GEN_SSD_LOCK_WAIT_S overrides it (seconds).
DEFAULT_WAIT_S = 600.0
_POLL_S = 0.1


class FolderLockedError(InputError):
    """The lock is held by another job: nothing was started. Exit 2."""

    def __init__(self, message: str, path: Path, holder: dict[str, Any] | None):
        super().__init__(message)
        self.path = path
        self.holder = holder


class LockTimeoutError(FolderLockedError):
    """A bounded lock wait (`hold_lock` with `wait_s` > 0) ran out."""


def default_wait_s() -> float:
    """`DEFAULT_WAIT_S`, or GEN_SSD_LOCK_WAIT_S if set (a number of seconds)."""
    raw = os.environ.get("GEN_SSD_LOCK_WAIT_S")
    if not raw:
        return DEFAULT_WAIT_S
    try:
        value = float(raw)
    except ValueError:
        raise InputError(
            f"GEN_SSD_LOCK_WAIT_S={raw!r} is not a number of seconds; unset it or fix it"
        ) from None
    if not value >= 0:
        raise InputError(f"GEN_SSD_LOCK_WAIT_S={raw!r} must be >= 0 seconds")
    return value


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def read_holder(path: str | Path) -> dict[str, Any] | None:
    """The holder line of lock file `path` (None: none written, unreadable, or not ours)."""
    try:
        text = Path(path).read_text(errors="replace").strip()
        holder = json.loads(text) if text else None
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def describe_holder(holder: dict[str, Any] | None) -> str:
    """`job pipeline (pid 12, host h, since T)`, or a phrase for an unknown holder."""
    if not holder:
        return "another process (it wrote no holder line: a generation writer of an older version?)"
    where = (
        f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, since {holder.get('started', '?')}"
    )
    return f"job {holder.get('job', '?')!s} ({where})"


class FolderLock:
    """An exclusive ``flock`` on one lock file, with a holder line. `acquire(wait_s)`, `release()`;
    `held` says whether this object holds it."""

    def __init__(self, path: str | Path, job: str):
        self.path = Path(path)
        self.job = job
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def try_acquire(self) -> bool:
        """Take the lock if it is free (False if another holder has it); writes the holder line."""
        if self._fd is not None:
            raise RuntimeError(f"{self.path} is already held by this FolderLock")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return False
            raise
        self._fd = fd
        line = {"job": self.job, "pid": os.getpid(), "host": socket.gethostname(), "started": _now()}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(line) + "\n").encode(), 0)
        except OSError:  # the line is information only (a full disk must not stop the lock)
            pass
        return True

    def acquire(self, wait_s: float = 0.0, *, what: str | None = None, fix: str = "") -> FolderLock:
        """Take the lock, waiting at most `wait_s` seconds (0: refuse at once).

        Raises FolderLockedError (wait_s == 0) or LockTimeoutError naming `what` (default: the lock
        file), the holder and `fix`."""
        deadline = time.monotonic() + wait_s
        while not self.try_acquire():
            if time.monotonic() >= deadline:
                holder = read_holder(self.path)
                subject = what or f"lock {self.path}"
                if wait_s > 0:
                    raise LockTimeoutError(
                        f"{subject} is still held after {wait_s:g} s by {describe_holder(holder)} "
                        f"(lock file {self.path}): {fix}".rstrip(": "),
                        self.path,
                        holder,
                    )
                raise FolderLockedError(
                    f"{subject} is in use by {describe_holder(holder)} (lock file {self.path}): {fix}".rstrip(
                        ": "
                    ),
                    self.path,
                    holder,
                )
            check_stop(f"lock {self.path}")  # a signal under stop_on_signals() ends the wait too
            time.sleep(_POLL_S)  # a signal handler that raises interrupts this wait
        return self

    def release(self) -> None:
        """Clear the holder line and let go (a no-op if not held)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        os.close(fd)  # closing the descriptor releases the flock

    def __enter__(self) -> FolderLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_job_folder(folder: str | Path, job: str, *, key: str = "output.dir") -> FolderLock:
    """Take `<folder>/_lock` (the folder is created if missing) and return the held FolderLock; the
    caller releases it (`release()`, or `with`), e.g. a job's `prepare` keeps it in what it returns and
    its `run` releases it at the end (as generation's ShardWriter does).

    Refuses at once with FolderLockedError if another job (or generation's ShardWriter) holds it; the
    message names the folder, the holder and the fix (wait for that job, stop it, or change `key`)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fix = f"wait for that job to finish (or stop it), or give this job another {key}"
    return FolderLock(folder / LOCK_NAME, job).acquire(0.0, what=f"job folder {folder}", fix=fix)


@contextlib.contextmanager
def hold_job_folder(folder: str | Path, job: str, *, key: str = "output.dir") -> Iterator[Path]:
    """`lock_job_folder` for the block; yields the folder."""
    with lock_job_folder(folder, job, key=key):
        yield Path(folder)


@contextlib.contextmanager
def hold_lock(
    path: str | Path, job: str, *, wait_s: float | None = None, what: str | None = None, fix: str = ""
) -> Iterator[None]:
    """Hold lock file `path` for the block, waiting at most `wait_s` seconds for it (None:
    `default_wait_s()`); LockTimeoutError past that (see `FolderLock.acquire`)."""
    with FolderLock(path, job).acquire(default_wait_s() if wait_s is None else wait_s, what=what, fix=fix):
        yield
