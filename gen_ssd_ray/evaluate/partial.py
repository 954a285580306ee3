"""An evaluation in progress: prediction rows committed in pieces, so that a re-run resumes it.

Contract:

- Folder ``<output.dir>/_partial`` (`PARTIAL_DIR`), while an evaluation runs::

      part-00000.parquet   complete pieces: every row (all samples) of the problems it holds,
                           exactly `PREDICTION_SCHEMA`, the run's fingerprint in the schema metadata
      .tmp-*               a write in progress (a killed writer's leftovers are removed on open)

- Committing a piece (`PartialPredictions.commit`): the rows are written to a temporary name,
  fsynced and renamed (gen_ssd_ray.common.fsio.atomic_writer), so a piece is either absent or whole,
  after any kill. A problem is in at most one piece, always with all its rows: the one writer only
  commits problems it has not committed (`done_ids`). There is no manifest: the pieces themselves are
  the record (what a piece holds and which fingerprint wrote it), read back on open.
- Opening (`PartialPredictions(folder, fingerprint, force)`) reads which problems are done. Pieces
  written with another fingerprint are refused (`EvaluationExistsError`, an InputError: exit 2)
  unless `force`, which discards them; pieces with this fingerprint are always kept and resumed
  (re-running the same command, with or without force, continues). `check_partial` is the same check,
  read-only, for `prepare`. A piece that cannot be read (not expected: pieces are whole by
  construction) is moved aside as ``.corrupt-<name>`` and its problems are evaluated again.
- Problem ids are stored as `rows.encodable` makes them (a lone surrogate escaped), and `done_ids`
  holds them so: callers compare `encodable(problem_id)`.
- `rows()` reads every committed row back (one row per problem x sample, the first piece's rows
  for a problem committed twice); `remove()` deletes the folder once predictions.parquet and
  summary.json are written.

- An object-store output.dir: the job keeps the folder in a local staging folder (gen_ssd_ray.evaluate.run)
  and gives `PartialPredictions` a `Mirror` of ``<output.dir>/_partial``: each piece is uploaded after
  its local commit (one PUT: an object is absent or whole), pieces discarded by `force` are deleted
  there too, and `remove()` deletes the remote folder. The mirror checks the job's lease before each
  write. `pull_pieces` copies the remote pieces down before a resume.

Locking the output folder is not done here (one writer per folder is the job's business).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from gen_ssd_ray.common.errors import InputError
from gen_ssd_ray.common.fsio import TMP_PREFIX, atomic_writer, fsync_dir
from gen_ssd_ray.evaluate.rows import PREDICTION_SCHEMA, encodable, rows_table

log = logging.getLogger("gen_ssd_ray")

PARTIAL_DIR = "_partial"
FINGERPRINT_KEY = "gen_ssd_ray.evaluation_fingerprint"
_PIECE_RE = re.compile(r"^part-(\d+)\.parquet$")


class EvaluationExistsError(InputError):
    """The output folder holds an evaluation with another fingerprint (refused without output.force)."""


def refused(
    out_dir: Path, old: str | None, fingerprint: str, what: str = "an evaluation"
) -> EvaluationExistsError:
    return EvaluationExistsError(
        f"output.dir={str(out_dir)!r} holds {what} with fingerprint {old} (another model, data, prompt or "
        f"sampling; this one is {fingerprint}): set output.force=true to overwrite it, or choose another "
        "output.dir"
    )


def _pieces(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if _PIECE_RE.match(p.name)]
    return sorted(found, key=lambda p: int(_PIECE_RE.match(p.name).group(1)))


def _fingerprint_of(piece: Path) -> str | None:
    meta = pq.read_schema(piece).metadata or {}
    value = meta.get(FINGERPRINT_KEY.encode())
    return value.decode() if value is not None else None


def check_partial(folder: Path, fingerprint: str, force: bool) -> int:
    """How many pieces of this evaluation `folder` holds (0 when none); read-only.

    Raises EvaluationExistsError when a piece was written with another fingerprint and not `force`,
    InputError when `folder` exists but is not a folder.
    """
    if folder.exists() and not folder.is_dir():
        raise InputError(
            f"{folder} is not a folder (output.dir holds a file named {PARTIAL_DIR}): remove it, or choose "
            "another output.dir"
        )
    count = 0
    for piece in _pieces(folder):
        try:
            old = _fingerprint_of(piece)
        except Exception:  # noqa: BLE001 - unreadable: moved aside when the run opens the folder
            continue
        if old != fingerprint:
            if not force:
                raise refused(folder.parent, old, fingerprint, "an unfinished evaluation")
            continue
        count += 1
    return count


class Mirror:
    """The object-store copy of a `_partial` folder (see the module docstring): `check` (the job's
    lease) runs before each write."""

    def __init__(self, storage: Any, check: Any = None) -> None:
        self.storage = storage
        self.check = check or (lambda: None)

    def put(self, local: Path, name: str) -> None:
        self.check()
        self.storage.upload_file(local, name)

    def delete(self, name: str) -> None:
        self.check()
        self.storage.delete(name)

    def clear(self) -> None:
        self.check()
        self.storage.delete_tree("")


def pull_pieces(storage: Any, folder: Path) -> int:
    """Copy the pieces of the object-store `_partial` folder `storage` into the local `folder`;
    returns how many."""
    names = [n for n in storage.list() if _PIECE_RE.match(n)]
    for name in names:
        storage.download_file(name, Path(folder) / name)
    return len(names)


class PartialPredictions:
    """The committed pieces of one evaluation (see the module docstring)."""

    def __init__(
        self, folder: str | Path, fingerprint: str, *, force: bool = False, mirror: Mirror | None = None
    ) -> None:
        self.folder = Path(folder)
        self.fingerprint = fingerprint
        self.mirror = mirror
        self.folder.mkdir(parents=True, exist_ok=True)
        for p in self.folder.iterdir():
            if p.name.startswith(TMP_PREFIX) and p.is_file():
                log.info("removing a killed writer's temporary file %s", p)
                p.unlink(missing_ok=True)
        self._pieces: list[Path] = []
        self.done_ids: set[str] = set()
        self.resumed_ids: set[str] = set()  # done before this run
        next_index = 0
        for piece in _pieces(self.folder):
            next_index = int(_PIECE_RE.match(piece.name).group(1)) + 1
            try:
                old = _fingerprint_of(piece)
                ids = pq.read_table(piece, columns=["problem_id"]).column("problem_id").to_pylist()
            except Exception as e:  # noqa: BLE001 - not expected: pieces are whole by construction
                log.warning(
                    "%s is unreadable (%s); moving it aside, its problems are evaluated again", piece, e
                )
                os.replace(piece, piece.with_name(f".corrupt-{piece.name}"))
                continue
            if old != fingerprint:
                if not force:
                    raise refused(self.folder.parent, old, fingerprint, "an unfinished evaluation")
                log.warning(
                    "%s: discarding a piece written with fingerprint %s (output.force=true)", piece, old
                )
                piece.unlink()
                if mirror is not None:
                    mirror.delete(piece.name)
                continue
            self._pieces.append(piece)
            self.done_ids.update(ids)
        self.resumed_ids = set(self.done_ids)
        self._next_index = next_index
        fsync_dir(self.folder)

    def commit(self, rows: Sequence[dict[str, Any]]) -> str | None:
        """Write `rows` (whole problems not committed yet) as one piece; returns its name (None for
        no rows). Raises ValueError for a problem already committed."""
        if not rows:
            return None
        ids = list(dict.fromkeys(encodable(r["problem_id"]) for r in rows))  # as stored
        again = self.done_ids.intersection(ids)
        if again:
            raise ValueError(f"problems already committed in {self.folder}: {sorted(again)[:3]}")
        table = rows_table(rows, {FINGERPRINT_KEY: self.fingerprint})
        name = f"part-{self._next_index:05d}.parquet"
        with atomic_writer(self.folder / name) as fh:
            pq.write_table(table, fh, compression="zstd")
        if self.mirror is not None:  # committed on the store once uploaded (one PUT: whole or absent)
            self.mirror.put(self.folder / name, name)
        self._next_index += 1
        self._pieces.append(self.folder / name)
        self.done_ids.update(ids)
        return name

    def rows(self) -> list[dict[str, Any]]:
        """Every committed row, piece by piece (a problem found in two pieces: the first one's rows)."""
        out: list[dict[str, Any]] = []
        seen: set[str] = set()
        for piece in self._pieces:
            rows = pq.read_table(piece, schema=PREDICTION_SCHEMA).to_pylist()
            ids = {r["problem_id"] for r in rows}
            dup = ids & seen
            if dup:
                log.warning(
                    "%s: %d problems also in an earlier piece; keeping the earlier rows", piece, len(dup)
                )
            out += [r for r in rows if r["problem_id"] not in dup]
            seen |= ids
        return out

    def remove(self) -> None:
        """Delete the folder (after the final files are written)."""
        if self.mirror is not None:
            self.mirror.clear()
        shutil.rmtree(self.folder, ignore_errors=True)
        if self.folder.parent.is_dir():
            fsync_dir(self.folder.parent)
