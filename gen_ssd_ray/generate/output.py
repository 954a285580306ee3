"""The generation job's output: Parquet shards plus a manifest in one folder, written exactly once.

Contract:

- One row per trajectory, of exactly `OUTPUT_SCHEMA` (gen_ssd_ray.generate.rows, which also holds the
  typed row and its statuses); rows are validated by `rows_to_table` when a problem is added.
- Folder layout::

      part-00000.parquet   complete shards, each holding every row of the problems it lists
      _manifest.json       snapshot: version, fingerprint(s), committed shards with their problem ids
                           and row counts, totals (rewritten only when a writer opens the folder)
      _manifest.log        shards committed since the snapshot, one JSON line each (appended per shard)
      _config.yaml         the configuration that produced the data
      _lock                held (flock) by the one `ShardWriter` open on the folder
      .tmp-*               a write in progress; removed when a writer opens the folder

  Readers that skip names starting with "." and "_" (pandas.read_parquet, pyarrow.dataset.dataset,
  ray.data.read_parquet) therefore see only complete shards. `read_manifest` returns the snapshot with
  the log's shards merged in (the snapshot's dict shape, so folders written before the log existed read
  the same); `read_output` reads exactly the shards it lists.
- Committing a shard: its rows are written to `.tmp-part-NNNNN.parquet.<pid>`, fsynced, renamed to
  `part-NNNNN.parquet` and the folder fsynced; only then is one line ``{"shard": {...}}`` appended to
  `_manifest.log` (a single `os.write` of the whole line on an O_APPEND descriptor, then fsync). A
  flush writes O(shard) bytes and never rewrites the snapshot, so manifest bytes per committed problem
  stay constant however long the run.
- A kill at any moment leaves the old state or the new one, plus possibly a torn last log line (never
  read: a record counts only when its line ends in a newline and parses; an unparsable last line is
  ignored too) and one *orphan*: a renamed shard in neither the snapshot nor the log. Being renamed, it
  is complete, so the next writer adopts it unless its problem ids overlap committed ones, in which case
  it is deleted. A problem is therefore committed (`committed_ids`) in exactly one shard, with all its
  rows, after any number of kills and resumes; buffered problems lost in a kill are simply not committed
  and get generated again. An append interrupted inside the process (e.g. SIGTERM -> KeyboardInterrupt)
  is cut back to the last complete line and redone by the next `flush`/`close`.
- Compaction: a writer opening a folder whose log is not empty (or that it changes: orphans adopted,
  fingerprint recorded, no snapshot yet) writes the merged snapshot (temp file + fsync + rename + folder
  fsync), then removes the log and fsyncs the folder, all under `_lock` and before its first append, so
  a torn tail is gone before new records follow it. A kill between the two steps leaves log records that
  the snapshot already holds; readers drop log records whose shard name the snapshot lists, so nothing
  counts twice. `read_manifest` reads the log before the snapshot, so a compaction running meanwhile
  cannot hide a shard from it.
- The manifest records the config fingerprint. Opening a folder whose data has another fingerprint
  raises `FingerprintMismatchError` unless `force` is set, in which case the new fingerprint is
  appended to the manifest's `fingerprint_history` (each row also carries its `config_fingerprint`).
  Fingerprints change only when a writer opens the folder, so they live in the snapshot, never the log.
- `ShardWriter.manifest_bytes_written` counts the bytes a writer wrote to `_manifest.json` and
  `_manifest.log` (for benchmarks: scripts/bench_manifest.py).
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import json
import logging
import os
import re
from collections.abc import Iterable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from gen_ssd_ray.common.errors import InputError
from gen_ssd_ray.common.fsio import TMP_PREFIX, atomic_write_bytes, atomic_writer, fsync_dir
from gen_ssd_ray.generate.rows import OUTPUT_SCHEMA, empty_table, rows_to_table

log = logging.getLogger(__name__)

MANIFEST_NAME = "_manifest.json"
MANIFEST_LOG_NAME = "_manifest.log"
CONFIG_NAME = "_config.yaml"
LOCK_NAME = "_lock"
MANIFEST_VERSION = 1
_SHARD_RE = re.compile(r"^part-(\d+)\.parquet$")
_SHARD_KEYS = frozenset({"name", "problem_ids", "num_rows", "num_problems", "created"})


class FingerprintMismatchError(InputError):
    """The output folder holds data written with another config fingerprint."""


class OutputLockedError(RuntimeError):
    """Another ShardWriter (another process) has the output folder open."""


# --------------------------------------------------------------------------------------------------
# Files


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def _shard_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def _read_snapshot(path: Path) -> dict | None:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    manifest = json.loads(text)
    if manifest.get("version") != MANIFEST_VERSION:
        raise ValueError(f"{path}: unsupported manifest version {manifest.get('version')!r}")
    return manifest


def _log_line(entry: dict) -> bytes:
    """One log record: a single line (json.dumps escapes newlines inside strings)."""
    return (json.dumps({"shard": entry}, separators=(",", ":")) + "\n").encode()


def _read_log(path: Path) -> list[dict]:
    """The shard entries of the complete records in `path`, in order ([] when there is no log).

    The bytes after the last newline (a torn append) and an unparsable last line are ignored; an
    unparsable line followed by others is corruption (ValueError), as the writer never appends after one.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    lines = data.split(b"\n")
    torn = lines.pop()  # b"" when the log ends with a complete record
    if torn:
        log.debug("%s: ignoring a torn last record (%d bytes)", path, len(torn))
    entries = []
    for i, line in enumerate(lines):
        try:
            entry = json.loads(line)["shard"]
            if not (isinstance(entry, dict) and _SHARD_KEYS <= entry.keys()):
                raise ValueError(f"a shard record needs the keys {sorted(_SHARD_KEYS)}")
        except (ValueError, KeyError, TypeError) as e:
            if i == len(lines) - 1 and not torn:
                log.debug("%s: ignoring an unparsable last record (%s)", path, e)
                break
            raise ValueError(
                f"{path}: line {i + 1} is not a manifest record ({e}); the output folder was modified "
                "outside the writer"
            ) from e
        entries.append(entry)
    return entries


def _merge(manifest: dict, entries: Iterable[dict]) -> None:
    """Append to `manifest["shards"]` the entries whose shard it does not list yet; set the totals.

    O(listed shards): for readers and `ShardWriter` opening only, never per flush.
    """
    names = {s["name"] for s in manifest["shards"]}
    for entry in entries:
        if entry["name"] in names:  # already compacted into the snapshot, or appended twice
            continue
        names.add(entry["name"])
        manifest["shards"].append(entry)
        manifest["updated"] = entry["created"]
    manifest["num_problems"] = sum(s["num_problems"] for s in manifest["shards"])
    manifest["num_rows"] = sum(s["num_rows"] for s in manifest["shards"])


def read_manifest(out_dir: str | Path) -> dict | None:
    """The folder's manifest (snapshot plus log), or None when it has no snapshot (a fresh folder).

    Keys: version, fingerprint, fingerprint_history, shards ([{name, problem_ids, num_rows,
    num_problems, created}] in commit order), num_problems, num_rows, updated. Raises ValueError for an
    unsupported version or a corrupt log line that is not the last one.
    """
    out_dir = Path(out_dir)
    entries = _read_log(out_dir / MANIFEST_LOG_NAME)  # before the snapshot: see the module docstring
    manifest = _read_snapshot(out_dir / MANIFEST_NAME)
    if manifest is None:
        return None
    _merge(manifest, entries)
    return manifest


def read_output(out_dir: str | Path) -> pa.Table:
    """All rows of the shards the manifest lists (an empty table when there is no manifest)."""
    out_dir = Path(out_dir)
    manifest = read_manifest(out_dir)
    if not manifest or not manifest["shards"]:
        return empty_table()
    tables = [pq.read_table(out_dir / s["name"], schema=OUTPUT_SCHEMA) for s in manifest["shards"]]
    return pa.concat_tables(tables)


def _shard_problem_ids(table: pa.Table) -> list[str]:
    return list(dict.fromkeys(table.column("problem_id").to_pylist()))


def _append(fd: int, data: bytes) -> int:
    """One `os.write` on the log's O_APPEND descriptor; returns the bytes written (a test seam)."""
    return os.write(fd, data)


# --------------------------------------------------------------------------------------------------
# Writer


class ShardWriter:
    """Buffers finished problems and commits them in shards of `shard_size` problems, exactly once.

    Opening the folder: takes `_lock` (one writer per folder), checks the fingerprint, removes stale
    `.tmp-*` files, adopts orphan shards, compacts the manifest when needed and writes `_config.yaml`.
    See the module docstring. Use as a context manager or call `close()`; both flush what is buffered.

    `manifest_bytes_written`: bytes this writer has written to `_manifest.json` and `_manifest.log`.
    """

    def __init__(
        self,
        out_dir: str | Path,
        *,
        fingerprint: str,
        config_yaml: str,
        shard_size: int,
        force: bool = False,
    ) -> None:
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.out_dir = Path(out_dir)
        self.fingerprint = fingerprint
        self.shard_size = shard_size
        self.manifest_bytes_written = 0
        self._buffer: list[tuple[str, pa.Table]] = []
        self._buffered_ids: set[str] = set()
        self._pending: list[bytes] = []  # log lines of renamed shards, not yet appended
        self._log_fd: int | None = None
        self._log_size = 0  # end of the last complete line this writer appended
        self._closed = False
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._lock_fd = self._acquire_lock()
        try:
            self._open(config_yaml, force)
        except BaseException:
            self._close_log()
            self._release_lock()
            raise

    # -- opening ------------------------------------------------------------------------------------

    def _acquire_lock(self) -> int:
        fd = os.open(self.out_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputLockedError(
                f"output folder {self.out_dir} is open in another writer (lock {self.out_dir / LOCK_NAME} "
                "is held); wait for that job to finish or use another output.dir"
            ) from None
        return fd

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    def _close_log(self) -> None:
        if self._log_fd is not None:
            os.close(self._log_fd)
            self._log_fd = None

    def _open(self, config_yaml: str, force: bool) -> None:
        log_path = self.out_dir / MANIFEST_LOG_NAME
        entries = _read_log(log_path)
        manifest = _read_snapshot(self.out_dir / MANIFEST_NAME)
        # Any log content (records, or only a torn tail) is compacted away before the first append.
        changed = manifest is None or (log_path.exists() and log_path.stat().st_size > 0)
        if manifest is None:
            manifest = {
                "version": MANIFEST_VERSION,
                "fingerprint": None,
                "fingerprint_history": [],
                "shards": [],
            }
        _merge(manifest, entries)
        listed = {s["name"] for s in manifest["shards"]}
        for name in listed:
            if not (self.out_dir / name).is_file():
                raise FileNotFoundError(
                    f"{self.out_dir / name} is listed in {self.out_dir / MANIFEST_NAME} (or "
                    f"{MANIFEST_LOG_NAME}) but missing; the output folder was modified outside the writer"
                )

        # Read-only scan of orphans first: nothing is changed in a folder we may refuse.
        orphans: list[tuple[str, pa.Table | None]] = []
        indices = [-1]
        for p in self.out_dir.iterdir():
            m = _SHARD_RE.match(p.name)
            if not m:
                continue
            indices.append(int(m.group(1)))
            if p.name not in listed:
                try:
                    table = pq.read_table(p, columns=["problem_id", "config_fingerprint"])
                except Exception as e:  # not expected: orphans are complete by construction
                    log.warning("orphan shard %s is unreadable (%s); moving it aside", p, e)
                    table = None
                orphans.append((p.name, table))
        orphans.sort(key=lambda o: int(_SHARD_RE.match(o[0]).group(1)))
        self._next_index = max(indices) + 1

        folder_fps = [manifest["fingerprint"]] if manifest["fingerprint"] else []
        for _, table in orphans:
            if table is not None:
                folder_fps += [fp for fp in table.column("config_fingerprint").unique().to_pylist() if fp]
        other = next((fp for fp in folder_fps if fp != self.fingerprint), None)
        if other is not None:
            if not force:
                raise FingerprintMismatchError(
                    f"output folder {self.out_dir} holds data written with config fingerprint {other}, "
                    f"but this run's fingerprint is {self.fingerprint}. Use a new output.dir, or pass "
                    "output.force=true to continue in this folder with the new config."
                )
            log.warning(
                "output folder %s: fingerprint %s -> %s (output.force=true)",
                self.out_dir,
                other,
                self.fingerprint,
            )
        if manifest["fingerprint"] != self.fingerprint:
            manifest["fingerprint_history"].append(
                {"fingerprint": self.fingerprint, "recorded": _now(), "forced": other is not None}
            )
            manifest["fingerprint"] = self.fingerprint
            changed = True

        for p in self.out_dir.iterdir():
            if p.name.startswith(TMP_PREFIX):
                log.info("removing stale temporary file %s", p)
                if p.is_dir():
                    continue
                p.unlink(missing_ok=True)

        self._committed: set[str] = {pid for s in manifest["shards"] for pid in s["problem_ids"]}
        for name, table in orphans:
            path = self.out_dir / name
            if table is None:
                os.replace(path, self.out_dir / f".corrupt-{name}")
                continue
            ids = _shard_problem_ids(table)
            overlap = self._committed.intersection(ids)
            if overlap:
                log.warning(
                    "deleting orphan shard %s: %d of its problem ids are already committed (e.g. %s)",
                    path,
                    len(overlap),
                    sorted(overlap)[:3],
                )
                path.unlink()
                continue
            log.info("adopting orphan shard %s (%d problems, %d rows)", path, len(ids), table.num_rows)
            manifest["shards"].append(self._shard_entry(name, ids, table.num_rows))
            self._committed.update(ids)
            changed = True
        if orphans:
            fsync_dir(self.out_dir)

        # Running totals: nothing in flush may be O(committed problems).
        self._manifest = manifest
        self._num_problems = sum(s["num_problems"] for s in manifest["shards"])
        self._num_rows = sum(s["num_rows"] for s in manifest["shards"])
        if changed:
            self._compact()
        self._log_fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._log_size = os.fstat(self._log_fd).st_size
        fsync_dir(self.out_dir)  # the log's name, when it was just created
        atomic_write_bytes(self.out_dir / CONFIG_NAME, config_yaml.encode())

    def _compact(self) -> None:
        """Write the whole manifest as the snapshot, then drop the log (opening only, under the lock)."""
        m = self._manifest
        m["num_problems"] = self._num_problems
        m["num_rows"] = self._num_rows
        m["updated"] = _now()
        data = json.dumps(m, indent=1).encode()
        atomic_write_bytes(self.out_dir / MANIFEST_NAME, data)  # fsyncs the folder
        self.manifest_bytes_written += len(data)
        # A kill here leaves log records the snapshot already lists: readers drop them by shard name.
        # Unlinking (not truncating) keeps a reader that has the old log open reading whole lines.
        (self.out_dir / MANIFEST_LOG_NAME).unlink(missing_ok=True)
        fsync_dir(self.out_dir)

    # -- public API ---------------------------------------------------------------------------------

    @property
    def committed_ids(self) -> set[str]:
        """Problem ids in committed shards (a copy)."""
        return set(self._committed)

    @property
    def num_buffered(self) -> int:
        """Problems added but not yet written."""
        return len(self._buffer)

    def __contains__(self, problem_id: str) -> bool:
        """Whether `problem_id` is committed or buffered."""
        return problem_id in self._committed or problem_id in self._buffered_ids

    def add(self, problem_id: str, rows: list[dict]) -> str | None:
        """Buffer one finished problem (all its trajectory rows); flush when `shard_size` are buffered.

        Rows are validated now (`rows_to_table`); a row without `problem_id` gets this one. Returns the
        name of the shard written, if any. Raises ValueError for an id already committed or buffered,
        for no rows, or for rows of another problem.
        """
        self._check_open()
        if problem_id in self._committed:
            raise ValueError(f"problem {problem_id!r} is already committed in {self.out_dir}")
        if problem_id in self._buffered_ids:
            raise ValueError(f"problem {problem_id!r} was already added (buffered, not yet written)")
        if not rows:
            raise ValueError(f"problem {problem_id!r}: no rows (write an error row instead)")
        fixed = []
        for row in rows:
            if row.get("problem_id", problem_id) != problem_id:
                raise ValueError(f"problem {problem_id!r}: got a row of problem {row['problem_id']!r}")
            fixed.append({**row, "problem_id": problem_id})
        try:
            table = rows_to_table(fixed)
        except ValueError as e:
            raise ValueError(f"problem {problem_id!r}: {e}") from e
        self._buffer.append((problem_id, table))
        self._buffered_ids.add(problem_id)
        if len(self._buffer) >= self.shard_size:
            return self.flush()
        return None

    def flush(self) -> str | None:
        """Commit the buffered problems as one shard; returns its name (None when nothing is buffered).

        Also appends the log records of earlier shards whose append was interrupted.
        """
        self._check_open()
        if not self._buffer:
            self._append_pending()
            return None
        ids = [pid for pid, _ in self._buffer]
        table = pa.concat_tables([t for _, t in self._buffer])
        name = _shard_name(self._next_index)
        # The folder is fsynced below, after the bookkeeping.
        with atomic_writer(self.out_dir / name, sync_dir=False) as f:
            pq.write_table(table, f, compression="zstd")
        # The shard is complete and visible: it is committed from here on, even if what follows fails
        # (a crash now leaves an orphan that the next open adopts; a retry must not write it twice).
        self._next_index += 1
        entry = self._shard_entry(name, ids, table.num_rows)
        self._manifest["shards"].append(entry)
        self._num_problems += len(ids)
        self._num_rows += table.num_rows
        self._committed.update(ids)
        self._pending.append(_log_line(entry))
        self._buffer.clear()
        self._buffered_ids.clear()
        fsync_dir(self.out_dir)  # the rename is durable before the record that lists it
        self._append_pending()
        return name

    def close(self) -> str | None:
        """Flush what is buffered and release the folder; returns the last shard's name, if any."""
        if self._closed:
            return None
        try:
            return self.flush()
        finally:
            self._closed = True
            self._close_log()
            self._release_lock()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        # Buffered problems are finished and valid: keep them, but never mask the original error.
        try:
            self.close()
        except Exception:
            log.exception("flushing %s while handling another error failed", self.out_dir)

    # -- internals ----------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"ShardWriter for {self.out_dir} is closed")

    @staticmethod
    def _shard_entry(name: str, ids: Iterable[str], num_rows: int) -> dict:
        ids = list(ids)
        return {
            "name": name,
            "problem_ids": ids,
            "num_rows": num_rows,
            "num_problems": len(ids),
            "created": _now(),
        }

    def _append_pending(self) -> None:
        """Append the pending log lines, each with one write and an fsync, oldest first.

        Bytes past `_log_size` are the remains of an append interrupted in this process (a part of a
        line, or a whole line whose bookkeeping did not run): they are cut off and the line, still
        pending, is written again, so a torn line is never followed by another record.
        """
        fd = self._log_fd
        while self._pending:
            line = self._pending[0]
            if os.fstat(fd).st_size != self._log_size:
                os.ftruncate(fd, self._log_size)
            written = _append(fd, line)
            self.manifest_bytes_written += written
            if written != len(line):
                os.ftruncate(fd, self._log_size)
                raise OSError(
                    f"{self.out_dir / MANIFEST_LOG_NAME}: short write ({written} of {len(line)} bytes; "
                    "is the disk full?)"
                )
            os.fsync(fd)
            # In this order: an interrupt between the two lines re-appends a duplicate (dropped by
            # readers), never loses the record.
            self._log_size += len(line)
            self._pending.pop(0)
