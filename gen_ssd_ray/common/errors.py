"""The failure model every job shares, and the exit code each failure maps to.

- `InputError` (a ValueError): bad config, model, data or output folder, found before anything
  started. The message names the key and the fix. Exit 2.
- `JobFailed`: the job ran and could not finish (engines that never started, work that failed on
  every attempt). What finished is kept; the message says how to continue (normally: re-run the same
  command). Exit 1.
- `JobInterrupted`: SIGINT or SIGTERM (`ray job stop`). What finished is kept. Exit 130.

A full disk is not bad input: an OSError with errno ENOSPC or EDQUOT anywhere in a job's run (also
wrapped by Ray or by a stage, or only named in a wrapped error's text) is exit 1 with one line naming
the file if known and what to do (`disk_full`, `disk_full_message`). A job folder held by another job
(gen_ssd_ray.common.joblock.FolderLockedError, an InputError) is exit 2 wherever it is found.

`JobFailed` and `JobInterrupted` may carry the job's summary, which the entry point prints before the
message (gen_ssd_ray.common.cli). `reason(exc)` is the one-line description of any exception that a
job logs or writes into an error row.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Iterator
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130


class InputError(ValueError):
    """Bad input found before anything started: the message names the config key and the fix."""


class JobFailed(RuntimeError):
    """The job could not finish; what finished is kept and the message says how to continue."""

    def __init__(self, message: str, summary: dict[str, Any] | None = None):
        super().__init__(message)
        self.summary = summary


class JobInterrupted(RuntimeError):
    """SIGINT/SIGTERM: what finished is kept; re-run the same command to continue."""

    def __init__(self, message: str, summary: dict[str, Any] | None = None):
        super().__init__(message)
        self.summary = summary


def reason(exc: BaseException) -> str:
    """`Type: last line of the message` of an exception, or of the exception a Ray error wraps."""
    cause = getattr(exc, "cause", None) or exc
    text = str(cause).strip()
    return f"{type(cause).__name__}: {text.splitlines()[-1] if text else ''}"


_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_DISK_NAMES = {os.strerror(n).lower(): os.strerror(n) for n in _DISK_ERRNOS} | {
    f"[errno {n}]": os.strerror(n) for n in _DISK_ERRNOS
}
_DISK_TEXT = re.compile("|".join(re.escape(k) for k in _DISK_NAMES), re.IGNORECASE)
_DISK_FILE = re.compile(
    "(?:{}): '([^']+)'".format("|".join(re.escape(os.strerror(n)) for n in _DISK_ERRNOS)), re.IGNORECASE
)


def chain(exc: BaseException) -> Iterator[BaseException]:
    """`exc` and every exception behind it: causes, contexts (also of `raise ... from None`), the
    `cause` a Ray error wraps, and the members of an exception group; each once."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen or not isinstance(e, BaseException):
            continue
        seen.add(id(e))
        yield e
        todo.extend([e.__cause__, e.__context__, getattr(e, "cause", None)])
        todo.extend(getattr(e, "exceptions", None) or ())


def disk_full(exc: BaseException) -> tuple[str, str | None] | None:
    """(what, file or None) if `exc` is or wraps a full disk or quota (ENOSPC / EDQUOT), else None.

    Found by errno, or in the text of an error that lost its type on the way (a Ray worker's error,
    pyarrow's "Detail: [errno 28] No space left on device")."""
    text_hit = None
    for e in chain(exc):
        if isinstance(e, OSError) and e.errno in _DISK_ERRNOS:
            return os.strerror(e.errno), e.filename if e.filename is None else str(e.filename)
        if text_hit is None:
            text = str(e)
            m = _DISK_TEXT.search(text)
            if m:
                f = _DISK_FILE.search(text)
                text_hit = (_DISK_NAMES[m.group(0).lower()], f.group(1) if f else None)
    return text_hit


def disk_full_message(what: str, file: str | None) -> str:
    """The one line a job ends with on a full disk."""
    where = f" writing {file}" if file else ""
    return (
        f"disk full ({what}){where}: free space on that filesystem (or raise its quota, or point the "
        "job's output folder elsewhere), then re-run the same command to continue; what was committed is kept"
    )
