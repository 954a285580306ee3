"""Scale and fault figures of the generation job on the simulated cluster (`make bench-scale`).

    python -m scripts.bench_scale [--profile full|short] [--skip-faults]

Runs the real driver, beam managers, dispatcher, actors and shard writer against simulated engines
(gen_ssd_ray.sim, conf/sim_cluster.yaml) and prints progress lines, then one JSON object (the last
line) with:
- `scaling_efficiency_8`, `scaling_efficiency_64`: simulated tokens/s at 8 and 64 engines over 8x and
  64x the 1-engine figure (weak scaling: the same problems per engine);
- `inflight_problems`: peak problems in flight in the 64-engine run;
- `orchestration_overhead`: engine-seconds idle while problems were still waiting to be admitted,
  over engines x that time, in the 64-engine run;
- `driver_ms_per_result_p99`: the dispatcher's own time per result in the 64-engine run;
- `manifest_bytes_per_problem`: bytes written to manifest files per committed problem by the real
  writer at 10,000 and at 1,000,000 problems (scripts.bench_manifest);
- `faults`: per scenario of gen_ssd_ray.sim.scenarios, total / committed / lost / duplicated and
  throughput against the clean run.
The `short` profile (a few minutes) is what the test suite runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

# Simulated time runs `compression` times faster than wall-clock time. The runs measure simulated
# throughput, so each size gets the fastest compression at which this 2-core machine still feeds its
# engines (the orchestration's real CPU time is the limit: 64 engines need a slower clock).
PROFILES = {
    # engines -> problems per engine; the 64-engine run keeps >= 10,000 problems in flight
    "full": {
        "engines": {1: 2.0, 8: 1.0, 64: 0.4},
        "per_engine": 320,
        "inflight": 160,
        "manifest": 1_000_000,
    },
    "short": {"engines": {1: 4.0, 8: 4.0}, "per_engine": 24, "inflight": 16, "manifest": 20_000},
}


def log(msg: str) -> None:
    print(f"[bench-scale {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def scale_run(tmp: Path, engines: int, per_engine: int, inflight: int, compression: float) -> dict:
    from gen_ssd_ray.sim.harness import run, sim_config, write_problems

    n = engines * per_engine
    data = write_problems(tmp / f"problems-{n}.jsonl", n)
    slots = min(8, engines)
    cfg = sim_config(
        [
            f"data.path={data}",
            f"output.dir={tmp / f'scale-{engines}'}",
            f"teacher.num_engines={engines}",
            f"teacher.max_inflight_problems={inflight}",
            f"student.num_scorers={engines}",  # the same ratio at every size (weak scaling)
            f"sim.engines_per_actor={slots}",
            f"sim.time_compression={compression}",
            f"runtime.num_beam_managers={max(1, min(4, engines // 4))}",
            "runtime.local_num_cpus=64",
            "sim.model_load=false",
        ]
    )
    r = run(cfg)
    d = r.summary.get("dispatch", {})
    start, last_admit = d.get("started_at"), d.get("last_admitted_at")
    idle = r.idle_fraction(start, last_admit) if start and last_admit else None
    out = {
        "engines": engines,
        "time_compression": compression,
        "problems": n,
        "committed": r.summary.get("problems_done_this_run"),
        "wall_s": round(r.wall_s, 1),
        "sim_s": round(r.sim_s, 1),
        "tokens": r.tokens,
        "sim_tokens_per_s": round(r.sim_tokens_per_s, 1),
        "peak_inflight": d.get("peak_in_flight"),
        "idle_while_waiting": None if idle is None else round(idle, 4),
        "driver_ms_per_result_p99": d.get("ms_per_result_p99"),
        "prefix_cache_hit_rate": r.summary.get("teacher/prefix_cache_hit_rate"),
        # simulated seconds the engines were stepping, over engines x simulated run time
        "engine_busy": round(
            sum(s["sim_busy_s"] for s in r.engine_stats) / (len(r.engine_stats) * r.sim_s), 3
        )
        if r.engine_stats and r.sim_s
        else None,
        "mean_batch": round(
            sum(s["generated_tokens"] for s in r.engine_stats)
            / max(1, sum(s["steps"] for s in r.engine_stats)),
            1,
        ),
        "peak_running_seqs": max((s["peak_running_seqs"] for s in r.engine_stats), default=None),
        "error": r.error,
    }
    log(json.dumps(out))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", choices=sorted(PROFILES), default="full")
    ap.add_argument("--skip-faults", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    p = PROFILES[args.profile]
    t0 = time.time()
    result: dict = {"profile": args.profile}
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmpdir:
        tmp = Path(tmpdir)
        runs = {e: scale_run(tmp, e, p["per_engine"], p["inflight"], c) for e, c in p["engines"].items()}
        one = runs[1]["sim_tokens_per_s"]
        for e, r in runs.items():
            if e > 1:
                result[f"scaling_efficiency_{e}"] = (
                    round(r["sim_tokens_per_s"] / (e * one), 3) if one else None
                )
        big = runs[max(runs)]
        result["inflight_problems"] = big["peak_inflight"]
        result["orchestration_overhead"] = big["idle_while_waiting"]
        result["driver_ms_per_result_p99"] = big["driver_ms_per_result_p99"]
        result["runs"] = list(runs.values())

        from scripts.bench_manifest import bench as bench_manifest

        # bytes are the figure here, not time: tmpfs where there is one (the writer's fsyncs are real)
        shm = Path("/dev/shm")
        where = Path(tempfile.mkdtemp(dir=shm)) if shm.is_dir() else tmp
        try:
            sizes = (10_000, p["manifest"])
            runs_m = {n: bench_manifest(n, 64, where) for n in sizes}
        finally:
            if where != tmp:
                shutil.rmtree(where, ignore_errors=True)
        result["manifest_bytes_per_problem"] = {
            str(n): r["manifest_bytes_per_problem"] for n, r in runs_m.items()
        }
        log(f"manifest: {json.dumps(runs_m)}")

        if not args.skip_faults:
            from gen_ssd_ray.sim.scenarios import SHORT, run_scenarios

            short = args.profile == "short"
            result["faults"] = run_scenarios(tmp, short=short, log=log, only=SHORT if short else None)
    result["bench_wall_s"] = round(time.time() - t0, 1)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
