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

On an object store (`output.dir=s3://...`: gen_ssd_ray.common.storage) there is no flock: the same
`lock_job_folder` returns an `ObjectLease` instead, a lease object ``<folder>/_lock`` holding the same
holder line plus a lease id. It is taken with an exclusive create (``If-None-Match: *``), renewed by a
background thread every `ttl/4` seconds with a conditional replace (``If-Match`` the last version), and
deleted on release. A job that finds a lease watches it: renewed within `ttl` seconds means its holder
is alive (refused at once, FolderLockedError, exit 2); not renewed for `ttl` seconds (a holder killed
with its node, a preempted driver) means it is taken over with a conditional replace (``If-Match`` the
version it saw), so two jobs resubmitted at once cannot both win and a late renewal of a live holder
wins over the takeover. How long the lease has gone unrenewed is read on the store's own clock: the
lease object's last-modified time against that of a probe object (``_lock.clock``) the job writes,
stats and deletes, so a job resubmitted after its predecessor died long ago takes over at once, and one
resubmitted sooner waits only the rest of the ttl (less a 2 s margin for stores that keep whole
seconds). Where the store gives no such times, the job watches the lease for a whole ttl on its own
monotonic clock. No host's clock is compared with another's; the ttl is `DEFAULT_LEASE_TTL_S`, or
GEN_SSD_LEASE_TTL_S. One more case needs no waiting: the lease line names its holder's machine (boot
id and pid namespace) and process (pid and start time), so a job resubmitted where the killed driver
ran (same machine, same pid namespace: a driver killed on a head node that survived) sees that the
process is gone (no such pid, a zombie, or a pid reused by a later process) and takes over at once. A holder that cannot
renew for `ttl` (its renewals fail, or another job replaced the lease) has lost it: `check()` then
raises `LeaseLostError`, which writers call before each commit, so a writer cut off from the store
stops committing before another may start.

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
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gen_ssd_ray.common.errors import InputError, JobFailed
from gen_ssd_ray.common.interrupts import check_stop
from gen_ssd_ray.common.storage import Storage, is_remote

log = logging.getLogger("gen_ssd_ray")

# The lock file inside a job folder; generation's ShardWriter uses the same name (generate/output.py).
LOCK_NAME = "_lock"
# Default bound of a waiting lock (`hold_lock`): far above the ~35 s an embedded-model build takes.
# GEN_SSD_LOCK_WAIT_S overrides it (seconds).
DEFAULT_WAIT_S = 600.0
_POLL_S = 0.1
# How long an object-store lease lives without renewal (GEN_SSD_LEASE_TTL_S overrides, seconds).
DEFAULT_LEASE_TTL_S = 60.0
# The probe object that reads the store's clock next to a lease `<name>` is `<name>.clock`; the ages it
# gives are trusted only past this margin (S3 keeps LastModified in whole seconds).
_CLOCK_MARGIN_S = 2.0


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

    def check(self) -> None:
        """Nothing to renew: a held flock stays held until released (the `ObjectLease` counterpart)."""
        if self._fd is None:
            raise LeaseLostError(f"{self.path}: not held")

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


class LeaseLostError(JobFailed):
    """This job's lease on an object-store folder is gone (not renewed for its ttl, or taken over):
    it must stop writing there. Exit 1; a resubmission continues from what was committed."""


def lease_ttl_s() -> float:
    raw = os.environ.get("GEN_SSD_LEASE_TTL_S")
    if raw is None:
        return DEFAULT_LEASE_TTL_S
    try:
        value = float(raw)
    except ValueError:
        raise InputError(f"GEN_SSD_LEASE_TTL_S={raw!r}: not a number of seconds") from None
    if not value > 0:
        raise InputError(f"GEN_SSD_LEASE_TTL_S={raw!r}: must be > 0 seconds")
    return value


def _machine() -> str | None:
    """This machine's boot id and pid namespace: processes with equal values see each other's pids
    (None where /proc does not tell)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return None


def _start_ticks(pid: int) -> str | None:
    """The start time of running process `pid` (clock ticks since boot), None if it is not running
    (absent, or a zombie)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else fields[19]


def holder_gone(holder: dict[str, Any] | None) -> bool:
    """Whether a lease's holder line names a process of this machine and pid namespace that no longer
    runs (False whenever that cannot be told: another machine, an older holder line, no /proc)."""
    if not holder or holder.get("machine") is None or holder.get("machine") != _machine():
        return False
    pid, start = holder.get("pid"), holder.get("pid_start")
    if not isinstance(pid, int) or not start:
        return False
    return _start_ticks(pid) != start


class ObjectLease:
    """A renewed lease object on an object-store folder (see the module doc). `acquire`, `check`,
    `release`; `held` says whether this object holds it."""

    def __init__(self, storage: Storage, job: str, *, name: str = LOCK_NAME, ttl_s: float | None = None):
        self.storage = storage
        self.name = name
        self.job = job
        self.ttl_s = lease_ttl_s() if ttl_s is None else ttl_s
        self.path = storage.uri_of(name)
        self.lease_id = uuid.uuid4().hex
        self._token: str | None = None
        self._renewed = 0.0  # monotonic time of the last successful write
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = _now()

    @property
    def held(self) -> bool:
        return self._token is not None

    def _body(self) -> bytes:
        line = {
            "job": self.job,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "machine": _machine(),
            "pid_start": _start_ticks(os.getpid()),
            "started": self._started,
            "renewed": _now(),
            "lease_id": self.lease_id,
            "ttl_s": self.ttl_s,
        }
        return (json.dumps(line) + "\n").encode()

    def _read(self) -> tuple[str | None, dict[str, Any] | None, float | None]:
        """The lease's version token, holder line and last-modified time (store clock), or Nones."""
        st = self.storage.stat(self.name)
        if st is None:
            return None, None, None
        try:
            holder = json.loads(self.storage.read_text(self.name) or "null")
        except (FileNotFoundError, ValueError):
            holder = None
        return st.token, holder if isinstance(holder, dict) else None, st.mtime

    def store_age(self, mtime: float | None) -> float | None:
        """Seconds from `mtime` (a last-modified time of this store) to now on the store's own clock,
        read from a probe object written, stat'ed and deleted here; None if the store gives no times."""
        if mtime is None:
            return None
        probe = f"{self.name}.clock"
        try:
            self.storage.write_bytes(probe, self.lease_id.encode())
            st = self.storage.stat(probe)
            self.storage.delete(probe)
        except Exception:  # no probe, no store clock: the caller watches a whole ttl instead
            return None
        return None if st is None or st.mtime is None else st.mtime - mtime

    def _won(self) -> None:
        st = self.storage.stat(self.name)
        self._token = st.token if st else ""
        self._renewed = time.monotonic()
        self._thread = threading.Thread(target=self._renew_loop, name=f"lease {self.path}", daemon=True)
        self._thread.start()

    def acquire(self, *, what: str | None = None, fix: str = "") -> ObjectLease:
        """Take the lease: at once if there is none, if its holder was a process of this machine that
        is gone, or if the store's clock shows it unrenewed for `ttl_s`; otherwise after watching it
        for the rest of `ttl_s` without a renewal; FolderLockedError if it is renewed meanwhile."""
        subject = what or f"folder {self.storage.uri}"
        seen: str | None = None
        since = time.monotonic()
        self.waited_s = 0.0  # how long this acquire watched a lease before taking it (0: none)
        started = time.monotonic()
        while True:
            token, holder, mtime = self._read()
            if token is None:
                if self.storage.create_bytes(self.name, self._body()):
                    self._won()
                    return self
                continue  # another job created it first: watch that one
            if seen is not None and token != seen:
                raise FolderLockedError(
                    f"{subject} is in use by {describe_holder(holder)} (lease {self.path}, renewed while "
                    f"this job watched it): {fix}".rstrip(": "),
                    Path(self.name),
                    holder,
                )
            if seen is None:
                seen, since = token, time.monotonic()
                if holder_gone(holder):  # its process, on this machine, is gone: nobody will renew it
                    since -= self.ttl_s
                    why = f"its holder's process ({describe_holder(holder)}) is gone"
                else:
                    age = self.store_age(mtime)
                    if age is not None:  # the part of the ttl already spent unrenewed, by the store's clock
                        since -= min(max(age - _CLOCK_MARGIN_S, 0.0), self.ttl_s)
                    why = f"{describe_holder(holder)} did not renew it for its ttl of {self.ttl_s:g} s"
            if time.monotonic() - since >= self.ttl_s:
                if self.storage.replace_bytes(self.name, self._body(), token):
                    self.waited_s = time.monotonic() - started
                    self._won()
                    log.info("took over the lease %s: %s (watched %.1f s)", self.path, why, self.waited_s)
                    return self
                seen = None  # someone else took it over or renewed it: look again
                continue
            check_stop(f"lease {self.path}")
            time.sleep(min(1.0, self.ttl_s / 20))

    def _renew_loop(self) -> None:
        interval = self.ttl_s / 4
        while not self._stop.wait(interval):
            try:
                st = self.storage.stat(self.name)
                if st is None or st.token != self._token:
                    self._lost = f"the lease {self.path} was taken over or removed by another job"
                    return
                if not self.storage.replace_bytes(self.name, self._body(), self._token):
                    self._lost = f"the lease {self.path} was taken over by another job"
                    return
                st = self.storage.stat(self.name)
                self._token = st.token if st else self._token
                self._renewed = time.monotonic()
            except Exception as e:  # a store that does not answer: keep trying until the ttl runs out
                if time.monotonic() - self._renewed >= self.ttl_s * 0.75:
                    self._lost = f"the lease {self.path} could not be renewed for {self.ttl_s:g} s ({e})"
                    return

    def check(self) -> None:
        """Raise LeaseLostError if this job may no longer write to the folder (see the module doc)."""
        if self._token is None:
            raise LeaseLostError(f"{self.path}: not held")
        if self._lost is None and time.monotonic() - self._renewed >= self.ttl_s * 0.75:
            self._lost = f"the lease {self.path} was not renewed for {time.monotonic() - self._renewed:.0f} s"
        if self._lost is not None:
            raise LeaseLostError(
                f"{self._lost}: this job stopped writing there; resubmit it to continue from what was "
                "committed (and make sure no other job writes the same output)"
            )

    def release(self) -> None:
        """Stop renewing and delete the lease if it is still this job's (a no-op if not held)."""
        token, self._token = self._token, None
        if token is None:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        with contextlib.suppress(Exception):
            st = self.storage.stat(self.name)
            if st is not None and (st.token == token or self._lost is None):
                _, holder, _ = self._read()
                if holder is None or holder.get("lease_id") == self.lease_id:
                    self.storage.delete(self.name)

    def __enter__(self) -> ObjectLease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_job_folder(folder: str | Path, job: str, *, key: str = "output.dir") -> FolderLock | ObjectLease:
    """Take `<folder>/_lock` (the folder is created if missing) and return the held FolderLock; the
    caller releases it (`release()`, or `with`), e.g. a job's `prepare` keeps it in what it returns and
    its `run` releases it at the end (as generation's ShardWriter does). On an object store (`folder`
    an s3://... URI) it is an `ObjectLease` instead, which may watch an existing lease for its ttl.

    Refuses at once with FolderLockedError if another job (or generation's ShardWriter) holds it; the
    message names the folder, the holder and the fix (wait for that job, stop it, or change `key`)."""
    fix = f"wait for that job to finish (or stop it), or give this job another {key}"
    if is_remote(str(folder)):
        storage = Storage(str(folder), key=key)
        return ObjectLease(storage, job).acquire(what=f"job folder {storage.uri}", fix=fix)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return FolderLock(folder / LOCK_NAME, job).acquire(0.0, what=f"job folder {folder}", fix=fix)


@contextlib.contextmanager
def hold_job_folder(folder: str | Path, job: str, *, key: str = "output.dir") -> Iterator[str | Path]:
    """`lock_job_folder` for the block; yields the folder (a Path, or the URI of an object store)."""
    with lock_job_folder(folder, job, key=key):
        yield str(folder) if is_remote(str(folder)) else Path(folder)


@contextlib.contextmanager
def hold_lock(
    path: str | Path, job: str, *, wait_s: float | None = None, what: str | None = None, fix: str = ""
) -> Iterator[None]:
    """Hold lock file `path` for the block, waiting at most `wait_s` seconds for it (None:
    `default_wait_s()`); LockTimeoutError past that (see `FolderLock.acquire`)."""
    with FolderLock(path, job).acquire(default_wait_s() if wait_s is None else wait_s, what=what, fix=fix):
        yield
