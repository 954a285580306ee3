"""The generation output folder's format, and its readers: what a committed shard is, for everyone who reads.

Contract:

- Layout (written only by `gen_ssd_ray.generate.output.ShardWriter`, whose docstring gives the commit
  protocol and what a kill leaves behind)::

      part-00000.parquet            a complete shard (local disk); on an object store
      part-00000-1a2b3c4d.parquet   the suffix is the first 8 hex digits of its writer's lease id
      _manifest.json                the snapshot: version, fingerprint(s), committed shards with their
                                    problem ids and row counts, totals; on an object store also
                                    `log_seq`, the last log record it includes
      _manifest.log                 local: shards committed since the snapshot, one JSON line each
      _manifest.log/000000000007.json
                                    object store: one record (``{"shard": {...}}``) per object
      _config.yaml, _failures.json, _lock, _journal/, .tmp-*, <name>.corrupt-<time>
                                    the writer's and the job's own files, never data

  Readers that skip names starting with "." and "_" (pandas.read_parquet, pyarrow.dataset.dataset,
  ray.data.read_parquet, datasets.load_dataset("parquet", data_files=".../*.parquet")) therefore see
  only complete shards, locally and on an object store (see the writer's docstring for the one orphan
  a kill can leave).
- `read_manifest(out_dir)` (a local path or an object-store URI) returns the snapshot with the log's
  shards merged in, in commit order (the snapshot's dict shape, so folders written before the log
  existed read the same). The log is read before the snapshot, so a compaction running meanwhile cannot
  hide a shard. Local log: a record counts only when its line ends in a newline and parses (a torn or
  unparsable *last* line is ignored; an unparsable line followed by others is damage). Object-store
  log: records with seq <= the snapshot's `log_seq` are already in it and skipped; a record that
  vanished since it was listed was compacted; one that does not parse is damage. Records naming a
  shard the snapshot lists are dropped, so nothing counts twice.
- **A problem's rows are those of the last shard, in commit order, that lists it**: a shard committing
  a redone problem lists it in `supersedes` (entry and shard metadata). `live_shards` gives, per shard,
  the ids whose rows in it are superseded; `read_output` reads exactly the live rows of the listed
  shards (pyarrow, through `Storage.arrow()` on object stores), as `OUTPUT_SCHEMA`: shards written
  before the conversation columns (row layout 1) are upgraded on read (`rows.upgrade_legacy`), so an
  old folder, or one a newer job resumed, reads as one table. The manifest's `num_problems` counts
  each problem once; `num_rows` counts every row of every listed shard.
- Shard metadata: a shard's Arrow schema metadata under `SHARD_META_KEY` holds ``{"content_hashes":
  {id: hash}, "supersedes": [id]}`` (`shard_meta`), so a shard re-adopted after a lost manifest keeps
  them; shards written before it existed have none ({}).
- Damage: a snapshot or log that does not parse or lacks keys (a truncated or empty file, wrong types)
  is `ManifestError` (an InputError: exit 2) naming the file and the fix (the writer repairs it when it
  next opens the folder); a manifest of another version is `ManifestVersionError` (not repaired).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from gen_ssd_ray.common.errors import InputError
from gen_ssd_ray.common.storage import Storage, is_remote
from gen_ssd_ray.generate.rows import OUTPUT_SCHEMA, empty_table, is_legacy, upgrade_legacy

log = logging.getLogger(__name__)

MANIFEST_NAME = "_manifest.json"
MANIFEST_LOG_NAME = "_manifest.log"
CONFIG_NAME = "_config.yaml"
MANIFEST_VERSION = 1
# Local shards are part-NNNNN.parquet; on an object store part-NNNNN-<8 hex of the writer's lease>.parquet.
SHARD_RE = re.compile(r"^part-(\d+)(?:-[0-9a-f]{8})?\.parquet$")
# An object-store log record: _manifest.log/<seq:012d>.json.
_LOG_OBJECT_RE = re.compile(r"^(\d{12})\.json$")
_SHARD_KEYS = frozenset({"name", "problem_ids", "num_rows", "num_problems", "created"})
# The Arrow schema metadata key of a shard's own record: {"content_hashes": {id: hash}, "supersedes": [id]}.
SHARD_META_KEY = b"gen_ssd_ray.shard"
_REPAIR = (
    "re-run the generation job on this folder (the same command) to rebuild the manifest from the shard "
    "files, or use another output.dir"
)


class ManifestError(InputError):
    """`_manifest.json` or `_manifest.log` cannot be read (truncated, empty, keys missing, wrong types),
    or lists a shard that is missing. A writer repairs the first kind (see the module docstring)."""


class ManifestVersionError(ManifestError):
    """The manifest was written by another version of the format: not repaired."""


# --------------------------------------------------------------------------------------------------
# Files


def shard_name(index: int, tag: str = "") -> str:
    return f"part-{index:05d}-{tag}.parquet" if tag else f"part-{index:05d}.parquet"


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _entry_problem(entry) -> str | None:
    """Why `entry` is not a valid shard record (None: it is)."""
    if not isinstance(entry, dict):
        return f"a shard record must be an object, got {type(entry).__name__}"
    missing = _SHARD_KEYS - entry.keys()
    if missing:
        return f"a shard record lacks the keys {sorted(missing)}"
    ids = entry["problem_ids"]
    if not (isinstance(entry["name"], str) and SHARD_RE.match(entry["name"])):
        return f"shard name {entry['name']!r} is not part-NNNNN.parquet (or part-NNNNN-<8 hex>.parquet)"
    if not (isinstance(ids, list) and all(isinstance(i, str) for i in ids)):
        return f"{entry['name']}: problem_ids must be a list of strings"
    if not (_is_int(entry["num_rows"]) and entry["num_problems"] == len(ids)):
        return f"{entry['name']}: num_rows / num_problems are not counts matching problem_ids"
    hashes = entry.get("content_hashes")
    if hashes is not None and not (
        isinstance(hashes, list)
        and len(hashes) == len(ids)
        and all(h is None or isinstance(h, str) for h in hashes)
    ):
        return f"{entry['name']}: content_hashes must be a list parallel to problem_ids"
    sup = entry.get("supersedes")
    if sup is not None and not (isinstance(sup, list) and all(isinstance(i, str) for i in sup)):
        return f"{entry['name']}: supersedes must be a list of problem ids"
    return None


def read_snapshot(path: Path | tuple[Storage, str]) -> dict | None:
    """The snapshot, checked (None when there is none); ManifestError when it is damaged. `path` is a
    local file or (storage, name) on an object store."""
    try:
        if isinstance(path, tuple):
            storage, name = path
            path = storage.uri_of(name)  # for the messages
            data = storage.read_bytes(name)
        else:
            data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise ManifestError(f"{path} cannot be read ({e.strerror or e}); {_REPAIR}") from None
    try:
        manifest = json.loads(data)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError: a truncated or empty file
        what = "is empty" if not data.strip() else f"is not valid JSON ({str(e).splitlines()[0]})"
        raise ManifestError(f"{path} {what}; {_REPAIR}") from None
    if not isinstance(manifest, dict):
        raise ManifestError(f"{path} is not a JSON object; {_REPAIR}")
    version = manifest.get("version")
    if version != MANIFEST_VERSION:
        if isinstance(version, int) and not isinstance(version, bool):
            raise ManifestVersionError(
                f"{path}: manifest version {version} is not this code's ({MANIFEST_VERSION}); open the folder "
                "with the gen-ssd-ray version that wrote it, or use another output.dir"
            )
        raise ManifestError(f"{path}: no valid 'version' key; {_REPAIR}")
    problem = None
    missing = {"fingerprint", "fingerprint_history", "shards"} - manifest.keys()
    if missing:
        problem = f"lacks the keys {sorted(missing)}"
    elif not (manifest["fingerprint"] is None or isinstance(manifest["fingerprint"], str)):
        problem = "'fingerprint' must be a string or null"
    elif not isinstance(manifest["fingerprint_history"], list):
        problem = "'fingerprint_history' must be a list"
    elif not isinstance(manifest["shards"], list):
        problem = "'shards' must be a list"
    else:
        problem = next((p for p in map(_entry_problem, manifest["shards"]) if p), None)
    if (
        problem is None
        and "log_seq" in manifest
        and not (_is_int(manifest["log_seq"]) or manifest["log_seq"] == -1)
    ):
        problem = "'log_seq' must be an integer >= -1"
    if problem:
        raise ManifestError(f"{path}: {problem}; {_REPAIR}")
    return manifest


def log_line(entry: dict) -> bytes:
    """One log record: a single line (json.dumps escapes newlines inside strings)."""
    return (json.dumps({"shard": entry}, separators=(",", ":")) + "\n").encode()


def read_log(path: Path) -> list[dict]:
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
            if problem := _entry_problem(entry):
                raise ValueError(problem)
        except (ValueError, KeyError, TypeError) as e:
            if i == len(lines) - 1 and not torn:
                log.debug("%s: ignoring an unparsable last record (%s)", path, e)
                break
            raise ManifestError(
                f"{path}: line {i + 1} is not a manifest record ({e}); the output folder was modified "
                f"outside the writer: {_REPAIR}"
            ) from None
        entries.append(entry)
    return entries


def log_object(seq: int) -> str:
    """The name of object-store log record `seq` in the output folder."""
    return f"{MANIFEST_LOG_NAME}/{seq:012d}.json"


def log_seqs(storage: Storage) -> list[int]:
    """The seqs of the log records present on an object store, ascending (other names are ignored)."""
    seqs = []
    for name in storage.list(MANIFEST_LOG_NAME):
        m = _LOG_OBJECT_RE.match(name[len(MANIFEST_LOG_NAME) + 1 :])
        if m:
            seqs.append(int(m.group(1)))
    return sorted(seqs)


def read_log_objects(storage: Storage, seqs: Iterable[int]) -> list[tuple[int, dict]]:
    """`(seq, shard entry)` of the object-store log records `seqs`, in order. A record that vanished
    since it was listed is skipped (a compaction deleted it after putting it in the snapshot); one that
    does not parse is ManifestError (objects appear whole: it was modified outside the writer)."""
    out = []
    for seq in seqs:
        name = log_object(seq)
        try:
            data = storage.read_bytes(name)
        except FileNotFoundError:
            continue
        except OSError as e:
            raise ManifestError(
                f"{storage.uri_of(name)} cannot be read ({e.strerror or e}); {_REPAIR}"
            ) from None
        try:
            entry = json.loads(data)["shard"]
            if problem := _entry_problem(entry):
                raise ValueError(problem)
        except (ValueError, KeyError, TypeError) as e:
            raise ManifestError(
                f"{storage.uri_of(name)} is not a manifest record ({e}); the output folder was modified "
                f"outside the writer: {_REPAIR}"
            ) from None
        out.append((seq, entry))
    return out


def merge(manifest: dict, entries: Iterable[dict]) -> None:
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
    manifest["num_problems"] = sum(
        s["num_problems"] - len(s.get("supersedes") or ()) for s in manifest["shards"]
    )
    manifest["num_rows"] = sum(s["num_rows"] for s in manifest["shards"])


def read_manifest(out_dir: str | Path) -> dict | None:
    """The folder's manifest (snapshot plus log), or None when it has no snapshot (a fresh folder).

    Keys: version, fingerprint, fingerprint_history, shards ([{name, problem_ids, num_rows,
    num_problems, created}, and optionally content_hashes and supersedes] in commit order), num_problems,
    num_rows, updated. Raises ManifestError (a ValueError naming the file and the fix) for a damaged
    snapshot, a corrupt log line that is not the last one, or another version.
    """
    if is_remote(str(out_dir)):
        storage = Storage(str(out_dir), key="output.dir")
        records = read_log_objects(storage, log_seqs(storage))  # before the snapshot, as locally
        manifest = read_snapshot((storage, MANIFEST_NAME))
        if manifest is None:
            return None
        merge(manifest, [e for seq, e in records if seq > manifest.get("log_seq", -1)])
        return manifest
    out_dir = Path(Storage(str(out_dir), key="output.dir").uri)  # file://x -> x
    entries = read_log(out_dir / MANIFEST_LOG_NAME)  # before the snapshot: see the module docstring
    manifest = read_snapshot(out_dir / MANIFEST_NAME)
    if manifest is None:
        return None
    merge(manifest, entries)
    return manifest


def live_shards(manifest: dict) -> list[tuple[str, set[str]]]:
    """`(shard name, problem ids whose rows in it are superseded by a later shard)` in commit order:
    a problem's rows are those of the last shard listing it (the set is empty unless problems were
    redone, see the module docstring)."""
    out: list[tuple[str, set[str]]] = []
    later: set[str] = set()  # ids that a later shard commits again
    for s in reversed(manifest["shards"]):
        out.append((s["name"], later.intersection(s["problem_ids"]) if later else set()))
        later.update(s.get("supersedes") or ())
    return out[::-1]


def read_output(out_dir: str | Path, columns: list[str] | None = None) -> pa.Table:
    """All live rows of the shards the manifest lists (an empty table when there is no manifest):
    exactly one set of rows per committed problem (superseded rows are dropped)."""
    import pyarrow.compute as pc

    manifest = read_manifest(out_dir)
    if not manifest or not manifest["shards"]:
        table = empty_table()
        return table.select(columns) if columns else table
    fs, root = Storage(str(out_dir), key="output.dir").arrow()
    tables = []
    read = None if columns is None else list(dict.fromkeys([*columns, "problem_id"]))  # only these
    for name, stale in live_shards(manifest):
        table = _read_shard(f"{root}/{name}", read, fs)
        if stale:
            table = table.filter(pc.invert(pc.is_in(table.column("problem_id"), pa.array(sorted(stale)))))
        tables.append(table.select(columns) if columns else table)
    return pa.concat_tables(tables)


def _read_shard(path: str, columns: list[str] | None, fs) -> pa.Table:
    """A shard's `columns` (all when None) as `OUTPUT_SCHEMA`. A shard of row layout 1 (written before
    the conversation columns, gen_ssd_ray.generate.rows.is_legacy) is upgraded on read when the columns
    that layout changed are asked for (its `prompt` is the text now in `prompt_text`); other columns
    read the same from either layout."""
    if (columns is None or {"prompt", "prompt_text"} & set(columns)) and is_legacy(
        pq.read_schema(path, filesystem=fs)
    ):
        table = upgrade_legacy(pq.read_table(path, filesystem=fs))
        return table.select(columns) if columns else table
    return pq.read_table(path, columns=columns, schema=OUTPUT_SCHEMA, filesystem=fs)


def shard_meta(path: Path | str, filesystem=None) -> dict:
    """A shard file's own record (content hashes, supersedes); {} for shards written without one."""
    try:
        meta = pq.read_schema(path, filesystem=filesystem).metadata or {}
        out = json.loads(meta[SHARD_META_KEY]) if SHARD_META_KEY in meta else {}
        return out if isinstance(out, dict) else {}
    except (OSError, ValueError, pa.ArrowException) as e:
        log.warning("shard %s: unreadable shard metadata (%s); no content hashes recorded for it", path, e)
        return {}
