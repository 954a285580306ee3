"""The generation job's output writer: Parquet shards plus a manifest in one folder, written exactly once.

Contract (the folder's format and its readers, `read_manifest` / `read_output` / `live_shards`, are
gen_ssd_ray.generate.manifest; this module is the one writer of that format):

- One row per trajectory, of exactly `OUTPUT_SCHEMA` (gen_ssd_ray.generate.rows, which also holds the
  typed row and its statuses); rows are validated by `rows_to_table` when a problem is added.
- The writer's own files, next to the shards and the manifest::

      _config.yaml         the configuration that produced the data
      _lock                held (flock) by the one `ShardWriter` open on the folder (the job-folder lock
                           of gen_ssd_ray.common.joblock, shared by every job); a lease on object stores
      .tmp-*               a write in progress; removed when a writer opens the folder

  The snapshot `_manifest.json` is rewritten only when a writer opens the folder; `_manifest.log`
  grows by one record per committed shard.
- The folder (`output.dir`) is a local path or an object-store URI (``s3://bucket/prefix``, ``gs://...``:
  gen_ssd_ray.common.storage). Both follow the same contract; the local protocol is described first,
  then what differs on an object store (no rename, no flock, no append).
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
- On an object store (`ShardWriter.remote`):

      part-00000-1a2b3c4d.parquet   a shard: one PUT (an object is absent or complete); the suffix is
                                    the first 8 hex digits of its writer's lease id, so two writers
                                    never write the same name
      _manifest.json                the snapshot, plus `log_seq`: the last log record it includes
      _manifest.log/000000000007.json
                                    one commit record per shard (``{"shard": {...}}``), created with an
                                    exclusive PUT (`Storage.create_bytes`, If-None-Match) at the next seq
      _lock                         the writer's lease (joblock.ObjectLease, renewed; a killed job's
                                    lease is taken over after its ttl, GEN_SSD_LEASE_TTL_S)

  The lease is checked before every shard PUT and every record (`LeaseLostError` -> `OutputWriteError`:
  the job ends, exit 1). A record whose seq is taken means another writer commits here too: the writer
  stops with `OutputWriteError` (EEXIST) naming that object and never overwrites it. Opening reads the
  log records (before the snapshot, as locally) and keeps those after the snapshot's `log_seq`; a
  record that does not parse is damage (objects appear whole), repaired by a writer as below.
  Compaction PUTs the new snapshot (`log_seq` = the last record seen), then deletes those records; a
  kill between the two leaves records with seq <= `log_seq`, which readers skip. A shard PUT whose
  record was never created (a kill, a lost connection) is an orphan, complete by construction, adopted
  or deleted by the next writer exactly as locally. Such a shard is therefore committed in every sense
  that matters to readers of the raw folder (pandas.read_parquet("s3://..."), pyarrow.dataset,
  ray.data.read_parquet, datasets.load_dataset("parquet", data_files="s3://.../*.parquet")): they see
  the part-* objects and skip the names starting with "_" or "." (the manifest, its log, the lease),
  and an orphan they may read is one that the next writer adopts, unless its problems were committed
  elsewhere, which only a second writer racing a lost lease can cause (its record is then refused, and
  the next writer deletes the orphan). `_config.yaml`, `_failures.json` (gen_ssd_ray.generate.failures)
  and the damaged copies (`<name>.corrupt-<time>`) are written through `Storage` too.
  `read_manifest`, `read_output` (and `live_shards`) accept the URI; pyarrow reads through
  `Storage.arrow()`.
- The manifest records the config fingerprint. Opening a folder whose data has another fingerprint
  raises `FingerprintMismatchError` unless `force` is set, in which case the new fingerprint is
  appended to the manifest's `fingerprint_history` (each row also carries its `config_fingerprint`).
  Fingerprints change only when a writer opens the folder, so they live in the snapshot, never the log.
- `ShardWriter.manifest_bytes_written` counts the bytes a writer wrote to `_manifest.json` and
  `_manifest.log` (for benchmarks: scripts/bench_manifest.py).
- Content: a problem may be added with its content hash (gen_ssd_ray.generate.content: sha256 of its
  id, question and gold answer). The shard's manifest entry then holds `content_hashes`, parallel to
  `problem_ids` (null where unknown), and the shard file holds the same in its Arrow schema metadata
  (`SHARD_META_KEY`), so an orphan or a shard re-adopted after a lost manifest keeps them. Folders
  written before hashes existed have no such key and read as before (`content_hashes` is then {}).
- Redoing a problem (`ShardWriter.redo`, used by the job when a problem's content changed and
  `output.force` is set): its id leaves `committed_ids`, and the shard that next commits it lists it
  in `supersedes` (entry and shard metadata). **A problem's rows are those of the last shard, in commit
  order, that lists it**: `read_output` (and `live_shards`, for readers that read shard files
  themselves) drop its rows from earlier shards. The manifest's `num_problems` counts each problem
  once (superseded entries are subtracted); `num_rows` counts every row of every listed shard.
  Readers of the raw folder (pandas.read_parquet of the folder) see superseded rows too: after a
  forced redo, read through `read_output` / `live_shards`.
- Damage: a snapshot or log that does not parse or lacks keys (a truncated or empty file, wrong types)
  is `ManifestError` (an InputError: exit 2) for readers, naming the file and the fix; a writer opening
  the folder repairs it instead: it keeps a copy of the damaged files (`<name>.corrupt-<time>`, ignored
  by readers), re-adopts every shard file as an orphan and writes a new snapshot over the damaged one (each holds its rows, hence its problem ids,
  fingerprint and, in its metadata, content hashes), so committed shards are never lost. A manifest of
  another version (`ManifestVersionError`) and a listed shard that is missing (without `force`) are not
  repaired: the message says what to do. A second writer is refused (`OutputLockedError`, exit 2).
- A write that fails (a full disk: ENOSPC, or any other OSError) raises `OutputWriteError`, an OSError
  with the original errno whose message names the folder: the partial temporary file is removed,
  nothing committed is lost (a shard renamed before its log record failed is an orphan the next
  writer adopts), and the writer is closed for writing (`close` then only releases the folder).
"""

from __future__ import annotations

import datetime as _dt
import errno
import io
import json
import logging
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from gen_ssd_ray.common.errors import InputError
from gen_ssd_ray.common.fsio import TMP_PREFIX, atomic_write_bytes, atomic_writer, fsync_dir
from gen_ssd_ray.common.joblock import (
    LOCK_NAME,
    FolderLock,
    FolderLockedError,
    LeaseLostError,
    ObjectLease,
    lock_job_folder,
)
from gen_ssd_ray.common.storage import Storage, is_remote
from gen_ssd_ray.generate.manifest import (
    CONFIG_NAME,
    MANIFEST_LOG_NAME,
    MANIFEST_NAME,
    MANIFEST_VERSION,
    SHARD_META_KEY,
    SHARD_RE,
    ManifestError,
    ManifestVersionError,
    log_line,
    log_object,
    log_seqs,
    merge,
    read_log,
    read_log_objects,
    read_snapshot,
    shard_meta,
    shard_name,
)
from gen_ssd_ray.generate.rows import rows_to_table

log = logging.getLogger(__name__)


class FingerprintMismatchError(InputError):
    """The output folder holds data written with another config fingerprint."""


class OutputLockedError(FolderLockedError):
    """Another job (a ShardWriter in another process, or any job holding the folder's lock) has the output
    folder open."""


class OutputWriteError(OSError):
    """Writing to the output folder failed (e.g. ENOSPC); `errno` is the original one, the message
    names the folder and what to do."""

    def __str__(self) -> str:
        return str(self.strerror)


# --------------------------------------------------------------------------------------------------
# Files


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def _shard_problem_ids(table: pa.Table) -> list[str]:
    return list(dict.fromkeys(table.column("problem_id").to_pylist()))


def _append(fd: int, data: bytes) -> int:
    """One `os.write` on the log's O_APPEND descriptor; returns the bytes written (a test seam)."""
    return os.write(fd, data)


# --------------------------------------------------------------------------------------------------
# Writer


class ShardWriter:
    """Buffers finished problems and commits them in shards of `shard_size` problems, exactly once.

    Opening the folder: takes `_lock` (one writer per folder), repairs a damaged manifest, checks the
    fingerprint, removes stale `.tmp-*` files, adopts orphan shards, compacts the manifest when needed
    and writes `_config.yaml`. See the module docstring. Use as a context manager or call `close()`;
    both flush what is buffered. `force`: a different fingerprint is accepted, and a listed shard that
    is missing is forgotten (its problems are generated again).

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
        # An object store (s3://...) or a local folder: `storage` reads and writes both; the local
        # branches below keep the local protocol (rename, flock, O_APPEND log), see the module doc.
        self.remote = is_remote(str(out_dir))
        self.storage = Storage(str(out_dir), key="output.dir")
        self.out_dir = self.storage.uri if self.remote else Path(self.storage.uri)  # file://x -> x
        self.fingerprint = fingerprint
        self.shard_size = shard_size
        self.manifest_bytes_written = 0
        self._buffer: list[tuple[str, pa.Table]] = []
        self._buffer_hashes: dict[str, str] = {}
        self._redo: set[str] = set()  # uncommitted by `redo`: their next commit supersedes old rows
        self._failed = False  # a write failed: nothing more is written (see OutputWriteError)
        self._buffered_ids: set[str] = set()
        self._pending: list[bytes] = []  # log lines of renamed shards, not yet appended
        self._log_fd: int | None = None
        self._log_size = 0  # end of the last complete line this writer appended
        self._seq = 0  # object store: the seq of the next log record
        self._log_seqs: list[int] = []  # object store: log records present when the folder was opened
        self._closed = False
        if not self.remote:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        self._lock: FolderLock | ObjectLease | None = self._acquire_lock()
        # Object-store shard names carry the writer's lease id: two writers never PUT the same name.
        self._tag = self._lock.lease_id[:8] if isinstance(self._lock, ObjectLease) else ""
        try:
            self._open(config_yaml, force)
        except BaseException:
            self._close_log()
            self._release_lock()
            raise

    # -- opening ------------------------------------------------------------------------------------

    def _acquire_lock(self) -> FolderLock | ObjectLease:
        if self.remote and self.storage.exists(LOCK_NAME):
            log.info(
                "output folder %s: a lease (%s) is there; waiting for its holder to let go or for it to "
                "expire (up to its ttl, GEN_SSD_LEASE_TTL_S) before writing",
                self.out_dir,
                self.storage.uri_of(LOCK_NAME),
            )
        try:
            return lock_job_folder(self.out_dir, "generate")
        except FolderLockedError as e:
            raise OutputLockedError(str(e), e.path, e.holder) from None

    def _release_lock(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _close_log(self) -> None:
        if self._log_fd is not None:
            os.close(self._log_fd)
            self._log_fd = None

    def _set_aside(self, error: ManifestError) -> None:
        """Keep a copy of a damaged snapshot and log (for inspection, ignored by readers). The damaged
        files themselves stay until the rebuilt snapshot replaces them (`_compact`), so a writer that
        refuses the folder later in `_open` leaves readers the same clear error, not an empty folder."""
        stamp = _dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%S")
        log.warning("%s: rebuilding the manifest from the shard files (a copy of it is kept)", error)
        if self.remote:
            names = [MANIFEST_NAME, *(log_object(seq) for seq in self._log_seqs)]
            for name in names:
                try:
                    data = self.storage.read_bytes(name)
                except FileNotFoundError:
                    continue
                head, _, tail = name.partition("/")
                self.storage.write_bytes(f"{head}.corrupt-{stamp}" + (f"/{tail}" if tail else ""), data)
            return
        for name in (MANIFEST_NAME, MANIFEST_LOG_NAME):
            path = self.out_dir / name
            if path.exists():
                shutil.copyfile(path, self.out_dir / f"{name}.corrupt-{stamp}")
        fsync_dir(self.out_dir)

    def _open(self, config_yaml: str, force: bool) -> None:
        log_path = self.out_dir / MANIFEST_LOG_NAME if not self.remote else None
        try:
            if self.remote:
                self._log_seqs = log_seqs(self.storage)
                records = read_log_objects(self.storage, self._log_seqs)  # before the snapshot
                manifest = read_snapshot((self.storage, MANIFEST_NAME))
                done = manifest.get("log_seq", -1) if manifest else -1
                entries = [e for seq, e in records if seq > done]  # the others are in the snapshot
            else:
                entries = read_log(log_path)
                manifest = read_snapshot(self.out_dir / MANIFEST_NAME)
        except ManifestVersionError:
            raise
        except ManifestError as e:  # repaired: every shard file is re-adopted below, as an orphan
            self._set_aside(e)
            entries, manifest = [], None
        if self.remote:
            # Records continue after every seq seen (listed, or compacted into the snapshot).
            done = manifest.get("log_seq", -1) if manifest else -1
            self._seq = max([done, *self._log_seqs]) + 1
            changed = manifest is None or bool(self._log_seqs)
        else:
            # Any log content (records, or only a torn tail) is compacted away before the first append.
            changed = manifest is None or (log_path.exists() and log_path.stat().st_size > 0)
        if manifest is None:
            manifest = {
                "version": MANIFEST_VERSION,
                "fingerprint": None,
                "fingerprint_history": [],
                "shards": [],
            }
        merge(manifest, entries)
        # The folder's top-level file names (shards, temporary files): one listing.
        if self.remote:
            present = [n for n in self.storage.list() if "/" not in n]
        else:
            present = [p.name for p in self.out_dir.iterdir() if p.is_file()]
        present_set = set(present)
        missing = [s for s in manifest["shards"] if s["name"] not in present_set]
        if missing and not force:
            s = missing[0]
            raise ManifestError(
                f"{self._where(s['name'])} is listed in {self._where(MANIFEST_NAME)} but missing "
                f"({len(missing)} listed shards are): restore it, or pass output.force=true to forget "
                f"them and generate their {sum(m['num_problems'] for m in missing)} problems again"
            )
        if missing:
            log.warning(
                "forgetting %d missing shards (output.force=true): %s",
                len(missing),
                [m["name"] for m in missing[:5]],
            )
            manifest["shards"] = [s for s in manifest["shards"] if s not in missing]
            changed = True
        listed = {s["name"] for s in manifest["shards"]}

        # Read-only scan of orphans first: nothing is changed in a folder we may refuse.
        orphans: list[tuple[str, pa.Table | None]] = []
        indices = [-1]
        fs, root = self.storage.arrow()
        for name in present:
            m = SHARD_RE.match(name)
            if not m or (bool(self.remote) != ("-" in name[len("part-") :])):
                continue  # local folders hold part-NNNNN.parquet, object stores part-NNNNN-<tag>.parquet
            indices.append(int(m.group(1)))
            if name not in listed:
                try:
                    table = pq.read_table(
                        f"{root}/{name}", columns=["problem_id", "config_fingerprint"], filesystem=fs
                    )
                except Exception as e:  # not expected: orphans are complete by construction
                    log.warning("orphan shard %s is unreadable (%s); moving it aside", self._where(name), e)
                    table = None
                orphans.append((name, table))
        orphans.sort(key=lambda o: (int(SHARD_RE.match(o[0]).group(1)), o[0]))
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

        if not self.remote:  # an object store has no temporary files: a PUT appears whole
            for p in self.out_dir.iterdir():
                if p.name.startswith(TMP_PREFIX):
                    log.info("removing stale temporary file %s", p)
                    if p.is_dir():
                        continue
                    p.unlink(missing_ok=True)

        self._committed: set[str] = {pid for s in manifest["shards"] for pid in s["problem_ids"]}
        for name, table in orphans:
            path = self._where(name)
            if table is None:
                if self.remote:
                    self.storage.write_bytes(f".corrupt-{name}", self.storage.read_bytes(name))
                    self.storage.delete(name)
                else:
                    os.replace(path, self.out_dir / f".corrupt-{name}")
                continue
            ids = _shard_problem_ids(table)
            meta = shard_meta(f"{root}/{name}", fs)
            supersedes = [i for i in meta.get("supersedes") or () if i in ids]
            overlap = self._committed.intersection(ids) - set(supersedes)
            if overlap:
                log.warning(
                    "deleting orphan shard %s: %d of its problem ids are already committed (e.g. %s)",
                    path,
                    len(overlap),
                    sorted(overlap)[:3],
                )
                self.storage.delete(name)
                continue
            log.info("adopting orphan shard %s (%d problems, %d rows)", path, len(ids), table.num_rows)
            hashes = meta.get("content_hashes") if isinstance(meta.get("content_hashes"), dict) else {}
            supersedes = [i for i in supersedes if i in self._committed]
            manifest["shards"].append(self._shard_entry(name, ids, table.num_rows, hashes, supersedes))
            self._committed.update(ids)
            changed = True
        if orphans and not self.remote:
            fsync_dir(self.out_dir)

        # Running totals: nothing in flush may be O(committed problems).
        self._manifest = manifest
        self._num_problems = sum(
            s["num_problems"] - len(s.get("supersedes") or ()) for s in manifest["shards"]
        )
        self._num_rows = sum(s["num_rows"] for s in manifest["shards"])
        try:
            if changed:
                self._compact()
            if self.remote:
                self.storage.write_bytes(CONFIG_NAME, config_yaml.encode())
                return
            self._log_fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            self._log_size = os.fstat(self._log_fd).st_size
            fsync_dir(self.out_dir)  # the log's name, when it was just created
            atomic_write_bytes(self.out_dir / CONFIG_NAME, config_yaml.encode())
        except OSError as e:
            raise self._write_error(e, "opening it (manifest, _config.yaml)") from e

    def _where(self, name: str) -> str:
        """`name` in the output folder, as messages show it (a path, or the object's URI)."""
        return self.storage.uri_of(name) if self.remote else str(self.out_dir / name)

    def _write_error(self, e: OSError, doing: str) -> OutputWriteError:
        self._failed = True
        why = e.strerror or str(e)
        fix = (
            "check the store's credentials and quota"
            if self.remote
            else "free disk space (or use another output.dir)"
        )
        return OutputWriteError(
            e.errno,
            f"output folder {self.out_dir}: {doing} failed: {why}. Nothing committed is lost (partial files "
            f"are removed); {fix}, then re-run the same command",
            str(self.out_dir),  # the filename: a full disk's one line (common/errors.py) names it
        )

    def _compact(self) -> None:
        """Write the whole manifest as the snapshot, then drop the log (opening only, under the lock)."""
        m = self._manifest
        m["num_problems"] = self._num_problems
        m["num_rows"] = self._num_rows
        m["updated"] = _now()
        if self.remote:
            # The snapshot says which log records it holds; a kill between its PUT and the deletes
            # leaves records that readers skip by seq (and by shard name).
            m["log_seq"] = self._seq - 1
            data = json.dumps(m, indent=1).encode()
            self.storage.write_bytes(MANIFEST_NAME, data)
            self.manifest_bytes_written += len(data)
            for seq in self._log_seqs:
                self.storage.delete(log_object(seq))
            self._log_seqs = []
            return
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
    def content_hashes(self) -> dict[str, str]:
        """Committed problem id -> the content hash recorded with its (latest) rows; problems committed
        without one are absent ({} for folders written before hashes were recorded). Built from the
        manifest on each call (O(committed)): the job asks once, when it opens the folder."""
        latest: dict[str, str | None] = {}
        for s in self._manifest["shards"]:
            hashes = s.get("content_hashes")
            if hashes is not None:
                latest.update(zip(s["problem_ids"], hashes, strict=True))
            elif latest:
                latest.update(dict.fromkeys(s["problem_ids"]))
        return {pid: h for pid, h in latest.items() if h is not None and pid in self._committed}

    def redo(self, problem_ids: Iterable[str]) -> None:
        """Uncommit these problems: they are generated (added) again, and the shard that commits them
        supersedes their rows in earlier shards (see the module docstring). Unknown ids are ignored."""
        self._check_open()
        ids = self._committed.intersection(problem_ids)
        self._committed -= ids
        self._redo |= ids

    @property
    def num_buffered(self) -> int:
        """Problems added but not yet written."""
        return len(self._buffer)

    def __contains__(self, problem_id: str) -> bool:
        """Whether `problem_id` is committed or buffered."""
        return problem_id in self._committed or problem_id in self._buffered_ids

    def add(self, problem_id: str, rows: list[dict], content_hash: str | None = None) -> str | None:
        """Buffer one finished problem (all its trajectory rows); flush when `shard_size` are buffered.

        Rows are validated now (`rows_to_table`); a row without `problem_id` gets this one.
        `content_hash` is recorded with the problem (gen_ssd_ray.generate.content). Returns the name of
        the shard written, if any. Raises ValueError for an id already committed or buffered, for no
        rows, or for rows of another problem; OutputWriteError when the shard cannot be written.
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
        if content_hash is not None:
            self._buffer_hashes[problem_id] = content_hash
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
        hashes = {pid: self._buffer_hashes[pid] for pid in ids if pid in self._buffer_hashes}
        supersedes = [pid for pid in ids if pid in self._redo]
        meta = {k: v for k, v in (("content_hashes", hashes), ("supersedes", supersedes)) if v}
        if meta:
            table = table.replace_schema_metadata({SHARD_META_KEY: json.dumps(meta).encode()})
        name = shard_name(self._next_index, self._tag)
        if self.remote:
            self._check_lease()
        # The folder is fsynced below, after the bookkeeping.
        try:
            if self.remote:  # one PUT: the object appears whole or not at all
                buf = io.BytesIO()
                pq.write_table(table, buf, compression="zstd")
                self.storage.write_bytes(name, buf.getvalue())
            else:
                with atomic_writer(self.out_dir / name, sync_dir=False) as f:  # removes its temp on error
                    pq.write_table(table, f, compression="zstd")
        except OSError as e:
            raise self._write_error(e, f"writing shard {name} ({len(ids)} problems, not committed)") from e
        # The shard is complete and visible: it is committed from here on, even if what follows fails
        # (a crash now leaves an orphan that the next open adopts; a retry must not write it twice).
        self._next_index += 1
        entry = self._shard_entry(name, ids, table.num_rows, hashes, supersedes)
        self._manifest["shards"].append(entry)
        self._num_problems += len(ids) - len(supersedes)
        self._num_rows += table.num_rows
        self._committed.update(ids)
        self._redo.difference_update(supersedes)
        self._pending.append(log_line(entry))
        self._buffer.clear()
        self._buffered_ids.clear()
        self._buffer_hashes.clear()
        try:
            if not self.remote:
                fsync_dir(self.out_dir)  # the rename is durable before the record that lists it
            self._append_pending()
        except OSError as e:  # the shard is renamed: the next writer adopts it as an orphan
            raise self._write_error(e, f"recording shard {name} in {MANIFEST_LOG_NAME}") from e
        return name

    def close(self) -> str | None:
        """Flush what is buffered and release the folder; returns the last shard's name, if any."""
        if self._closed:
            return None
        try:
            if self._failed:  # the error was raised already; what is buffered is generated again
                log.warning(
                    "closing %s after a failed write: %d buffered problems not written",
                    self.out_dir,
                    len(self._buffer),
                )
                return None
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
        if self._failed:
            raise OutputWriteError(
                errno.EIO, f"output folder {self.out_dir}: an earlier write failed; re-run the same command"
            )

    @staticmethod
    def _shard_entry(
        name: str,
        ids: Iterable[str],
        num_rows: int,
        hashes: dict[str, str] | None = None,
        supersedes: list[str] | None = None,
    ) -> dict:
        ids = list(ids)
        entry = {
            "name": name,
            "problem_ids": ids,
            "num_rows": num_rows,
            "num_problems": len(ids),
            "created": _now(),
        }
        if hashes:
            entry["content_hashes"] = [hashes.get(pid) for pid in ids]
        if supersedes:
            entry["supersedes"] = list(supersedes)
        return entry

    def _append_pending(self) -> None:
        """Append the pending log lines, each with one write and an fsync, oldest first.

        Bytes past `_log_size` are the remains of an append interrupted in this process (a part of a
        line, or a whole line whose bookkeeping did not run): they are cut off and the line, still
        pending, is written again, so a torn line is never followed by another record.
        """
        if self.remote:
            self._put_pending()
            return
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

    def _check_lease(self) -> None:
        """Raise OutputWriteError (the job ends, exit 1) if this writer lost the folder's lease."""
        try:
            self._lock.check()
        except LeaseLostError as e:
            self._failed = True
            raise OutputWriteError(
                errno.EBUSY, f"output folder {self.out_dir}: {e}", str(self.out_dir)
            ) from None

    def _put_pending(self) -> None:
        """Object store: create one log record object per pending line, exclusively, oldest first.

        A name already taken means another writer commits to this folder too: stop (never overwrite),
        naming the object; what this writer wrote is an orphan that the next writer adopts or deletes.
        """
        while self._pending:
            self._check_lease()
            line = self._pending[0]
            name = log_object(self._seq)
            if not self.storage.create_bytes(name, line):
                self._failed = True
                raise OutputWriteError(
                    errno.EEXIST,
                    f"output folder {self.out_dir}: log record {self.storage.uri_of(name)} was created by "
                    "another writer: two jobs write this output (the other one took the lease over). Stop "
                    "the other job (or give this one another output.dir), then re-run the same command",
                    str(self.out_dir),
                )
            self.manifest_bytes_written += len(line)
            self._seq += 1
            self._pending.pop(0)
