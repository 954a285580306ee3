"""The failure model every job shares, and the exit code each failure maps to.

- `InputError` (a ValueError): bad config, model, data or output folder, found before anything
  started. The message names the key and the fix. Exit 2.
- `JobFailed`: the job ran and could not finish (engines that never started, work that failed on
  every attempt). What finished is kept; the message says how to continue (normally: re-run the same
  command). Exit 1.
- `JobInterrupted`: SIGINT or SIGTERM (`ray job stop`). What finished is kept. Exit 130.

`JobFailed` and `JobInterrupted` may carry the job's summary, which the entry point prints before the
message (gen_ssd_ray.common.cli). `reason(exc)` is the one-line description of any exception that a
job logs or writes into an error row.
"""

from __future__ import annotations

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
