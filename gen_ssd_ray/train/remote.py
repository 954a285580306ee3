"""Fine-tuning output on an object store: a local staging folder mirrored to `output.dir`.

DeepSpeed reads and writes checkpoints on local disk. When `output.dir` is an object-store URI
(``s3://bucket/runs/ft``), the job works in a local staging folder, `staging_dir(uri)`
(``<cache_root()>/staging/finetune/<hash of the URI>``), laid out exactly like a local `output.dir`
(gen_ssd_ray.train.checkpoint), and this module copies between the two. The store is the truth; the
staging folder is a cache rebuilt from it at every start.

- `pull(storage, staging)` (the driver, before anything runs): the run's small files (`SMALL_FILES`),
  the exported model's `.complete` marker (a complete run is skipped) and the newest complete
  checkpoint: one whose `_complete.json` is on the store and whose every listed object is there with
  its size. A checkpoint without a marker (an upload cut short) is never used.
- `push_checkpoint` (every rank, after the checkpoint is complete on local disk): each rank uploads its
  own files (`owned_by`); then rank 0 uploads the marker, listing every object of the checkpoint with
  its size as the store has it, **last** (after the metrics log), moves `checkpoints/latest` and prunes
  as `checkpoint.mark_latest` does (a pruned checkpoint's marker is deleted first, so a prune cut short
  never leaves something that looks complete). `clear_checkpoint` empties a tag's prefix before a save
  writes it again.
- `push_model`: the exported Hugging Face folder, its `.complete` marker deleted first and uploaded last,
  so `gen_ssd_ray.common.models.resolve_model(uri + "/model")` loads it.
- `check_lease(storage, lease_id)`: what a worker calls before each upload: the job's lease
  (gen_ssd_ray.common.joblock.ObjectLease, held and renewed by the driver) must still name this run and
  have been renewed within its ttl; LeaseLostError otherwise (the run stops writing).

Knows nothing about DeepSpeed or training; only files, names and the store (gen_ssd_ray.common.storage).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import re
import shutil
import time
from pathlib import Path
from typing import Any

from gen_ssd_ray.common.joblock import LOCK_NAME, LeaseLostError
from gen_ssd_ray.common.storage import Storage
from gen_ssd_ray.train import checkpoint as ck
from gen_ssd_ray.train.nonfinite import REPORT as NONFINITE_REPORT

log = logging.getLogger("gen_ssd_ray.train")

# The run's small files, copied down before a run and up as they change.
NONFINITE = NONFINITE_REPORT
SMALL_FILES = (ck.STATE, ck.CONFIG, ck.SUMMARY, ck.METRICS, ck.PLOT, NONFINITE)
# DeepSpeed's per-rank checkpoint files (ZeRO partitions: model and optimizer states).
_RANK_FILE = re.compile(r"zero_pp_rank_(\d+)_")


def staging_dir(uri: str) -> Path:
    """The local folder where a run whose output.dir is `uri` keeps its files (same on every node with
    the same cache root)."""
    from gen_ssd_ray.common.models import staging_dir as job_staging

    return job_staging(uri, "finetune")


def owned_by(rel: str) -> int:
    """The rank that uploads checkpoint file `rel`: the rank in a per-rank ZeRO file name, else 0."""
    m = _RANK_FILE.search(Path(rel).name)
    return int(m.group(1)) if m else 0


def _ckpt(tag: str, rel: str = "") -> str:
    return f"{ck.CHECKPOINTS}/{tag}/{rel}".rstrip("/")


def remote_marker(storage: Storage, tag: str) -> dict[str, Any] | None:
    """The marker of checkpoint `tag` on the store if that checkpoint is complete there (the marker
    parses, names the tag's step and every object it lists is there with its size); else None."""
    try:
        marker = json.loads(storage.read_text(_ckpt(tag, ck.MARKER)))
    except (FileNotFoundError, ValueError):
        return None
    if not isinstance(marker, dict) or marker.get("step") != ck.step_of(tag):
        return None
    files = marker.get("files")
    if not isinstance(files, dict) or not files:
        return None
    sizes = _sizes(storage, _ckpt(tag))
    if any(sizes.get(rel) != size for rel, size in files.items()):
        return None
    return marker


def _sizes(storage: Storage, prefix: str) -> dict[str, int]:
    """{name relative to `prefix`: size} of the objects under `prefix`."""
    out = {}
    for name in storage.list(prefix):
        st = storage.stat(name)
        if st is not None:
            out[name[len(prefix) :].lstrip("/")] = st.size
    return out


def remote_tags(storage: Storage) -> list[str]:
    """The `step-NNNNNN` prefixes under checkpoints/ on the store, oldest first."""
    tags = {
        name.split("/")[1]
        for name in storage.list(ck.CHECKPOINTS)
        if name.count("/") >= 2 and ck.step_of(name.split("/")[1]) is not None
    }
    return sorted(tags, key=lambda t: ck.step_of(t) or 0)


def complete_remote_tags(storage: Storage) -> list[str]:
    return [t for t in remote_tags(storage) if remote_marker(storage, t) is not None]


def download_checkpoint(storage: Storage, tag: str, out: Path) -> None:
    """Copy checkpoint `tag` from the store into `out/checkpoints/tag` (replacing what is there), the
    marker last, and point the local `latest` at it."""
    dest = Path(out) / ck.CHECKPOINTS / tag
    shutil.rmtree(dest, ignore_errors=True)
    start = time.perf_counter()
    names = [n for n in storage.list(_ckpt(tag)) if not n.endswith("/" + ck.MARKER)]
    for name in names:
        storage.download_file(name, dest / name[len(_ckpt(tag)) + 1 :])
    storage.download_file(_ckpt(tag, ck.MARKER), dest / ck.MARKER)
    ck.mark_latest(out, tag, keep_last=1_000_000)
    log.info(
        "downloaded %s (%d files) in %.2f s",
        storage.uri_of(_ckpt(tag)),
        len(names),
        time.perf_counter() - start,
    )


def pull(storage: Storage, staging: Path) -> None:
    """Rebuild the staging folder from the store (see the module doc)."""
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True, exist_ok=True)
    for name in SMALL_FILES:
        if storage.exists(name):
            storage.download_file(name, staging / name)
    if storage.exists(f"{ck.MODEL}/{ck.COMPLETE}"):
        storage.download_file(f"{ck.MODEL}/{ck.COMPLETE}", staging / ck.MODEL / ck.COMPLETE)
    tags = complete_remote_tags(storage)
    if tags:
        download_checkpoint(storage, tags[-1], staging)


def ensure_checkpoint(storage: Storage, out: Path, fingerprint: str) -> None:
    """On a node whose staging folder lacks the store's newest complete checkpoint of this run (a
    worker on another node than the driver), download it."""
    tags = complete_remote_tags(storage)
    if not tags or tags[-1] in ck.complete_tags(out):
        return
    marker = remote_marker(storage, tags[-1]) or {}
    if marker.get("fingerprint") == fingerprint:
        download_checkpoint(storage, tags[-1], out)


def check_lease(storage: Storage, lease_id: str | None) -> None:
    """Raise LeaseLostError unless the folder's lease still names `lease_id` and was renewed within
    its ttl (a worker's view of the driver's `ObjectLease`)."""
    if lease_id is None:
        return
    try:
        holder = json.loads(storage.read_text(LOCK_NAME))
    except (FileNotFoundError, ValueError):
        holder = None
    why = None
    if not isinstance(holder, dict) or holder.get("lease_id") != lease_id:
        why = "was taken over or removed by another job"
    else:
        try:
            renewed = _dt.datetime.fromisoformat(holder["renewed"]).timestamp()
            if time.time() - renewed > float(holder.get("ttl_s") or 60) + 2:
                why = f"was not renewed for {time.time() - renewed:.0f} s (its driver is gone)"
        except (KeyError, TypeError, ValueError):
            why = "holds no renewal time"
    if why:
        raise LeaseLostError(
            f"the lease {storage.uri_of(LOCK_NAME)} {why}: this run stopped writing there; resubmit it to "
            "continue from the last complete checkpoint (and make sure no other job writes the same output)"
        )


def clear_checkpoint(storage: Storage, tag: str) -> None:
    """Make `tag` incomplete on the store (marker first), then delete its objects: a save writes it anew."""
    storage.delete(_ckpt(tag, ck.MARKER))
    storage.delete_tree(_ckpt(tag))


def push_checkpoint(
    storage: Storage, out: Path, tag: str, rank: int, world: int, lease_id: str | None
) -> tuple[int, int]:
    """This rank's files of local checkpoint `tag` (see `owned_by`) uploaded; returns (files, bytes)."""
    check_lease(storage, lease_id)
    folder = Path(out) / ck.CHECKPOINTS / tag
    files = nbytes = 0
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if not p.is_file() or p.name == ck.MARKER or p.name.startswith(".") or owned_by(rel) % world != rank:
            continue
        storage.upload_file(p, _ckpt(tag, rel))
        files, nbytes = files + 1, nbytes + p.stat().st_size
    return files, nbytes


def commit_checkpoint(
    storage: Storage, out: Path, tag: str, world: int, fingerprint: str, keep_last: int, lease_id: str | None
) -> None:
    """Rank 0, after every rank's `push_checkpoint`: the metrics log, the marker (every object with its
    size as the store has it), then `latest` and the prune (see the module doc)."""
    check_lease(storage, lease_id)
    # The metrics first: a resume from this checkpoint keeps its steps' lines (and drops later ones).
    if (Path(out) / ck.METRICS).is_file():
        storage.upload_file(Path(out) / ck.METRICS, ck.METRICS)
    files = {rel: size for rel, size in _sizes(storage, _ckpt(tag)).items() if rel != ck.MARKER}
    marker = {"step": ck.step_of(tag), "world_size": world, "fingerprint": fingerprint, "files": files}
    storage.write_json(_ckpt(tag, ck.MARKER), marker, indent=1)
    storage.write_text(f"{ck.CHECKPOINTS}/{ck.LATEST}", tag + "\n")
    step = ck.step_of(tag) or 0
    complete = [t for t in complete_remote_tags(storage) if (ck.step_of(t) or 0) <= step]
    doomed = complete[: max(0, len(complete) - keep_last)]
    doomed += [
        t for t in remote_tags(storage) if (ck.step_of(t) or 0) < step and remote_marker(storage, t) is None
    ]
    for old in doomed:
        if old != tag:
            clear_checkpoint(storage, old)


def push_model(storage: Storage, out: Path, lease_id: str | None) -> tuple[int, int, float]:
    """Upload the exported folder `out/model` to `<output.dir>/model`, its `.complete` marker last (an
    old marker is deleted first). Returns (files, bytes, seconds)."""
    check_lease(storage, lease_id)
    start = time.perf_counter()
    folder = Path(out) / ck.MODEL
    storage.delete(f"{ck.MODEL}/{ck.COMPLETE}")
    stale = set(storage.list(ck.MODEL))
    files = nbytes = 0
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_file() and rel != ck.COMPLETE:
            storage.upload_file(p, f"{ck.MODEL}/{rel}")
            stale.discard(f"{ck.MODEL}/{rel}")
            files, nbytes = files + 1, nbytes + p.stat().st_size
    for name in stale:  # files of an older export that this one does not have
        storage.delete(name)
    storage.upload_file(folder / ck.COMPLETE, f"{ck.MODEL}/{ck.COMPLETE}")
    return files + 1, nbytes, time.perf_counter() - start


def push_files(storage: Storage, out: Path, names: tuple[str, ...] | list[str]) -> None:
    """Upload the run's small files `names` from `out` (those that exist)."""
    for name in names:
        if (Path(out) / name).is_file():
            storage.upload_file(Path(out) / name, name)


def clear_run(storage: Storage) -> None:
    """What `output.force=true` over another config's run removes from the store (as locally)."""
    for tag in remote_tags(storage):
        clear_checkpoint(storage, tag)
    storage.delete_tree(ck.CHECKPOINTS)
    storage.delete(f"{ck.MODEL}/{ck.COMPLETE}")
    storage.delete_tree(ck.MODEL)
    for name in (ck.METRICS, ck.SUMMARY, ck.PLOT, NONFINITE):
        storage.delete(name)
