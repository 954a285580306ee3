"""The export job: the chosen rows of one or more generation folders as a Hugging Face dataset.

Contract:

- `prepare(cfg)` reads everything before anything is written: each input's live rows through its manifest
  (gen_ssd_ray.generate.manifest.read_output, so superseded rows never count), the rows `cfg.rows` keeps
  (gen_ssd_ray.export.config.ROW_RULES) that have a conversation, and each folder's counts and costs.
  An input that is not a generation folder, rows written before the conversation columns (row layout 1:
  regenerate them), no row to export, or an output folder that already holds an export (without
  `output.force`) is an InputError (exit 2) naming the key and the fix.
- `export(cfg, prepared)` writes, through `Storage` (a local folder or an object store), the Parquet
  shards ``data/<split>-00000-of-0000N.parquet`` (`EXPORT_COLUMNS` plus `source`, the input folder, each
  shard at most `output.shard_rows` rows), then ``README.md`` last: a dataset card whose YAML front matter
  names the data files (``configs: - config_name: default``), with the job's config and the rows and costs
  (teacher / student tokens) per input folder. Each file is written all or nothing; with `output.force`
  the previous export's shards that the new one does not overwrite are deleted.
  `datasets.load_dataset(<output.dir>)` or ``load_dataset("parquet", data_files=".../data/*.parquet")``
  loads it, and TRL's `SFTTrainer` takes it as is (`prompt` + `completion`: loss on the completion only;
  drop them to train on `messages`).

Knows the generation rows' columns and Parquet; nothing about engines or tokenizers.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gen_ssd_ray.common.errors import InputError
from gen_ssd_ray.common.storage import Storage, is_remote
from gen_ssd_ray.export.config import ROW_RULES, ExportConfig

# The columns of an exported row: the conversation in TRL's forms, then what it came from and cost.
EXPORT_COLUMNS = [
    "messages",
    "prompt",
    "completion",
    "problem_id",
    "trajectory_index",
    "method",
    "status",
    "correct",
    "student_ppl",
    "num_response_tokens",
    "teacher_tokens_generated",
    "student_tokens_processed",
    "student_tokens_scored",
    "teacher_model",
    "student_model",
    "config_fingerprint",
]
# Summed per input folder (all of its rows: what generating it cost) for the dataset card.
COST_COLUMNS = [
    "teacher_tokens_generated",
    "teacher_prompt_tokens",
    "teacher_cached_prompt_tokens",
    "student_tokens_processed",
    "student_tokens_scored",
]
CARD_NAME = "README.md"
DATA_DIR = "data"


@dataclass
class Source:
    """One input folder: its exported rows (a pyarrow Table) and its numbers for the card."""

    uri: str
    table: Any
    counts: dict[str, int] = field(default_factory=dict)
    costs: dict[str, int] = field(default_factory=dict)
    models: dict[str, list[str]] = field(default_factory=dict)


@dataclass
class Prepared:
    sources: list[Source]
    out: Storage


def prepare(cfg: ExportConfig) -> Prepared:
    """Every input's rows to export and the output folder, checked (see the module docstring)."""
    out = Storage(cfg.output.dir, key="output.dir")
    existing = ([CARD_NAME] if out.exists(CARD_NAME) else []) + out.list(f"{DATA_DIR}/")
    if existing and not cfg.output.force:
        raise InputError(
            f"output.dir={cfg.output.dir}: already holds an export ({existing[0]}); set output.force=true to "
            "replace it, or use another output.dir"
        )
    sources = [_read_source(cfg, i, path) for i, path in enumerate(cfg.inputs)]
    if not sum(s.table.num_rows for s in sources):
        found = ", ".join(f"{s.uri}: {s.counts['rows']} rows, {s.counts['chosen']} chosen" for s in sources)
        raise InputError(
            f"rows={cfg.rows}: no row to export ({found}); use rows=all or rows=correct, or other inputs"
        )
    return Prepared(sources, out)


def _read_source(cfg: ExportConfig, i: int, path: str) -> Source:
    """One input folder's rows that `cfg.rows` keeps and that have a conversation, with its numbers."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from gen_ssd_ray.generate.manifest import read_manifest, read_output

    key = f"inputs[{i}]"
    manifest = read_manifest(Storage(path, key=key).uri)  # ManifestError: an InputError naming the file
    if manifest is None:
        raise InputError(
            f"{key}={path}: not a generation output folder (no _manifest.json); give the output.dir of a "
            "python -m jobs.generate run"
        )
    column, _ = ROW_RULES[cfg.rows]
    wanted = [*EXPORT_COLUMNS, "teacher_prompt_tokens", "teacher_cached_prompt_tokens", "selected"]
    table = read_output(path, columns=list(dict.fromkeys(wanted)))
    keep = pc.fill_null(table.column(column), False) if column else pa.array([True] * table.num_rows)
    has_conversation = pc.invert(pc.is_null(table.column("messages")))
    # Rows with a response but no conversation were written before the conversation columns existed.
    legacy = pc.and_(pc.and_(keep, pc.invert(has_conversation)), pc.greater(table["num_response_tokens"], 0))
    if pc.any(legacy).as_py():
        raise InputError(
            f"{key}={path}: {pc.sum(legacy).as_py()} of its rows to export (rows={cfg.rows}) were written by "
            "a gen-ssd-ray version without "
            "the conversation columns (messages, prompt, completion); regenerate them into a new output.dir "
            "(python -m jobs.generate with the same config), then export that folder"
        )
    chosen = table.filter(keep)
    exported = table.filter(pc.and_(keep, has_conversation))
    ids = pc.unique(table.column("problem_id"))
    return Source(
        uri=path,
        table=exported.select(EXPORT_COLUMNS).append_column("source", pa.array([path] * exported.num_rows)),
        counts={
            "problems": len(ids),
            "rows": table.num_rows,
            "chosen": chosen.num_rows,
            "exported": exported.num_rows,
            "exported_problems": len(pc.unique(exported.column("problem_id"))),
        },
        costs={c: int(pc.sum(table.column(c)).as_py() or 0) for c in COST_COLUMNS},
        models={
            c: sorted(v for v in pc.unique(table.column(c)).to_pylist() if v)
            for c in ("method", "teacher_model", "student_model")
        },
    )


def shard_names(split: str, n: int) -> list[str]:
    """The data files of an export of `n` shards (the Hugging Face ``<split>-00000-of-0000N`` naming)."""
    return [f"{DATA_DIR}/{split}-{k:05d}-of-{n:05d}.parquet" for k in range(n)]


def export(cfg: ExportConfig, prepared: Prepared) -> dict[str, Any]:
    """Write the shards, then the dataset card (see the module docstring); returns the job's summary."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = prepared.out
    table = pa.concat_tables([s.table for s in prepared.sources])
    names = shard_names(cfg.split, max(1, math.ceil(table.num_rows / cfg.output.shard_rows)))
    for k, name in enumerate(names):
        with out.writer(name) as fh:
            pq.write_table(table.slice(k * cfg.output.shard_rows, cfg.output.shard_rows), fh)
    stale = [n for n in out.list(f"{DATA_DIR}/") if n not in names]
    for name in stale:  # a forced re-export's leftovers (prepare refused the folder without force)
        out.delete(name)
    summary = {
        "output_dir": cfg.output.dir,
        "rows": cfg.rows,
        "split": cfg.split,
        "exported_rows": table.num_rows,
        "shards": names,
        "sources": [{"input": s.uri, **s.counts, "costs": s.costs, **s.models} for s in prepared.sources],
    }
    out.write_text(CARD_NAME, dataset_card(cfg, summary))
    return summary


def dataset_card(cfg: ExportConfig, summary: dict[str, Any]) -> str:
    """README.md: YAML front matter naming the data files, then the config, rows and costs per input."""
    from gen_ssd_ray.common.config import to_yaml

    rule = ROW_RULES[cfg.rows][1]
    lines = [
        "---",
        "configs:",
        "- config_name: default",
        "  data_files:",
        f"  - split: {cfg.split}",
        f"    path: {DATA_DIR}/{cfg.split}-*",
        "tags:",
        "- gen-ssd-ray",
        "- distillation",
        "- sft",
        "---",
        "",
        "# Gen-SSD distillation data",
        "",
        f"{summary['exported_rows']} trajectories from {len(summary['sources'])} gen-ssd-ray generation "
        f"folder(s), rows={cfg.rows} ({rule}; rows without a response are left out).",
        "",
        "Columns: `messages` (system if any, user, assistant), `prompt` (system if any, user) and "
        "`completion` (assistant), each a list of `{role, content}` (TRL's conversational forms); then "
        "`problem_id`, `trajectory_index`, `method`, `status`, `correct`, `student_ppl`, token counts, the "
        "models, `config_fingerprint` and `source` (the generation folder).",
        "",
        "```python",
        "from datasets import load_dataset",
        "from trl import SFTConfig, SFTTrainer",
        "",
        f'ds = load_dataset("parquet", data_files="<this folder>/{DATA_DIR}/*.parquet", split="train")',
        "SFTTrainer(model=..., train_dataset=ds, args=SFTConfig(...)).train()  # loss on the completion",
        "```",
        "",
        "## Rows and costs per generation folder",
        "",
        "Costs are over all rows of the folder (what generating it took), in tokens.",
        "",
        "| folder | problems | rows | chosen | exported | teacher generated | teacher prompt "
        "(cached) | student processed | student scored | method | teacher | student |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summary["sources"]:
        c = s["costs"]
        lines.append(
            f"| {s['input']} | {s['problems']} | {s['rows']} | {s['chosen']} | {s['exported']} | "
            f"{c['teacher_tokens_generated']} | {c['teacher_prompt_tokens']} "
            f"({c['teacher_cached_prompt_tokens']}) | {c['student_tokens_processed']} | "
            f"{c['student_tokens_scored']} | {', '.join(s['method'])} | {', '.join(s['teacher_model'])} | "
            f"{', '.join(s['student_model'])} |"
        )
    lines += [
        "",
        "## Export config",
        "",
        "```yaml",
        to_yaml(cfg).rstrip(),
        "```",
        "",
        "## Summary",
        "",
        "```json",
        json.dumps({k: v for k, v in summary.items() if k != "shards"}, indent=1),
        "```",
        "",
    ]
    return "\n".join(lines)


def format_summary(summary: dict[str, Any]) -> str:
    """What a person reads at the end of `python -m jobs.export`."""
    out = summary["output_dir"] if is_remote(summary["output_dir"]) else Path(summary["output_dir"]).resolve()
    lines = [
        "",
        f"Output: {out}",
        f"  {len(summary['shards'])} Parquet shard(s) {DATA_DIR}/{summary['split']}-*.parquet and "
        f"{CARD_NAME} "
        '(the dataset card). Load with datasets.load_dataset("parquet", data_files=...); TRL\'s SFTTrainer '
        "takes it as is.",
        f"Rows: {summary['exported_rows']} exported (rows={summary['rows']}).",
    ]
    for s in summary["sources"]:
        lines.append(
            f"  {s['input']}: {s['exported']} of {s['rows']} rows ({s['chosen']} chosen; {s['problems']} "
            f"problems); teacher generated {s['costs']['teacher_tokens_generated']} tokens, student scored "
            f"{s['costs']['student_tokens_scored']}."
        )
    return "\n".join(lines)
