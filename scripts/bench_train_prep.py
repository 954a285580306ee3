"""Peak memory of preparing a large fine-tuning input (a 1M-row generation output folder).

    python scripts/bench_train_prep.py                      # generate 1M rows (once), measure read+filter
    python scripts/bench_train_prep.py --rows 50000 --legacy  # the old reader (every column) at 50k rows
    python scripts/bench_train_prep.py --tokenize 20000       # also tokenize 20k kept rows (timed)
    python scripts/bench_train_prep.py --stage prepare        # the job's whole prepare() (~3 min at 1M)
    python scripts/bench_train_prep.py --stage prepare --filters '[]'   # worst case: every row kept

1. Generation (skipped when the folder exists): `--rows` rows of exactly `OUTPUT_SCHEMA`
   (gen_ssd_ray.generate.rows) in `--shards` Parquet shards with a generation job's manifest, under
   outputs/bench/ (git-ignored). Built column-wise with pyarrow (seconds per shard): unique texts of
   realistic lengths (question ~240 chars, response ~800, teacher prompt ~400), teacher token ids
   (~250 per row), and a nested `chunks` column (8 chunks x 4 candidates of ~100 chars each). 4
   trajectories per problem; status completed 70% / pruned 20% / truncated 8% / error 2%; correct 60%
   true / 30% false / 10% null; selected 25%.
2. Measurement, in a fresh subprocess each (so that nothing of the generation step is counted): the
   stage's peak RSS from `resource.getrusage(RUSAGE_SELF).ru_maxrss`, its time, and the rows kept.
   Stages: `read` = `read_filtered` (needed columns, the default `data.filters` applied one file at
   a time) + `data_signature`, exactly what `prepare` does to the data before tokenizing; `prepare` = the whole
   `gen_ssd_ray.train.run.prepare` with the embedded student (model checks, reading, filters,
   chat-template tokenization of every kept row, fingerprint). `--tokenize N` adds, after `read`, the
   chat-template tokenization of the first N kept rows (time per row and the bytes of the token arrays,
   from which the 1M-row figure is extrapolated). `--legacy` measures the reader before column
   projection (every column, nested `chunks` included, into pandas), for the before/after figure.

Prints one line per measurement and a closing JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORDS = (
    "the of and to a in is it you that he was for on are with as his they be at one have this from or "
    "had by word but what some we can out other were all there when up use your how said an each she "
    "which do their time if will way about many then them write would like so these her long make thing "
    "see him two has look more day could go come did number sound no most people my over know water "
    "than call first who may down side been now find apples costs dollars total each buys sells how many"
).split()


def _texts(rng, n: int, mean: int, spread: int, tag: str, start: int):
    """`n` unique strings of about `mean` characters (a pool of word sequences plus a unique suffix)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    pool_size = 512
    words = np.array(WORDS)
    pool = []
    for _ in range(pool_size):
        length = max(8, int(rng.normal(mean, spread)))
        picked = words[rng.integers(0, len(words), size=length // 4 + 1)]
        pool.append(" ".join(picked)[:length])
    base = pa.array(pool).take(pa.array(rng.integers(0, pool_size, size=n)))
    suffix = pc.cast(pa.array(np.arange(start, start + n)), pa.string())
    return pc.binary_join_element_wise(base, pa.array([tag] * n), suffix, "")


def _lists(rng, n: int, mean: int, spread: int, values):
    """A list array of `n` lists of about `mean` items, taking items from `values(total)`."""
    import numpy as np
    import pyarrow as pa

    lengths = np.maximum(1, rng.normal(mean, spread, size=n).astype(np.int64))
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), values(int(offsets[-1])))


def make_shard(rng, n: int, start: int):
    """`n` rows (row ids from `start`) of OUTPUT_SCHEMA."""
    import numpy as np
    import pyarrow as pa

    from gen_ssd_ray.generate.rows import CANDIDATE_TYPE, CHUNK_TYPE, OUTPUT_SCHEMA, SAMPLING_TYPE

    ids = np.arange(start, start + n)
    problem = ids // 4
    status = rng.choice(["completed", "pruned", "truncated", "error"], p=[0.7, 0.2, 0.08, 0.02], size=n)
    correct_draw = rng.random(n)
    correct = pa.array(correct_draw < 0.6, mask=correct_draw >= 0.9)

    def candidates(total: int):
        return pa.StructArray.from_arrays(
            [
                _texts(rng, total, 100, 40, " c", 0),
                pa.array(rng.integers(10, 40, size=total).astype(np.int32)),
                pa.array(np.where(rng.random(total) < 0.9, "length", "stop")),
                pa.array(rng.random(total) * 3 + 1),
            ],
            fields=list(CANDIDATE_TYPE),
        )

    def chunks(total: int):
        return pa.StructArray.from_arrays(
            [
                _lists(rng, total, 4, 0, candidates),
                pa.array(rng.integers(-1, 4, size=total).astype(np.int32)),
            ],
            fields=list(CHUNK_TYPE),
        )

    ints = lambda lo, hi, dt: pa.array(rng.integers(lo, hi, size=n).astype(dt))  # noqa: E731
    sampling = pa.StructArray.from_arrays(
        [
            pa.array(np.full(n, 0.7)),
            pa.array(np.full(n, 0.95)),
            pa.array(np.full(n, 32, np.int32)),
            pa.array(np.full(n, 4, np.int32)),
            pa.array(np.full(n, 4, np.int32)),
            pa.array(np.full(n, 512, np.int32)),
            pa.array(np.full(n, 5.0)),
        ],
        fields=list(SAMPLING_TYPE),
    )
    columns = {
        "problem_id": pa.array([f"gsm8k-{p}" for p in problem]),
        "trajectory_index": pa.array((ids % 4).astype(np.int32)),
        "question": _texts(rng, n, 240, 100, " q", start),
        "gold_answer": pa.array((problem % 1000).astype(str)),
        "prompt_text": _texts(rng, n, 400, 100, " p", start),
        "response": _texts(rng, n, 800, 300, " r", start),
        "response_token_ids": _lists(
            rng, n, 250, 80, lambda t: pa.array(rng.integers(0, 50000, size=t).astype(np.int32))
        ),
        "chunks": _lists(rng, n, 8, 2, chunks),
        "status": pa.array(status),
        "error": pa.array(np.where(status == "error", "engine died", None)),
        "final_answer": pa.array((problem % 997).astype(str)),
        "correct": correct,
        "student_ppl": pa.array(rng.random(n) * 3 + 1),
        "num_response_tokens": ints(50, 500, np.int32),
        "teacher_tokens_generated": ints(50, 2000, np.int64),
        "student_tokens_processed": ints(50, 2000, np.int64),
        "student_tokens_scored": ints(50, 2000, np.int64),
        "teacher_prompt_tokens": ints(50, 200, np.int64),
        "teacher_cached_prompt_tokens": ints(0, 200, np.int64),
        "teacher_model": pa.array(["embedded:teacher"] * n),
        "student_model": pa.array(["embedded:student"] * n),
        "sampling": sampling,
        "seed": ints(0, 2**31, np.int64),
        "config_fingerprint": pa.array(["benchfp00000000"] * n),
        "method": pa.array(["gen_ssd"] * n),
        "selected": pa.array(rng.random(n) < 0.25),
    }
    # The conversation columns (messages, prompt, completion) are null: fine-tuning never reads them.
    arrays = [columns.get(f.name, pa.nulls(n, f.type)) for f in OUTPUT_SCHEMA]
    return pa.Table.from_arrays(arrays, schema=OUTPUT_SCHEMA)


def generate(folder: Path, rows: int, shards: int, seed: int = 0) -> None:
    import datetime

    import numpy as np
    import pyarrow.parquet as pq

    from gen_ssd_ray.generate.manifest import MANIFEST_NAME, MANIFEST_VERSION

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    per = -(-rows // shards)
    entries = []
    t0 = time.perf_counter()
    for i in range(shards):
        start, n = i * per, min(per, rows - i * per)
        if n <= 0:
            break
        table = make_shard(rng, n, start)
        name = f"part-{i:05d}.parquet"
        pq.write_table(table, folder / name, compression="zstd")
        pids = list(dict.fromkeys(table.column("problem_id").to_pylist()))
        entries.append(
            {
                "name": name,
                "problem_ids": pids,
                "num_rows": n,
                "num_problems": len(pids),
                "created": datetime.datetime.now(datetime.UTC).isoformat(),
            }
        )
        print(f"  shard {i + 1}/{shards}: {n} rows ({time.perf_counter() - t0:.0f} s)", flush=True)
    manifest = {
        "version": MANIFEST_VERSION,
        "fingerprint": "benchfp00000000",
        "fingerprint_history": [],
        "shards": entries,
        "num_problems": sum(e["num_problems"] for e in entries),
        "num_rows": sum(e["num_rows"] for e in entries),
    }
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))


def measure(folder: Path, stage: str, legacy: bool, tokenize_rows: int, filters: str | None) -> dict:
    """Run in the measuring subprocess: one stage, its peak RSS."""
    from gen_ssd_ray.common.config import load_config
    from gen_ssd_ray.train import data as D
    from gen_ssd_ray.train.config import FinetuneConfig

    overrides = [f"data.path={folder}", "output.dir=outputs/bench/train_prep_out"]
    if filters is not None:
        overrides.append(f"data.filters={filters}")
    cfg = load_config(None, overrides, FinetuneConfig)
    t0 = time.perf_counter()
    result: dict = {"stage": stage, "legacy": legacy, "filters": list(cfg.data.filters)}
    if stage == "prepare":
        from gen_ssd_ray.train.run import prepare

        p = prepare(cfg)
        result.update(rows_read=p.rows_read, kept=p.tokenized.examples, tokens=int(p.examples.tokens.size))
    else:
        if legacy:  # the reader before column projection: every column of every shard into pandas
            import pyarrow as pa
            import pyarrow.parquet as pq

            from gen_ssd_ray.generate.manifest import read_manifest

            files = [folder / s["name"] for s in read_manifest(folder)["shards"]]
            df = pa.concat_tables([pq.read_table(f) for f in files]).to_pandas()
            result["rows_read"] = len(df)
            result["columns_read"] = list(map(str, df.columns))
            df, _ = D.apply_filters(df, cfg.data)
        else:  # what prepare() does: needed columns only, filtered one file at a time
            df, _, result["rows_read"] = D.read_filtered(cfg.data)
            result["columns_read"] = list(map(str, df.columns))
        D.data_signature(df, cfg.data)
        result["kept"] = len(df)
        result["read_filter_s"] = round(time.perf_counter() - t0, 1)
        if tokenize_rows:
            from transformers import AutoTokenizer

            from gen_ssd_ray.common.models import resolve_model

            tok = AutoTokenizer.from_pretrained(resolve_model(cfg.model.path))
            t1 = time.perf_counter()
            ex, _ = D.tokenize(df.iloc[:tokenize_rows], tok, cfg.data, cfg.prompt, cfg.optim.max_seq_len)
            dt = time.perf_counter() - t1
            per_row_bytes = (ex.tokens.nbytes + ex.offsets.nbytes + ex.prompt_lens.nbytes) / max(1, len(ex))
            result.update(
                tokenized_rows=len(ex),
                tokenize_ms_per_row=round(1000 * dt / max(1, len(ex)), 3),
                token_bytes_per_example=round(per_row_bytes, 1),
                token_gb_if_all_kept=round(per_row_bytes * result["kept"] / 1e9, 3),
            )
    result["seconds"] = round(time.perf_counter() - t0, 1)
    result["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 3)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--shards", type=int, default=0, help="default: one per 50k rows")
    ap.add_argument("--folder", default=None, help="default: outputs/bench/train_prep_<rows>")
    ap.add_argument("--stage", choices=["read", "prepare"], default="read")
    ap.add_argument("--legacy", action="store_true", help="measure the reader before column projection")
    ap.add_argument("--tokenize", type=int, default=0, help="tokenize this many kept rows after `read`")
    ap.add_argument("--filters", default=None, help="data.filters override, e.g. '[]' (keep every row)")
    ap.add_argument("--_measure", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    folder = Path(args.folder or ROOT / "outputs" / "bench" / f"train_prep_{args.rows}")
    if args._measure:
        print(json.dumps(measure(folder, args.stage, args.legacy, args.tokenize, args.filters)))
        return
    if not (folder / "_manifest.json").exists():
        shards = args.shards or max(1, -(-args.rows // 50_000))
        print(f"generating {args.rows} rows in {shards} shards under {folder}", flush=True)
        generate(folder, args.rows, shards)
    size = sum(f.stat().st_size for f in folder.glob("*.parquet"))
    print(f"folder: {folder} ({size / 1e9:.2f} GB of Parquet)", flush=True)
    cmd = [sys.executable, __file__, "--_measure", "--folder", str(folder), "--stage", args.stage]
    cmd += ["--legacy"] * args.legacy + ["--tokenize", str(args.tokenize)]
    cmd += ["--filters", args.filters] if args.filters is not None else []
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"measurement failed (exit {proc.returncode}): {proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["parquet_gb"] = round(size / 1e9, 3)
    print(
        f"{args.stage}{' (legacy reader)' if args.legacy else ''}: {result['rows_read']} rows read, "
        f"{result['kept']} kept, {result['seconds']} s, peak RSS {result['peak_rss_gb']} GB"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
