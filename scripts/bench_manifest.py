"""Manifest cost of the generation output: bytes written to the manifest per committed problem, and time.

Drives the real `ShardWriter` (gen_ssd_ray.generate.output) through its public `add` path, which
validates every problem with `rows_to_table` and commits a shard every `shard_size` problems (Parquet
write, fsyncs, one manifest log line), with the smallest valid row: a `trajectory_index`, a status and
the config fingerprint (`add` fills in the `problem_id`). For each size it reports:

- `manifest_bytes_per_problem`: `ShardWriter.manifest_bytes_written` / problems (the initial snapshot
  plus one log line per shard); flat in the number of problems is the point (target: the figure at
  1,000,000 within 2x of the one at 10,000).
- `wall_s`, split into `rows_to_table_s` (validation inside `add`, timed by wrapping the function the
  writer calls) and `shard_commit_s` (the `add` calls that committed a shard, less their validation).
- `reopen_s` and `snapshot_bytes`: opening the folder again compacts the log into `_manifest.json`,
  the one O(committed problems) step, paid once per open.
- `old_design_bytes_per_problem`: what rewriting the whole manifest after every shard (the previous
  design) would have written, estimated from the final snapshot size as snapshot * (shards + 1) / 2.

Writes into a temporary folder under --dir (default: the system temp folder), removed afterwards.

    python -m scripts.bench_manifest [--problems 10000 1000000] [--shard-size 64] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

FINGERPRINT = "bench-manifest"


def _timed(fn: Callable[..., Any], acc: list[float]) -> Callable[..., Any]:
    """`fn`, adding the seconds each call takes to acc[0]."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            acc[0] += time.perf_counter() - t

    return wrapper


def bench(problems: int, shard_size: int, workdir: Path) -> dict[str, Any]:
    """Commit `problems` one-row problems through a real ShardWriter in a fresh folder under `workdir`."""
    import gen_ssd_ray.generate.manifest as manifest
    import gen_ssd_ray.generate.output as output

    out = Path(tempfile.mkdtemp(prefix="bench-manifest-", dir=workdir))
    validate = [0.0]
    real = output.rows_to_table
    output.rows_to_table = _timed(real, validate)
    row = {"trajectory_index": 0, "status": "completed", "config_fingerprint": FINGERPRINT}
    commit_s = 0.0
    commits = 0
    try:
        started = time.perf_counter()
        with output.ShardWriter(
            out, fingerprint=FINGERPRINT, config_yaml="bench: true\n", shard_size=shard_size
        ) as w:
            for i in range(problems):
                t, v = time.perf_counter(), validate[0]
                if w.add(f"p{i:08d}", [row]) is not None:
                    commit_s += time.perf_counter() - t - (validate[0] - v)
                    commits += 1
        wall_s = time.perf_counter() - started
    finally:
        output.rows_to_table = real
    t = time.perf_counter()
    output.ShardWriter(
        out, fingerprint=FINGERPRINT, config_yaml="bench: true\n", shard_size=shard_size
    ).close()
    reopen_s = time.perf_counter() - t
    read = manifest.read_manifest(out)
    if read["num_problems"] != problems:
        raise RuntimeError(f"{out}: the manifest lists {read['num_problems']} problems, not {problems}")
    snapshot = (out / manifest.MANIFEST_NAME).stat().st_size
    shards = len(read["shards"])
    return {
        "problems": problems,
        "shards": shards,
        "manifest_bytes_written": w.manifest_bytes_written,
        "manifest_bytes_per_problem": round(w.manifest_bytes_written / problems, 2),
        "wall_s": round(wall_s, 2),
        "rows_to_table_s": round(validate[0], 2),
        "shard_commit_s": round(commit_s, 2),
        "shard_commits_timed": commits,
        "reopen_s": round(reopen_s, 3),
        "snapshot_bytes": snapshot,
        "old_design_bytes_per_problem": round(snapshot * (shards + 1) / 2 / problems, 1),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--problems", type=int, nargs="+", default=[10_000, 1_000_000])
    ap.add_argument(
        "--shard-size", type=int, default=64, help="as output.shard_size in conf/gpu_cluster.yaml"
    )
    ap.add_argument("--dir", type=Path, default=None, help="where the temporary output folders go")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-manifest-", dir=args.dir) as d:
        runs = [bench(n, args.shard_size, Path(d)) for n in args.problems]
    per = [r["manifest_bytes_per_problem"] for r in runs]
    print(
        json.dumps(
            {
                "bench": "manifest",
                "shard_size": args.shard_size,
                "runs": runs,
                "bytes_per_problem_ratio_largest_over_smallest": round(per[-1] / per[0], 3),
            }
        )
    )


if __name__ == "__main__":
    main()
