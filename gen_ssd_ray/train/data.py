"""Training data for the fine-tuning job: rows in, tokenized examples and a deterministic batch plan out.

What this module knows:
- Reading `data.path`: a generation job's output folder (only the shards its manifest lists, never a
  half-written one; the rows must share one config fingerprint), a Parquet file or folder, a JSONL or
  JSON file, or an embedded data set (`embedded:gsm8k/train`); any of the first three may be on an
  object store (``s3://bucket/gen/run``, read through gen_ssd_ray.common.storage; a generation folder's
  manifest through generate/manifest.read_manifest). Only `needed_columns` are read (Parquet:
  column projection, one file at a time), never the nested `chunks` or token ids: preparing 1M
  generation rows stays within a few GB (scripts/bench_train_prep.py).
- Filtering (`data.filters`, expressions of the safe filter language of `gen_ssd_ray.common.filters`,
  applied in order, each one's effect counted), `data.limit`, then decontamination
  (`data.decontaminate`: rows whose question overlaps the evaluation set are dropped, counted as one more
  filter step labelled `decontaminate: ...`; gen_ssd_ray.common.decontam), and
  the error that names how many rows were read and which filter removed them when nothing is left.
- Tokenization in the student's own chat template (`gen_ssd_ray.common.prompts.render_example`, the
  renderer generation and evaluation use too), with the loss on the response tokens only: the prompt
  is the rendered user turn with the generation prompt; the response is what the template adds after
  it for the assistant turn (the text plus the end-of-turn token, so the student learns to stop).
- The batch plan: per epoch, a seeded order of micro-batches, either padding-free packs of whole
  examples (best-fit decreasing into `micro_batch_tokens` bins) or length-grouped padded batches
  (examples sorted by length within windows of 1024),
  and which micro-batches rank r uses at step s. The plan is a pure function of (lengths, epoch, seed,
  geometry), which is what makes a resume continue at the exact data position.

What it does not know: models, optimizers, DeepSpeed or Ray (see `gen_ssd_ray.train.worker`).
torch is imported only by `collate`.
"""

from __future__ import annotations

import bisect
import hashlib
import io
import json
import logging
import math
import random
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gen_ssd_ray.common import decontam
from gen_ssd_ray.common.config import PromptConfig
from gen_ssd_ray.common.errors import InputError
from gen_ssd_ray.common.filters import Filter, FilterError, parse_all
from gen_ssd_ray.common.prompts import PromptError, render_example
from gen_ssd_ray.train.config import TrainDataConfig

log = logging.getLogger(__name__)

IGNORE_INDEX = -100


class TrainDataError(InputError):
    """The training data cannot be used; the message names the config key and the fix."""


class EmptyTrainingSetError(TrainDataError):
    """Nothing is left to train on; the message says how many rows were read and what removed them."""


# ---- reading -------------------------------------------------------------------------------------


def _parquet_frame(source, wanted: list[str], stale: set[str]) -> Any:
    """One Parquet file (a path or a seekable file) as a frame of the `wanted` columns it has, without
    the rows of `stale` problems (a later shard committed them again: a forced redo of changed
    content); `attrs["source_columns"]` lists every column of the file. Returns a pandas DataFrame."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    names = pq.read_schema(source).names
    if hasattr(source, "seek"):
        source.seek(0)
    cols = [c for c in wanted if c in names]
    table = pq.read_table(
        source, columns=cols + (["problem_id"] if stale and "problem_id" not in cols else [])
    )
    if stale:
        keep = pc.invert(pc.is_in(table.column("problem_id"), pa.array(sorted(stale))))
        table = table.filter(keep).select(cols)
    df = table.to_pandas(self_destruct=True, split_blocks=True)
    del table
    df.attrs["source_columns"] = sorted(map(str, names))
    return df


def needed_columns(cfg: TrainDataConfig) -> list[str]:
    """The only columns the job reads: the question and response fields, the columns `data.filters`
    reference, `config_fingerprint` (the one-generation-config check) and the row ids (`problem_id`,
    `trajectory_index`). Everything else (the nested `chunks`, token ids, prompts) is never loaded."""
    wanted = [
        cfg.question_field,
        cfg.response_field,
        *sorted(columns_of(cfg)),
        "config_fingerprint",
        "problem_id",
        "trajectory_index",
    ]
    return list(dict.fromkeys(wanted))


def columns_of(cfg: TrainDataConfig) -> set[str]:
    return set().union(*(f.columns for f in parse_filters(cfg)))


def read_rows(cfg: TrainDataConfig):
    """The rows of `cfg.path` as a pandas DataFrame holding only `needed_columns(cfg)` (those the
    source has); `df.attrs["source_columns"]` lists every column of the source, for messages. Raises
    TrainDataError on an unusable source."""
    import pandas as pd

    frames = list(iter_frames(cfg))
    df = frames[0] if len(frames) == 1 else pd.concat(frames, ignore_index=True)
    df.attrs["source_columns"] = frames[0].attrs["source_columns"]
    _check_fingerprint(_fingerprints(df), cfg)
    return df


def read_filtered(cfg: TrainDataConfig):
    """`apply_filters(read_rows(cfg), cfg)` one Parquet file at a time: the rows a filter drops are never
    held all together, so memory follows the rows kept, not the rows read. Returns (DataFrame,
    FilterSteps, rows read); raises like `read_rows` and `apply_filters`."""
    import pandas as pd

    kept, steps, read, found = [], None, 0, set()
    for frame in iter_frames(cfg):
        read += len(frame)
        found |= _fingerprints(frame)
        _check_fingerprint(found, cfg)
        frame, part = apply_filters(frame, cfg, final=False)
        kept.append(frame)
        steps = (
            part
            if steps is None
            else [
                FilterStep(a.expr, a.before + b.before, a.after + b.after)
                for a, b in zip(steps, part, strict=True)
            ]
        )
        del frame
    df = kept[0] if len(kept) == 1 else pd.concat(kept, ignore_index=True)
    del kept
    return _finish(df, cfg, read, steps or []) + (read,)


def _resolve(cfg: TrainDataConfig) -> Path | str:
    """The local path of `data.path`, or its normalized URI when it is on an object store."""
    from gen_ssd_ray.common.storage import check_location, is_remote

    path = cfg.path
    if is_remote(path):
        return check_location(path, "data.path")
    if path.startswith("embedded:"):
        from gen_ssd_ray.common.data import DataError, embedded_path, lab_sft_path

        name = path.removeprefix("embedded:")
        try:
            path = str(
                lab_sft_path(name.split("/", 1)[-1]) if name.startswith("lab-sft/") else embedded_path(name)
            )
        except DataError as e:
            raise TrainDataError(str(e)) from None
    p = Path(path).expanduser()
    if not p.exists():
        raise TrainDataError(f"data.path={cfg.path!r}: no such file or folder")
    return p


def iter_frames(cfg: TrainDataConfig):
    """The rows of `cfg.path` as DataFrames of `needed_columns(cfg)`: one per Parquet file (a folder's
    files one at a time, so only one file's Arrow buffers are alive), or one for a JSON/JSONL file.
    Each frame's `attrs["source_columns"]` lists the source's columns."""
    import pandas as pd

    p = _resolve(cfg)
    wanted = needed_columns(cfg)
    if isinstance(p, str):
        yield from _iter_remote(cfg, p, wanted)
        return
    try:
        if p.is_dir() or p.suffix == ".parquet":
            files = _folder_files(p) if p.is_dir() else [(p, set())]
            for f, stale in files:
                yield _parquet_frame(f, wanted, stale)
            return
        if p.suffix in (".jsonl", ".ndjson"):
            df = pd.read_json(p, lines=True, dtype=False)
        elif p.suffix == ".json":
            text = p.read_text()
            try:
                df = pd.DataFrame(json.loads(text))
            except ValueError:
                df = pd.read_json(p, lines=True, dtype=False)
            del text
        else:
            raise TrainDataError(
                f"data.path={cfg.path!r}: unknown format {p.suffix!r}; use a generation output folder, "
                "Parquet, JSONL or JSON"
            )
    except TrainDataError:
        raise
    except (OSError, ValueError) as e:
        raise TrainDataError(f"data.path={cfg.path!r} cannot be read: {e}") from None
    source_columns = sorted(map(str, df.columns))
    df = df[[c for c in wanted if c in df.columns]]
    df.attrs["source_columns"] = source_columns
    yield df


def _iter_remote(cfg: TrainDataConfig, uri: str, wanted: list[str]):
    """`iter_frames` for an object-store `data.path`: a JSONL/JSON/Parquet object, or a folder (a
    generation folder's live shards, else every Parquet object under it)."""
    import pandas as pd

    from gen_ssd_ray.common.storage import Storage

    parent, _, leaf = uri.rpartition("/")
    suffix = Path(leaf).suffix
    try:
        if suffix in (".jsonl", ".ndjson", ".json"):
            storage = Storage(parent, key="data.path")
            if not storage.exists(leaf):
                raise TrainDataError(f"data.path={cfg.path!r}: no such object")
            text = storage.read_text(leaf)
            try:
                df = pd.DataFrame(json.loads(text)) if suffix == ".json" else None
            except ValueError:
                df = None
            if df is None:
                df = pd.read_json(io.StringIO(text), lines=True, dtype=False)
            del text
            source_columns = sorted(map(str, df.columns))
            df = df[[c for c in wanted if c in df.columns]]
            df.attrs["source_columns"] = source_columns
            yield df
            return
        if suffix == ".parquet":
            storage, files = Storage(parent, key="data.path"), [(leaf, set())]
            if not storage.exists(leaf):
                raise TrainDataError(f"data.path={cfg.path!r}: no such object")
        else:
            storage = Storage(uri, key="data.path")
            files = _remote_folder_files(cfg, storage)
        for name, stale in files:
            with storage.open_input(name) as fh:
                yield _parquet_frame(fh, wanted, stale)
    except TrainDataError:
        raise
    except (OSError, ValueError) as e:
        raise TrainDataError(f"data.path={cfg.path!r} cannot be read: {e}") from None


def _remote_folder_files(cfg: TrainDataConfig, storage) -> list[tuple[str, set[str]]]:
    """The live shards of a generation folder on an object store (its manifest), or its Parquet objects."""
    from gen_ssd_ray.generate.manifest import MANIFEST_NAME, live_shards, read_manifest

    names = storage.list()
    if MANIFEST_NAME in names:
        manifest = read_manifest(storage.uri)
        if manifest is None:
            raise TrainDataError(
                f"data.path={cfg.path!r}: its manifest {MANIFEST_NAME} was listed but is gone (deleted while "
                "it was read); check that no other job is rewriting this folder and run again"
            )
        files = live_shards(manifest)
    else:
        files = [
            (n, set()) for n in names if n.endswith(".parquet") and not Path(n).name.startswith((".", "_"))
        ]
    if not files:
        raise TrainDataError(f"data.path={cfg.path!r} holds no committed shards or Parquet files")
    return files


def _folder_files(folder: Path) -> list[tuple[Path, set[str]]]:
    """A generation output folder's manifest-listed shards, each with the problem ids whose rows in it a
    later shard supersedes (gen_ssd_ray.generate.manifest.live_shards), or a plain folder's Parquet files."""
    from gen_ssd_ray.generate.manifest import live_shards, read_manifest

    manifest = read_manifest(folder)
    if manifest is not None:
        files = [(folder / name, stale) for name, stale in live_shards(manifest)]
    else:
        files = [(f, set()) for f in sorted(folder.rglob("*.parquet")) if not f.name.startswith((".", "_"))]
    if not files:
        raise TrainDataError(
            f"data.path={str(folder)!r} holds no committed shards or Parquet files"
            + (" (its manifest lists none: did the generation job commit anything?)" if manifest else "")
        )
    return files


def _fingerprints(df) -> set[str]:
    if "config_fingerprint" not in df.columns:
        return set()
    return {str(v) for v in df["config_fingerprint"].dropna().unique()}


def _check_fingerprint(found: set[str], cfg: TrainDataConfig) -> None:
    """Rows from a generation folder must come from one config (and the expected one, if given)."""
    if not found:
        if cfg.expect_fingerprint:
            raise TrainDataError(
                f"data.expect_fingerprint={cfg.expect_fingerprint!r} but {cfg.path!r} has no "
                "config_fingerprint column: it is not a generation job's output"
            )
        return
    found_list = sorted(found)
    if len(found_list) > 1:
        raise TrainDataError(
            f"data.path={cfg.path!r} mixes rows of {len(found_list)} generation configs (fingerprints "
            f"{found_list}): train on one generation folder at a time"
        )
    if cfg.expect_fingerprint and found_list[0] != cfg.expect_fingerprint:
        raise TrainDataError(
            f"data.path={cfg.path!r} was generated with config fingerprint {found_list[0]}, not the expected "
            f"{cfg.expect_fingerprint} (data.expect_fingerprint): it comes from a different generation "
            "config; point data.path at the right folder or clear data.expect_fingerprint"
        )


# ---- filtering -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class FilterStep:
    expr: str
    before: int
    after: int


def apply_filters(df, cfg: TrainDataConfig, final: bool = True):
    """Keep rows with a question and a response, then apply `cfg.filters` in order.

    Returns (filtered DataFrame, list of FilterStep). Raises TrainDataError for a missing field or a
    filter that cannot be evaluated, EmptyTrainingSetError when nothing is left. `final=False` (one
    part of the data, see `read_filtered`) skips `data.limit` and the empty check.
    """
    steps: list[FilterStep] = []
    read = len(df)
    source_columns = df.attrs.get("source_columns") or sorted(map(str, df.columns))
    for key, col in (
        ("data.question_field", cfg.question_field),
        ("data.response_field", cfg.response_field),
    ):
        if col not in df.columns:
            raise TrainDataError(f"{key}={col!r}: no such column in {cfg.path!r} (columns: {source_columns})")
    valid = df[cfg.question_field].map(_nonempty) & df[cfg.response_field].map(_nonempty)
    before = len(df)
    df = df[valid]
    steps.append(FilterStep(f"non-empty {cfg.question_field} and {cfg.response_field}", before, len(df)))
    for f in parse_filters(cfg):
        before = len(df)
        missing = sorted(f.columns - set(map(str, df.columns)))
        if missing:
            raise TrainDataError(
                f"{f.key}={f.expr!r}: no column {missing[0]!r} in {cfg.path!r} (columns: {source_columns}); "
                "for a plain question/solution file set data.filters=[]"
            )
        try:
            df = df[f.mask(df)]
        except FilterError as e:
            raise TrainDataError(
                f"{e} in {cfg.path!r}; for a plain question/solution file set data.filters=[]"
            ) from None
        steps.append(FilterStep(f.expr, before, len(df)))
    return _finish(df, cfg, read, steps) if final else (df, steps)


def decontaminate(df, cfg: TrainDataConfig):
    """Drop the rows whose question overlaps `data.decontaminate.against` (gen_ssd_ray.common.decontam).
    Returns (kept rows, the FilterStep counting them; its expr starts with decontam.STEP_PREFIX).
    Several rows of one problem (its trajectories) share a question, so each question is checked once."""
    dc = cfg.decontaminate
    index = decontam.load_index(dc, "data.decontaminate")
    questions = df[cfg.question_field]
    verdict = {q: index.match(q) for q in dict.fromkeys(questions)}
    bad = questions.map(lambda q: verdict[q].contaminated(dc.threshold))
    ids = df["problem_id"] if "problem_id" in df.columns else df.index.to_series().map("row {}".format)
    decontam.log_dropped(
        int(bad.sum()),
        len(df),
        dc,
        [(str(i), verdict[q]) for i, q in zip(ids[bad][:5], questions[bad][:5], strict=True)],
        what=f"rows of {cfg.path}",
    )
    kept = df[~bad]
    return kept, FilterStep(decontam.describe(dc), len(df), len(kept))


def _finish(df, cfg: TrainDataConfig, read: int, steps: list[FilterStep]):
    """`data.limit`, then decontamination (`data.decontaminate`: like generation's, it drops from the
    rows the limit picked, so a limit names the same problems with it or without), then the empty check."""
    if cfg.limit is not None:
        df = df.iloc[: cfg.limit]
    if decontam.active(cfg.decontaminate):
        df, step = decontaminate(df, cfg)
        steps = [*steps, step]
    if len(df) == 0:
        raise EmptyTrainingSetError(empty_message(cfg.path, read, steps))
    return df, steps


def parse_filters(cfg: TrainDataConfig) -> list[Filter]:
    """`cfg.filters` checked against the filter language (gen_ssd_ray.common.filters); raises
    TrainDataError naming `data.filters[i]` and what is not allowed."""
    try:
        return parse_all(cfg.filters, "data.filters")
    except FilterError as e:
        raise TrainDataError(str(e)) from None


def _nonempty(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def empty_message(path: str, read: int, steps: list[FilterStep]) -> str:
    parts = [f"no training examples: read {read} rows from {path!r}"]
    for s in steps:
        parts.append(f"`{s.expr}` kept {s.after} of {s.before} (removed {s.before - s.after})")
    culprit = next((s for s in steps if s.after == 0 and s.before > 0), None)
    hint = (
        f"; the filter `{culprit.expr}` removed the last rows: change data.filters or produce more data"
        if culprit is not None
        else "; the source holds no rows"
    )
    return "; ".join(parts) + hint


# ---- tokenization --------------------------------------------------------------------------------


@dataclass
class Examples:
    """Tokenized examples as flat arrays (cheap to put in Ray's object store).

    Example i is `tokens[offsets[i]:offsets[i+1]]`; its first `prompt_lens[i]` tokens are the prompt
    (no loss), the rest the response (loss).
    """

    tokens: np.ndarray  # int32, all examples concatenated
    offsets: np.ndarray  # int64, len = n + 1
    prompt_lens: np.ndarray  # int32, len = n

    def __len__(self) -> int:
        return len(self.prompt_lens)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets).astype(np.int64)

    @property
    def response_tokens(self) -> int:
        return int(self.lengths.sum() - self.prompt_lens.sum())

    def get(self, i: int) -> tuple[np.ndarray, int]:
        return self.tokens[self.offsets[i] : self.offsets[i + 1]], int(self.prompt_lens[i])


@dataclass(frozen=True)
class TokenizeReport:
    examples: int
    dropped_too_long: int
    dropped_empty_response: int
    dropped_unrenderable: int
    max_len: int
    mean_len: float


def tokenize(df, tokenizer, cfg_data: TrainDataConfig, prompt: PromptConfig, max_seq_len: int):
    """(Examples, TokenizeReport). Examples longer than `max_seq_len` are dropped and counted.

    Token ids go straight into one compact growing buffer (4 bytes a token, no per-example array and
    no final concatenation), so the peak is about the size of the result."""
    tokens = array("i")  # C int: int32 on every platform this runs on
    lengths_buf = array("q")
    prompt_lens: list[int] = []
    too_long = empty = unrenderable = 0
    for q, r in zip(df[cfg_data.question_field], df[cfg_data.response_field], strict=True):
        try:
            p_ids, r_ids = render_example(tokenizer, prompt, q, r)
        except PromptError:  # a control string this tokenizer cannot encode as text
            unrenderable += 1
            continue
        if not r_ids:
            empty += 1
            continue
        if len(p_ids) + len(r_ids) > max_seq_len:
            too_long += 1
            continue
        tokens.extend(p_ids)
        tokens.extend(r_ids)
        lengths_buf.append(len(p_ids) + len(r_ids))
        prompt_lens.append(len(p_ids))
    lengths = np.frombuffer(lengths_buf, dtype=np.int64) if lengths_buf else np.zeros(0, np.int64)
    ex = Examples(
        tokens=np.frombuffer(tokens, dtype=np.int32) if tokens else np.zeros(0, np.int32),
        offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        prompt_lens=np.asarray(prompt_lens, dtype=np.int32),
    )
    report = TokenizeReport(
        examples=len(ex),
        dropped_too_long=too_long,
        dropped_empty_response=empty,
        dropped_unrenderable=unrenderable,
        max_len=int(lengths.max()) if len(lengths) else 0,
        mean_len=round(float(lengths.mean()), 1) if len(lengths) else 0.0,
    )
    return ex, report


def data_signature(df, cfg_data: TrainDataConfig) -> str:
    """Row count and a content hash of the (question, response) pairs that will be trained on."""
    h = hashlib.sha256()
    for q, r in zip(df[cfg_data.question_field], df[cfg_data.response_field], strict=True):
        h.update(q.encode())
        h.update(b"\0")
        h.update(r.encode())
        h.update(b"\1")
    return f"{len(df)}:{h.hexdigest()[:16]}"


# ---- the batch plan ------------------------------------------------------------------------------


def plan_epoch(
    lengths: np.ndarray, epoch: int, seed: int, micro_batch_tokens: int, packing: bool
) -> list[list[int]]:
    """The micro-batches of one epoch, in training order, as lists of example indices.

    Packing: examples in a seeded random order are sorted by length (stable, so ties stay shuffled)
    and placed best-fit-decreasing into bins of `micro_batch_tokens`; the bins are then shuffled.
    Unpacked: a seeded shuffle, then within windows of 1024 examples the examples are sorted by length
    and cut into batches whose padded size (count x longest) stays within `micro_batch_tokens`; the
    batches are then shuffled.
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if packing:
        # Best-fit decreasing: each example (longest first) goes to the fullest bin it fits in. Free
        # room per bin is kept sorted, so this is O(n log n) even for millions of examples.
        order.sort(key=lambda i: -int(lengths[i]))
        bins: list[list[int]] = []
        room: list[tuple[int, int]] = []  # (free tokens, bin index), sorted
        for i in order:
            n = int(lengths[i])
            k = bisect.bisect_left(room, (n, -1))
            if k < len(room):
                free, b = room.pop(k)
            else:
                free, b = micro_batch_tokens, len(bins)
                bins.append([])
            bins[b].append(i)
            bisect.insort(room, (free - n, b))
        rng.shuffle(bins)
        return bins
    batches: list[list[int]] = []
    window = 1024  # examples sorted together: similar lengths per batch, still a random mix overall
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: int(lengths[i]))
        cur: list[int] = []
        longest = 0
        for i in chunk:
            n = int(lengths[i])
            if cur and max(longest, n) * (len(cur) + 1) > micro_batch_tokens:
                batches.append(cur)
                cur, longest = [], 0
            cur.append(i)
            longest = max(longest, n)
        if cur:
            batches.append(cur)
    rng.shuffle(batches)
    return batches


def steps_per_epoch(num_micro_batches: int, world_size: int, grad_accum: int) -> int:
    """Optimizer steps in an epoch: every rank runs `grad_accum` micro-batches per step; the last step
    is completed with the epoch's first micro-batches, so no example is dropped."""
    return max(1, math.ceil(num_micro_batches / (world_size * grad_accum)))


def step_micro_batches(
    plan: list[list[int]], step_in_epoch: int, rank: int, world_size: int, grad_accum: int
) -> list[list[int]]:
    """The micro-batches rank `rank` runs at optimizer step `step_in_epoch` of an epoch's plan."""
    per_step = world_size * grad_accum
    base = step_in_epoch * per_step + rank * grad_accum
    return [plan[(base + j) % len(plan)] for j in range(grad_accum)]


def batch_stats(lengths: np.ndarray, plan: list[list[int]], micro_batch_tokens: int, packing: bool) -> dict:
    """How well the plan uses the compute it pays for.

    nonpad_frac: real tokens / tokens fed to the model (padding-free packs: 1.0; padded batches:
    sum of lengths / (count x longest)). fill_frac: real tokens / (micro-batches x micro_batch_tokens).
    """
    real = int(sum(int(lengths[i]) for mb in plan for i in mb))
    if packing:
        fed = real
    else:
        fed = int(sum(len(mb) * max(int(lengths[i]) for i in mb) for mb in plan))
    return {
        "micro_batches": len(plan),
        "nonpad_frac": round(real / fed, 4) if fed else None,
        "fill_frac": round(real / (len(plan) * micro_batch_tokens), 4) if plan else None,
    }


def collate(examples: Examples, indices: list[int], packing: bool, pad_id: int) -> dict[str, Any]:
    """Tensors for one micro-batch.

    Packed: one row, the examples back to back, `position_ids` restarting at 0 for each one and no
    attention mask, which transformers turns into a block-diagonal causal mask (no attention across
    examples). Unpacked: one row per example, right-padded, with an attention mask. Labels are the
    input ids with the prompt (and padding) set to IGNORE_INDEX; the model shifts them itself.
    """
    import torch

    parts = [examples.get(i) for i in indices]
    if packing:
        ids = np.concatenate([t for t, _ in parts]).astype(np.int64)
        pos = np.concatenate([np.arange(len(t)) for t, _ in parts])
        labels = ids.copy()
        start = 0
        for t, p in parts:
            labels[start : start + p] = IGNORE_INDEX
            start += len(t)
        return {
            "input_ids": torch.from_numpy(ids)[None],
            "position_ids": torch.from_numpy(pos.astype(np.int64))[None],
            "labels": torch.from_numpy(labels)[None],
        }
    width = max(len(t) for t, _ in parts)
    ids = np.full((len(parts), width), pad_id, dtype=np.int64)
    labels = np.full((len(parts), width), IGNORE_INDEX, dtype=np.int64)
    mask = np.zeros((len(parts), width), dtype=np.int64)
    for row, (t, p) in enumerate(parts):
        ids[row, : len(t)] = t
        labels[row, p : len(t)] = t[p:]
        mask[row, : len(t)] = 1
    return {
        "input_ids": torch.from_numpy(ids),
        "attention_mask": torch.from_numpy(mask),
        "labels": torch.from_numpy(labels),
    }


def response_token_count(examples: Examples, indices: list[int]) -> int:
    """Tokens that carry loss in a micro-batch (the model predicts each from the one before it)."""
    return int(sum(examples.lengths[i] - examples.prompt_lens[i] for i in indices))
