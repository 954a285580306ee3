"""The fine-tuning job's folder: resumable checkpoints, the exported model, the metrics log.

Layout of `output.dir`:

    checkpoints/step-000050/   DeepSpeed checkpoint (every rank's model/optimizer shards, scheduler,
                               client state: step, world size, fingerprint) and, written last,
                               `_complete.json` (see below)
    checkpoints/latest         the tag of the newest complete checkpoint (moved atomically after the
                               completion marker); a hint only, never trusted to delete anything
    model/                     the exported Hugging Face folder (safetensors, tokenizer, chat template),
                               renamed into place when complete (marker file `.complete`)
    metrics.jsonl              one line per optimizer step (loss, lr, tokens, grad norm, throughput)
    loss.png                   loss and learning-rate curves
    _config.yaml, _state.json  the resolved config; the run's fingerprint
    summary.json               written last: the run is complete

What "complete" means: a checkpoint folder `step-NNNNNN` is complete when it holds `_complete.json`
(step, world size, fingerprint, and the size of every file of the checkpoint), written by rank 0 after
every rank saved and fsynced its files, and every file it lists is there with that size. Only a
complete checkpoint is resumed from; `resume_tag` takes the one `latest` names if it is complete,
else (a pointer to a missing, half-written or hand-deleted folder, garbage or empty pointer text) the
newest complete one, with a warning. Nothing is ever deleted because the pointer cannot be resolved:
an incomplete folder (a save cut short) is left alone (`incomplete_tags` lists it; training overwrites
it when it reaches that step), and `mark_latest` prunes only complete checkpoints beyond `keep_last` and
incomplete folders older than the checkpoint it just completed. `sync_tree` fsyncs a checkpoint's files
and folders; the worker calls it on every rank before the marker is written and the pointer moves.

A folder under `checkpoints/` not named `step-NNNNNN` (a `step-000010.bak` copy, say), or a
`step-NNNNNN` name that is not a folder, is refused by `check_folder` with one line naming it and the fix (plain files, such as the recovery
scripts DeepSpeed copies there, and hidden temporaries are ignored)
(`CheckpointFolderError`, an InputError: exit 2). A complete checkpoint whose fingerprint or world
size is not the run's is refused by `resume_tag` the same way (`CheckpointMismatchError`), and so is
one with a file this user does not own (`CheckpointUntrustedError`): DeepSpeed unpickles checkpoint
files, so only folders the job wrote itself are loaded.

Only plain files and folders: no torch, no DeepSpeed here.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

from gen_ssd_ray.common.errors import InputError
from gen_ssd_ray.common.fsio import TMP_PREFIX, atomic_write_json, atomic_write_text, fsync_dir

log = logging.getLogger("gen_ssd_ray.train")

CHECKPOINTS = "checkpoints"
LATEST = "latest"
MODEL = "model"
METRICS = "metrics.jsonl"
PLOT = "loss.png"
STATE = "_state.json"
CONFIG = "_config.yaml"
SUMMARY = "summary.json"
COMPLETE = ".complete"


TAG_RE = re.compile(r"step-(\d{6,})")
MARKER = "_complete.json"


class CheckpointFolderError(InputError):
    """Something under checkpoints/ is not a checkpoint folder; the message names it and the fix."""


class CheckpointMismatchError(InputError):
    """The checkpoint to resume from was written by another run or world size; the message says how to
    proceed."""


class CheckpointUntrustedError(InputError):
    """The checkpoint to resume from was not written by this user; the message names it."""


def tag_for(step: int) -> str:
    return f"step-{step:06d}"


def step_of(tag: str) -> int | None:
    """The step of a `step-NNNNNN` tag; None for any other name."""
    m = TAG_RE.fullmatch(tag.strip())
    return int(m.group(1)) if m else None


def check_folder(out_dir: Path) -> None:
    """Refuse names under checkpoints/ that are not checkpoints (CheckpointFolderError, exit 2), so that
    nothing is ever resumed from, or deleted, by a guess."""
    ckpt = Path(out_dir) / CHECKPOINTS
    if not ckpt.is_dir():
        return
    for p in sorted(ckpt.iterdir()):
        if p.name == LATEST or p.name.startswith("."):
            continue
        tag_like = step_of(p.name) is not None
        if (p.is_dir() and not tag_like) or (tag_like and not p.is_dir()):
            raise CheckpointFolderError(
                f"{p} is not a checkpoint folder (only step-NNNNNN folders and `latest` belong in "
                f"{ckpt}): move it out of output.dir or delete it, then re-run"
            )


def _tags(ckpt: Path) -> list[str]:
    """The `step-NNNNNN` folders under `ckpt`, oldest first (any other name is ignored)."""
    if not ckpt.is_dir():
        return []
    tags = [p.name for p in ckpt.iterdir() if step_of(p.name) is not None and p.is_dir()]
    return sorted(tags, key=lambda t: step_of(t) or 0)


def read_marker(folder: Path) -> dict[str, Any] | None:
    """The completion marker of a checkpoint folder if the checkpoint is complete: the marker parses,
    names this folder's step, and every file it lists is there with its recorded size. Else None."""
    marker = read_json(Path(folder) / MARKER)
    if not isinstance(marker, dict) or marker.get("step") != step_of(Path(folder).name):
        return None
    files = marker.get("files")
    if not isinstance(files, dict) or not files:
        return None
    for rel, size in files.items():
        try:
            if (Path(folder) / rel).stat().st_size != size:
                return None
        except OSError:
            return None
    return marker


def complete_tags(out_dir: Path) -> list[str]:
    """Tags of the complete checkpoints (see the module docstring), oldest first."""
    ckpt = Path(out_dir) / CHECKPOINTS
    return [t for t in _tags(ckpt) if read_marker(ckpt / t) is not None]


def incomplete_tags(out_dir: Path) -> list[str]:
    """Tags of checkpoint folders that are not complete (a save cut short, a damaged copy)."""
    ckpt = Path(out_dir) / CHECKPOINTS
    return [t for t in _tags(ckpt) if read_marker(ckpt / t) is None]


def pointer(out_dir: Path) -> str | None:
    """The text of checkpoints/latest, stripped (None if absent or unreadable)."""
    try:
        return (Path(out_dir) / CHECKPOINTS / LATEST).read_text(errors="replace").strip()
    except OSError:
        return None


def latest_tag(out_dir: Path) -> str | None:
    """The newest complete checkpoint's tag, or None."""
    tags = complete_tags(out_dir)
    return tags[-1] if tags else None


def resume_tag(out_dir: Path, fingerprint: str | None = None, world_size: int | None = None) -> str | None:
    """The checkpoint a run resumes from: the newest complete one, or None.

    Warns when `latest` names something else (a missing, half-written or deleted folder, garbage).
    Raises CheckpointMismatchError when that checkpoint's fingerprint or world size is not the run's."""
    tag = latest_tag(out_dir)
    named = pointer(out_dir)
    if named is not None and named != tag:
        log.warning(
            "%s names %r, which is not a complete checkpoint; resuming from %s instead",
            Path(out_dir) / CHECKPOINTS / LATEST,
            named[:80],
            tag or "nothing (training starts at step 0)",
        )
    if tag is None:
        return None
    marker = read_marker(Path(out_dir) / CHECKPOINTS / tag) or {}
    where = Path(out_dir) / CHECKPOINTS / tag
    if fingerprint is not None and marker.get("fingerprint") != fingerprint:
        raise CheckpointMismatchError(
            f"{where} was written by another run (fingerprint {marker.get('fingerprint')} != {fingerprint}): "
            "use another output.dir, or set output.force=true to start over there"
        )
    if world_size is not None and marker.get("world_size") != world_size:
        raise CheckpointMismatchError(
            f"{where} was written by {marker.get('world_size')} workers, this run has {world_size}: "
            f"re-run with runtime.num_workers={marker.get('world_size')} to resume it (a ZeRO checkpoint "
            "is partitioned per worker), or use another output.dir / output.force=true to start over"
        )
    check_owned(where, marker)
    return tag


def check_owned(folder: Path, marker: dict[str, Any]) -> None:
    """DeepSpeed unpickles a checkpoint's files (arbitrary code on load): refuse a folder, or a file of
    it, that this user does not own (CheckpointUntrustedError). The fingerprint is checked by
    `resume_tag` before this."""
    uid = os.geteuid()
    for p in [folder, folder / MARKER, *(folder / rel for rel in marker.get("files", {}))]:
        owner = p.stat().st_uid
        if owner != uid:
            raise CheckpointUntrustedError(
                f"{p} belongs to uid {owner}, not to this job's user (uid {uid}); checkpoints are "
                "unpickled on load, so only a folder the job wrote itself is resumed: move "
                f"{folder} out of checkpoints/ (or copy it as this user if you trust it), then re-run"
            )


def sync_tree(folder: Path) -> None:
    """fsync every file under `folder`, then every folder under it (bottom up) and `folder` itself."""
    folder = Path(folder)
    dirs = []
    for root, _subdirs, files in os.walk(folder):
        dirs.append(root)
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    for d in reversed(dirs):
        fsync_dir(d)


def write_marker(out_dir: Path, tag: str, world_size: int, fingerprint: str) -> None:
    """Record that checkpoint `tag` is complete (every rank saved and synced its files): the step, the
    world size, the fingerprint and every file's size, written atomically and durably."""
    folder = Path(out_dir) / CHECKPOINTS / tag
    files = {
        str(p.relative_to(folder)): p.stat().st_size
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MARKER and not p.name.startswith(TMP_PREFIX)
    }
    marker = {"step": step_of(tag), "world_size": world_size, "fingerprint": fingerprint, "files": files}
    atomic_write_json(folder / MARKER, marker, indent=1)
    fsync_dir(folder.parent)


def clear_marker(out_dir: Path, tag: str) -> None:
    """Make `tag` incomplete before a save writes into its folder again (a resume from an older
    checkpoint reaching this step): a save cut short there can never look complete."""
    marker = Path(out_dir) / CHECKPOINTS / tag / MARKER
    if marker.exists():
        marker.unlink()
        fsync_dir(marker.parent)


def mark_latest(out_dir: Path, tag: str, keep_last: int) -> None:
    """Point `latest` at `tag` (after its marker is written) and prune: complete checkpoints beyond the
    newest `keep_last`, and incomplete folders older than `tag` (saves cut short, now superseded).
    Nothing newer than `tag` and nothing that is not a `step-NNNNNN` folder is touched."""
    ckpt = Path(out_dir) / CHECKPOINTS
    atomic_write_text(ckpt / LATEST, tag + "\n")
    step = step_of(tag)
    assert step is not None, tag
    complete = [t for t in complete_tags(out_dir) if (step_of(t) or 0) <= step]
    doomed = complete[: max(0, len(complete) - keep_last)]
    doomed += [t for t in incomplete_tags(out_dir) if (step_of(t) or 0) < step]
    for old in doomed:
        if old != tag:
            shutil.rmtree(ckpt / old, ignore_errors=True)
    if doomed:
        fsync_dir(ckpt)


def read_metrics(out_dir: Path) -> list[dict[str, Any]]:
    path = Path(out_dir) / METRICS
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:  # a line cut short by a crash
            continue
    return rows


def truncate_metrics(out_dir: Path, last_step: int) -> None:
    """Keep the metrics of steps <= `last_step` (a resume replays the steps after its checkpoint)."""
    rows = [r for r in read_metrics(out_dir) if r.get("step", 0) <= last_step]
    atomic_write_text(Path(out_dir) / METRICS, "".join(json.dumps(r) + "\n" for r in rows))


def model_complete(out_dir: Path) -> bool:
    return (Path(out_dir) / MODEL / COMPLETE).is_file()


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in `path`; None if it is missing, unreadable, not JSON or not an object."""
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None
