"""The fine-tuning job's folder: resumable checkpoints, the exported model, the metrics log.

Layout of `output.dir`:

    checkpoints/step-000050/   DeepSpeed checkpoint (every rank's model/optimizer shards, scheduler,
                               client state: step, world size, fingerprint)
    checkpoints/latest         the tag of the newest *complete* checkpoint (written after every rank
                               saved, atomically); a folder newer than it is a partial save and is removed
    model/                     the exported Hugging Face folder (safetensors, tokenizer, chat template),
                               renamed into place when complete (marker file `.complete`)
    metrics.jsonl              one line per optimizer step (loss, lr, tokens, grad norm, throughput)
    loss.png                   loss and learning-rate curves
    _config.yaml, _state.json  the resolved config; the run's fingerprint
    summary.json               written last: the run is complete

Only plain files and folders: no torch, no DeepSpeed here.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from gen_ssd_ray.common.fsio import atomic_write_text

CHECKPOINTS = "checkpoints"
LATEST = "latest"
MODEL = "model"
METRICS = "metrics.jsonl"
PLOT = "loss.png"
STATE = "_state.json"
CONFIG = "_config.yaml"
SUMMARY = "summary.json"
COMPLETE = ".complete"


def tag_for(step: int) -> str:
    return f"step-{step:06d}"


def step_of(tag: str) -> int:
    return int(tag.removeprefix("step-"))


def latest_tag(out_dir: Path) -> str | None:
    """The newest complete checkpoint's tag, or None."""
    try:
        tag = (Path(out_dir) / CHECKPOINTS / LATEST).read_text().strip()
    except FileNotFoundError:
        return None
    return tag if (Path(out_dir) / CHECKPOINTS / tag).is_dir() else None


def mark_latest(out_dir: Path, tag: str, keep_last: int) -> None:
    """Point `latest` at `tag` (after every rank finished saving it) and delete older checkpoints
    beyond `keep_last`."""
    ckpt = Path(out_dir) / CHECKPOINTS
    atomic_write_text(ckpt / LATEST, tag + "\n")
    tags = sorted((p.name for p in ckpt.glob("step-*") if p.is_dir()), key=step_of)
    for old in tags[: max(0, len(tags) - keep_last)]:
        if old != tag:
            shutil.rmtree(ckpt / old, ignore_errors=True)


def remove_partial_checkpoints(out_dir: Path) -> list[str]:
    """Delete checkpoint folders newer than `latest` (a save cut short by a crash). Returns their tags."""
    ckpt = Path(out_dir) / CHECKPOINTS
    if not ckpt.is_dir():
        return []
    latest = latest_tag(out_dir)
    limit = step_of(latest) if latest else -1
    removed = []
    for p in ckpt.glob("step-*"):
        if p.is_dir() and step_of(p.name) > limit:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p.name)
    return removed


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
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, ValueError):
        return None
