"""Each fix of the simulated-cluster work, shown by a run that fails without it (`make bench-fixes`).

    python -m scripts.bench_fixes [--only NAME ...] [--problems N]

Every comparison runs the real job (driver, beam managers, dispatcher, actors, shard writer) on the
simulated cluster twice or more, the same problems and faults each time, with the fix switched off
by its config key ("before": how the job behaved before the fix) and on (the default). Printed: one
progress line per run, then one JSON object (the last line) with, per comparison, its runs, each with
`total`, `committed`, `lost`, `duplicated`, `throughput_vs_clean` (simulated tokens/s against the
same setup without the fault) and what the fix is about:

- `pool_health` (`runtime.pool_health`): a hung scorer on a 4-node cluster. Without health, each
  chunk routed to it waits for the deadline, and the hung scorer gets the next call again; with it,
  the scorer cools down and is probed with real work (`ping`) before it is used again.
- `node_loss` (`runtime.scheduling_strategy` x `runtime.retry_window_s`): the node that hosts scorer 0
  is removed and comes back 2 minutes later (simulated), with scorers packed by Ray's default placement
  or spread over nodes, and with or without backoff while capacity is missing (retry_window_s=0: a
  problem's attempts run out at once). `scorer_nodes` is how many nodes held the scorers.
- `overload` (`teacher.admission` and `runtime.late_call_limit`): more problems per engine than its
  slots and cache serve within the call deadline. A fixed count with a hard deadline cancels and
  re-issues calls (`work_ratio`: tokens the engines generated over tokens in committed rows);
  admission by KV capacity with a liveness deadline does the work once.
- `kv_admission` (`teacher.admission`): 8k-token trajectories (the H100 profile with EOS once per
  20,000 tokens) on one engine, a fixed 256 problems in flight against as many as its KV cache holds: `reprefill_per_generated` (uncached prompt tokens
  prefilled again per generated token) and throughput.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def log(msg: str) -> None:
    print(f"[bench-fixes {time.strftime('%H:%M:%S')}] {msg}", flush=True)


CLUSTER = {"nodes": 4, "gpus_per_node": 8, "cpus_per_node": 8}


def _summary(name: str, r, ids, n: int, clean_tps: float | None, extra: dict | None = None) -> dict:
    from gen_ssd_ray.sim.scenarios import record

    out = record(n, ids, r.sim_tokens_per_s, clean_tps, r.error, r.wall_s)
    committed_tokens = r.tokens
    engine_tokens = sum(s.get("generated_tokens", 0) for s in r.engine_stats)
    out.update(
        sim_tokens_per_s=round(r.sim_tokens_per_s, 1),
        retries=r.dispatch.get("retries"),
        work_ratio=round(engine_tokens / committed_tokens, 2) if committed_tokens else None,
        **(extra or {}),
    )
    log(f"{name}: {json.dumps(out)}")
    return out


def cluster_fixes(tmp: Path, n: int, only: set[str]) -> dict:
    """pool_health and node_loss, on one SimCluster."""
    import ray

    from gen_ssd_ray.sim.harness import SimCluster, output_ids, run, sim_config, write_problems
    from gen_ssd_ray.sim.scenarios import FAULT_AT_S, base_overrides, fault_overrides

    problems = write_problems(tmp / "fix-problems.jsonl", n)
    results: dict = {}
    compression = 4
    with SimCluster(**CLUSTER) as cluster:

        def one(name: str, extra: list[str], during=None, clean_tps=None, info=None):
            cluster.restore()
            base = base_overrides(tmp, name, cluster.address, problems, short=False)
            cfg = sim_config([*base, f"sim.time_compression={compression}", *extra])
            r = run(cfg, during)
            return r, _summary(name, r, output_ids(cfg.output.dir), n, clean_tps, info)

        if "pool_health" in only:
            clean, _ = one("pool_health/clean", [])
            tps = clean.sim_tokens_per_s
            hung = fault_overrides("hung", "scorer")
            results["pool_health"] = {
                "before": one("pool_health/before", [*hung, "runtime.pool_health=false"], clean_tps=tps)[1],
                "after": one("pool_health/after", hung, clean_tps=tps)[1],
            }

        if "node_loss" in only:
            scorers = ["student.num_scorers=4"]
            wall_fault = FAULT_AT_S / compression
            readd_after = 120.0 / compression
            placed: dict = {}

            def lose_scorer_node(pools) -> None:
                time.sleep(wall_fault)
                nodes = [ray.get(a.ready.remote())["node_id"] for a in {s.actor: 0 for s in pools.scorers}]
                placed["scorer_nodes"] = len(set(nodes))
                node = cluster.node_of(nodes[0])
                if node is not None:
                    cluster.remove(node)
                time.sleep(readd_after)
                cluster.join()

            out: dict = {}
            for strategy in ("DEFAULT", "SPREAD"):
                clean, _ = one(
                    f"node_loss/{strategy}/clean", [*scorers, f"runtime.scheduling_strategy={strategy}"]
                )
                for window in ("0", "1800"):
                    key = f"{strategy.lower()}_retry_window_{window}"
                    placed.clear()
                    extra = [
                        *scorers,
                        f"runtime.scheduling_strategy={strategy}",
                        f"runtime.retry_window_s={window}",
                    ]
                    r, rec = one(f"node_loss/{key}", extra, lose_scorer_node, clean.sim_tokens_per_s)
                    rec.update(placed)
                    out[key] = rec
            results["node_loss"] = out
    return results


def local_run(tmp: Path, name: str, overrides: list[str]) -> tuple:
    from gen_ssd_ray.sim.harness import output_ids, run, sim_config

    cfg = sim_config(
        [f"output.dir={tmp / name}", "runtime.local_num_cpus=16", "sim.model_load=false", *overrides]
    )
    r = run(cfg)
    return r, output_ids(cfg.output.dir)


def overload(tmp: Path, n: int) -> dict:
    from gen_ssd_ray.sim.harness import write_problems

    data = write_problems(tmp / "overload.jsonl", n)
    common = [
        f"data.path={data}",
        "teacher.num_engines=1",
        "student.num_scorers=2",
        "sim.engines_per_actor=1",
        "teacher.max_num_seqs=64",
        f"teacher.max_inflight_problems={n}",
        "search.max_new_tokens=4096",
        "runtime.call_timeout_s=60",
        "runtime.max_attempts=3",
        "runtime.num_beam_managers=1",
        "output.shard_size=16",
        "sim.time_compression=16",
    ]
    runs = {}
    for key, extra in [
        ("before", ["teacher.admission=fixed", "runtime.late_call_limit=1"]),
        ("liveness_only", ["teacher.admission=fixed"]),
        ("after", []),
    ]:
        r, ids = local_run(tmp, f"overload-{key}", [*common, *extra])
        runs[key] = _summary(
            f"overload/{key}", r, ids, n, None, {"peak_inflight": r.dispatch.get("peak_in_flight")}
        )
    return runs


def kv_admission(tmp: Path, n: int) -> dict:
    from gen_ssd_ray.sim.harness import stand_in_models, write_problems

    data = write_problems(tmp / "kv.jsonl", n)
    teacher, student = stand_in_models(tmp / "models", 32768)
    # the H100 profile with reasoning-length traces: EOS once per 20,000 tokens, so most run to 8k
    profile = yaml.safe_load((ROOT / "conf" / "sim" / "h100.yaml").read_text())
    profile["source"] = "conf/sim/h100.yaml with teacher.eos_prob 5e-5 (scripts/bench_fixes.py)"
    profile["teacher"]["eos_prob"] = 5e-5
    (tmp / "h100-long.yaml").write_text(yaml.safe_dump(profile))
    common = [
        f"data.path={data}",
        f"sim.profile={tmp / 'h100-long.yaml'}",
        f"teacher.model={teacher}",
        f"student.model={student}",
        "teacher.num_engines=1",
        "student.num_scorers=4",
        "sim.engines_per_actor=4",
        "teacher.max_inflight_problems=256",
        "search.max_new_tokens=8192",
        "runtime.num_beam_managers=1",
        "output.shard_size=64",
        "sim.time_compression=48",
    ]
    runs = {}
    for key, extra in [("before", ["teacher.admission=fixed"]), ("after", [])]:
        r, ids = local_run(tmp, f"kv-{key}", [*common, *extra])
        prompt = sum(s.get("prompt_tokens", 0) for s in r.engine_stats)
        cached = sum(s.get("cached_prompt_tokens", 0) for s in r.engine_stats)
        gen = sum(s.get("generated_tokens", 0) for s in r.engine_stats)
        info = {
            "peak_inflight": r.dispatch.get("peak_in_flight"),
            "reprefill_per_generated": round((prompt - cached) / gen, 3) if gen else None,
            "prefix_cache_hit_rate": r.summary.get("teacher/prefix_cache_hit_rate"),
        }
        runs[key] = _summary(f"kv_admission/{key}", r, ids, n, None, info)
    before, after = runs["before"]["sim_tokens_per_s"], runs["after"]["sim_tokens_per_s"]
    runs["speedup"] = round(after / before, 2) if before else None
    return runs


FIXES = ("pool_health", "node_loss", "overload", "kv_admission")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", choices=FIXES, default=list(FIXES))
    ap.add_argument("--problems", type=int, default=512, help="problems per cluster run")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    only = set(args.only)
    t0 = time.time()
    result: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench-fixes-") as tmpdir:
        tmp = Path(tmpdir)
        if only & {"pool_health", "node_loss"}:
            result.update(cluster_fixes(tmp, args.problems, only))
        if "overload" in only:
            result["overload"] = overload(tmp, 256)
        if "kv_admission" in only:
            result["kv_admission"] = kv_admission(tmp, 768)
    result["bench_wall_s"] = round(time.time() - t0, 1)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
