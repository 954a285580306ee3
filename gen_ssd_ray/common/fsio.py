"""Durable file writes: a file is either its old content or its complete new content, never a part.

What this module knows:
- `atomic_writer(path)`: a context manager that yields a binary file open on a temporary sibling
  ``<TMP_PREFIX><name>.<pid>`` (same folder, so same file system). On a normal exit it flushes and fsyncs
  the file, renames it over `path` (`os.replace`) and fsyncs the folder, so the rename itself survives a
  crash. On an exception (KeyboardInterrupt included) it removes the temporary file and re-raises; `path`
  keeps its old content, or stays absent. The parent folder is created if missing.
  `sync_dir=False` skips the folder fsync, for a caller that must record the rename before syncing.
- `atomic_write_bytes`, `atomic_write_text` (UTF-8) and `atomic_write_json` (``json.dumps(obj, **kw)``
  plus a trailing newline) are that writer for one value.
- `fsync_dir(path)`: fsync a folder (after creating, renaming or deleting entries in it).
- `TMP_PREFIX`: every temporary name starts with it, so readers that skip names starting with "." never
  see a write in progress, and an owner of a folder may delete leftovers of a killed writer by prefix.

What it does not know: locking. Concurrent writers of one path in different processes do not corrupt each
other (each has its own temporary file; the last rename wins), but two threads of one process writing the
same path share a temporary name and must not. A hard kill (SIGKILL, power loss) in the middle of a write
can leave a temporary file behind; cleaning those up belongs to whoever owns the folder. File permissions
are the ordinary ones (``open`` with the process umask). Folders are replaced by their owners (see
`gen_ssd_ray.common.models`), not here.

Standard library only; importing it is cheap.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

TMP_PREFIX = ".tmp-"


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """fsync the folder `path` (its entries: names created, renamed or removed in it)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike[str], *, sync_dir: bool = True) -> Iterator[BinaryIO]:
    """Yield a binary file whose content replaces `path` atomically and durably when the block exits."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if sync_dir:
        fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Replace `path` with `data`, atomically and durably (see `atomic_writer`)."""
    with atomic_writer(path) as fh:
        fh.write(data)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Replace `path` with `text` encoded as UTF-8, atomically and durably (see `atomic_writer`)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any, **json_kwargs: Any) -> None:
    """Replace `path` with ``json.dumps(obj, **json_kwargs)`` and a newline, atomically and durably."""
    atomic_write_text(path, json.dumps(obj, **json_kwargs) + "\n")
