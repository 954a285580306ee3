"""The fault schedule of the simulated cluster: one run per fault, checked for exactly-once.

Every scenario runs the real job on a `SimCluster` of fake-GPU nodes (teacher engines at
tensor-parallel 4 asking for 4 GPUs each, scorers for 1, spread over nodes) with the same problems,
and reports `total`, `committed`, `lost` (problems not committed after the run, and after the
resubmission where the scenario has one), `duplicated` (problems in more than one shard) and
`throughput_vs_clean` (simulated tokens/s against the clean run). Faults:

- inside engines (the `sim.faults` schedule): teacher engine dead (its engine core; the actor ends
  and Ray restarts it), hung, slow; scorer dead, hung;
- from outside, while the job runs: a teacher actor killed with and without restart, a node removed,
  a node removed and then added back (an autoscaler), a beam manager killed, and the driver
  SIGKILLed in the middle of a shard and the same command resubmitted.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gen_ssd_ray.sim.harness import SimCluster, output_ids, run, sim_config, write_problems

FAULT_AT_S = 10.0  # simulated seconds after an engine's first request
# The short schedule (the test suite's): one fault of each kind of recovery.
SHORT = {"teacher_dead", "node_removed_readded", "manager_killed", "driver_sigkill_resubmit"}


def base_overrides(tmp: Path, name: str, address: str, problems: Path, short: bool) -> list[str]:
    return [
        f"data.path={problems}",
        f"output.dir={tmp / name}",
        f"runtime.ray_address={address}",
        "teacher.num_engines=4",
        "teacher.num_gpus=4",
        "teacher.max_inflight_problems=32",
        "student.num_scorers=2",
        "student.num_gpus=1",
        "sim.engines_per_actor=1",
        f"sim.time_compression={8 if short else 4}",
        "sim.profile=h100",
        "runtime.num_beam_managers=2",
        # a liveness deadline (a late call whose engine still advances is waited for), so it can be
        # short: about two chunk expansions at full batch
        "runtime.call_timeout_s=30",
        "runtime.engine_cooldown_s=10",
        "runtime.max_attempts=3",
        "output.shard_size=16",
        # no load at the first start (it is not measured); restarted engines reload the model
        "sim.model_load=false",
    ]


def fault_overrides(kind: str, target: str, duration: float | None = None) -> list[str]:
    d = "null" if duration is None else duration
    return [f"sim.faults=[{{target: {target}, index: 0, kind: {kind}, at_s: {FAULT_AT_S}, duration_s: {d}}}]"]


def after(seconds: float, action: Callable[[Any], None]) -> Callable[[Any], None]:
    def during(pools) -> None:
        time.sleep(seconds)
        action(pools)

    return during


def run_scenarios(
    tmp: Path, short: bool = False, log: Callable[[str], None] = print, only: set[str] | None = None
) -> dict[str, dict]:
    """Run the clean run and every scenario (or the clean run and those in `only`); see the module doc."""
    import ray

    n = 96 if short else 256
    problems = write_problems(tmp / "fault-problems.jsonl", n)
    results: dict[str, dict] = {}
    with SimCluster(nodes=4, gpus_per_node=8, cpus_per_node=8) as cluster:
        wall_fault = FAULT_AT_S / (8 if short else 4)

        def kill_teacher(no_restart: bool):
            return lambda pools: ray.kill(pools.teachers[0].actor, no_restart=no_restart)

        def node_of_teacher(pools):
            node_id = ray.get(pools.teachers[0].actor.ready.remote())["node_id"]
            return cluster.node_of(node_id)

        def remove_node(readd_after: float | None):
            def action(pools):
                node = node_of_teacher(pools)
                if node is not None:
                    cluster.remove(node)
                if readd_after is not None:
                    time.sleep(readd_after)
                    cluster.join()

            return action

        scenarios: list[tuple[str, list[str], Callable | None]] = [
            ("clean", [], None),
            ("teacher_dead", fault_overrides("dead", "teacher"), None),
            ("teacher_hung", fault_overrides("hung", "teacher"), None),
            ("teacher_slow", fault_overrides("slow", "teacher", duration=FAULT_AT_S * 2), None),
            ("scorer_dead", fault_overrides("dead", "scorer"), None),
            ("scorer_hung", fault_overrides("hung", "scorer"), None),
            ("actor_killed_restart", [], after(wall_fault, kill_teacher(False))),
            ("actor_killed_no_restart", [], after(wall_fault, kill_teacher(True))),
            ("node_removed", [], after(wall_fault, remove_node(None))),
            ("node_removed_readded", [], after(wall_fault, remove_node(wall_fault))),
            ("manager_killed", [], after(wall_fault, lambda pools: ray.kill(pools.managers[0]))),
        ]
        clean_tps = None
        for name, extra, during in scenarios:
            if only and name != "clean" and name not in only:
                continue
            cluster.restore()
            cfg = sim_config([*base_overrides(tmp, name, cluster.address, problems, short), *extra])
            t0 = time.time()
            r = run(cfg, during)
            ids = output_ids(cfg.output.dir)
            if name == "clean":
                clean_tps = r.sim_tokens_per_s
            results[name] = record(n, ids, r.sim_tokens_per_s, clean_tps, r.error, time.time() - t0)
            log(f"fault {name}: {results[name]}")
        if only and "driver_sigkill_resubmit" not in only:
            return results
        cluster.restore()
        results["driver_sigkill_resubmit"] = _driver_kill(
            tmp, cluster.address, problems, n, short, clean_tps, log
        )
    return results


def record(n: int, ids, tps: float, clean_tps: float | None, error: str | None, wall: float) -> dict:
    return {
        "total": n,
        "committed": len(ids),
        "lost": n - len(ids),
        "duplicated": sum(1 for c in ids.values() if c > 1),
        "throughput_vs_clean": round(tps / clean_tps, 3) if clean_tps else None,
        "error": error,
        "wall_s": round(wall, 1),
    }


def _driver_kill(tmp: Path, address: str, problems: Path, n: int, short: bool, clean_tps, log) -> dict:
    """`python -m jobs.generate` SIGKILLed while a shard is half full, then the same command again."""
    from gen_ssd_ray.generate.manifest import read_manifest

    out = tmp / "driver_sigkill_resubmit"
    # a slower clock than the other scenarios, so that the kill lands while shards are being filled
    overrides = [
        o
        for o in base_overrides(tmp, out.name, address, problems, short)
        if not o.startswith(("output.dir", "sim.time_compression"))
    ]
    overrides.append("sim.time_compression=1")
    cmd = [
        sys.executable,
        "-m",
        "jobs.generate",
        "--config",
        "conf/sim_cluster.yaml",
        *overrides,
        f"output.dir={out}",
    ]
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root)}
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=root, env=env, start_new_session=True)
    killed_at = None
    while proc.poll() is None and time.time() - t0 < 900:
        m = (
            read_manifest(out)
            if (out / "_manifest.json").exists() or (out / "_manifest.log").exists()
            else None
        )
        if m and m["num_problems"] >= 16:  # one shard committed, the next one filling
            os.killpg(proc.pid, signal.SIGKILL)
            killed_at = m["num_problems"]
            break
        time.sleep(0.05)
    proc.wait()
    first = output_ids(out)
    rc = subprocess.run(cmd, cwd=root, env=env).returncode
    ids = output_ids(out)
    rec = record(n, ids, 0.0, None, None if rc == 0 else f"resubmission exit {rc}", time.time() - t0)
    rec["committed_before_kill"] = len(first) if killed_at is not None else None
    log(f"fault driver_sigkill_resubmit: {rec}")
    return rec
