"""The simulated cluster harness: runs the real generation job against simulated engines and measures it.

- `write_problems(path, n)`: a JSONL of `n` synthetic word problems (ids `sim-<i>`).
- `sim_config(overrides)`: conf/sim_cluster.yaml plus `key=value` overrides (a GenerateConfig).
- `SimCluster`: a `ray.cluster_utils.Cluster` of fake-GPU nodes on this machine (`add`, `remove`),
  whose address a config's `runtime.ray_address` joins.
- `run(cfg, during=None)`: the job in this process, as `python -m jobs.generate` runs it (prepare,
  engines, beam managers, dispatcher, shard writer), with `during(pools)` called in a thread while it
  runs (a fault schedule's outside actions: kill an actor, remove a node); returns a `RunResult`
  with the job's summary and what the engines recorded (simulated busy time, idle intervals).
- `stand_in_models(dir, max_len)`: the embedded teacher and student without weights (config and
  tokenizer are all the simulated engines read), declaring `max_len` positions, for runs with the long
  trajectories of real reasoning models.
- `output_ids(dir)`: committed problem ids of an output folder, duplicates included, to check
  exactly-once.

Simulated throughput is tokens over simulated time: wall-clock seconds times `sim.time_compression`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gen_ssd_ray.generate.config import GenerateConfig

PRESET = Path(__file__).resolve().parents[2] / "conf" / "sim_cluster.yaml"


def write_problems(path: str | Path, n: int) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for i in range(n):
            a, b = 3 + i % 97, 5 + i % 89
            q = f"A crate holds {a} apples and another holds {b}. How many apples are there in all?"
            f.write(json.dumps({"id": f"sim-{i}", "question": q, "answer": f"#### {a + b}"}) + "\n")
    return path


def sim_config(overrides: list[str]) -> GenerateConfig:
    from gen_ssd_ray.common.config import load_config

    return load_config(PRESET, overrides, GenerateConfig)


class SimCluster:
    """A local Ray cluster of `nodes` nodes with `gpus_per_node` fake GPUs each (Ray schedules on the
    GPU resource; nothing uses a GPU) and `cpus_per_node` logical CPUs, plus a head without GPUs."""

    def __init__(self, nodes: int, gpus_per_node: int = 8, cpus_per_node: int = 8, head_cpus: int = 4):
        from ray.cluster_utils import Cluster

        self.size, self.gpus_per_node, self.cpus_per_node = nodes, gpus_per_node, cpus_per_node
        self.cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": head_cpus, "num_gpus": 0})
        self.nodes = [self.add() for _ in range(nodes)]
        self.joined: list[subprocess.Popen] = []  # nodes that joined as their own `ray start` process

    @property
    def address(self) -> str:
        return self.cluster.address

    def add(self):
        return self.cluster.add_node(num_gpus=self.gpus_per_node, num_cpus=self.cpus_per_node)

    def join(self) -> None:
        """A new node joins as its own process (what an autoscaler or KubeRay does); safe from any thread."""
        ray_bin = Path(sys.executable).with_name("ray")
        cmd = [str(ray_bin), "start", "--address", self.address, "--block", "--disable-usage-stats"]
        cmd += [f"--num-gpus={self.gpus_per_node}", f"--num-cpus={self.cpus_per_node}"]
        self.joined.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

    def remove(self, node) -> None:
        self.cluster.remove_node(node, allow_graceful=False)
        if node in self.nodes:
            self.nodes.remove(node)

    def restore(self) -> None:
        """Back to `nodes` nodes of this cluster's own (joined nodes stopped), before a new scenario."""
        self._stop_joined()
        while len(self.nodes) < self.size:
            self.nodes.append(self.add())
        self.cluster.wait_for_nodes()

    def node_of(self, node_id: str):
        return next((n for n in self.nodes if n.node_id == node_id), None)

    def _stop_joined(self) -> None:
        for p in self.joined:
            p.terminate()
        for p in self.joined:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        self.joined.clear()

    def shutdown(self) -> None:
        import ray

        ray.shutdown()
        self._stop_joined()
        self.cluster.shutdown()

    def __enter__(self) -> SimCluster:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


@dataclass
class RunResult:
    summary: dict[str, Any]
    wall_s: float
    sim_s: float
    tokens: int
    engine_stats: list[dict] = field(default_factory=list)
    dispatch: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    @property
    def sim_tokens_per_s(self) -> float:
        return self.tokens / self.sim_s if self.sim_s else 0.0

    def idle_fraction(self, start: float, end: float) -> float:
        """Engine-seconds idle within wall-clock [start, end] over engines x (end - start)."""
        if end <= start or not self.engine_stats:
            return 0.0
        idle = 0.0
        for s in self.engine_stats:
            spans = list(s.get("idle_intervals") or [])
            if s.get("idle_since") is not None:
                spans.append((s["idle_since"], end))
            idle += sum(max(0.0, min(b, end) - max(a, start)) for a, b in spans)
        return idle / (len(self.engine_stats) * (end - start))


def run(cfg: GenerateConfig, during: Callable[[Any], None] | None = None) -> RunResult:
    """Run the generation job in this process (joining `cfg.runtime.ray_address`); see the module doc."""
    import ray

    from gen_ssd_ray.common.cluster import init_ray
    from gen_ssd_ray.engines.actors import actors_of
    from gen_ssd_ray.generate.driver import prepare, run_generate
    from gen_ssd_ray.generate.pools import build_pools, shutdown_pools

    prepared = prepare(cfg)
    init_ray(cfg.runtime.ray_address, cfg.runtime.local_num_cpus)
    thread, error, pools, engine_stats = None, None, None, []
    summary: dict[str, Any] = {}
    t0 = time.time()
    try:
        pools = build_pools(cfg, prepared.teacher_path, prepared.student_path)
        if during is not None:
            thread = threading.Thread(target=during, args=(pools,), daemon=True)
            thread.start()
        t0 = time.time()
        try:
            summary = run_generate(cfg, prepared, pools=pools)
        except Exception as e:  # a scenario may end in JobFailed: the caller reports it
            summary, error = getattr(e, "summary", {}) or {}, f"{type(e).__name__}: {e}"
        for a in actors_of(pools.teachers):
            try:
                engine_stats += [b for b in ray.get(a.stats.remote(), timeout=30)["backends"] if b]
            except Exception:  # an actor killed by the scenario
                pass
    except Exception as e:  # engines that never started
        error = f"{type(e).__name__}: {e}"
        prepared.writer.close()
    finally:
        wall = time.time() - t0
        if thread is not None:
            thread.join(timeout=60)
        if pools is not None:
            shutdown_pools(pools)
        ray.shutdown()
    tokens = int(summary.get("teacher/tokens_generated") or 0)
    elapsed = float(summary.get("elapsed_s") or wall)
    return RunResult(
        summary=summary,
        wall_s=elapsed,
        sim_s=elapsed * cfg.sim.time_compression,
        tokens=tokens,
        engine_stats=engine_stats,
        dispatch=summary.get("dispatch", {}),
        error=error,
    )


def stand_in_models(root: str | Path, max_len: int) -> tuple[str, str]:
    """(teacher, student) folders: the embedded models' configs and tokenizers, declaring `max_len`
    positions (`max_position_embeddings`, the tokenizer's `model_max_length`), without weights."""
    import shutil

    from gen_ssd_ray.common.models import EMBEDDED_STUDENT, EMBEDDED_TEACHER, resolve_model

    out = []
    for name in (EMBEDDED_TEACHER, EMBEDDED_STUDENT):
        src, dest = Path(resolve_model(name)), Path(root) / name.split(":")[1]
        dest.mkdir(parents=True, exist_ok=True)
        for f in src.iterdir():
            if f.is_file() and f.suffix not in (".safetensors", ".bin"):
                shutil.copy2(f, dest / f.name)
        for fname, key in (
            ("config.json", "max_position_embeddings"),
            ("tokenizer_config.json", "model_max_length"),
        ):
            path = dest / fname
            if path.exists():
                data = json.loads(path.read_text())
                data[key] = max_len
                path.write_text(json.dumps(data, indent=2))
        out.append(str(dest))
    return out[0], out[1]


def output_ids(out_dir: str | Path) -> Counter:
    """problem id -> number of committed shards holding its live rows (exactly-once: every count is 1;
    rows a later shard superseded, gen_ssd_ray.generate.output, do not count)."""
    import pyarrow.parquet as pq

    from gen_ssd_ray.common.storage import Storage
    from gen_ssd_ray.generate.manifest import live_shards, read_manifest

    manifest = read_manifest(out_dir) or {"shards": []}
    fs, root = Storage(str(out_dir)).arrow()  # a local folder or an object-store URI
    ids: Counter = Counter()
    for name, stale in live_shards(manifest):
        table = pq.read_table(f"{root}/{name}", columns=["problem_id"], filesystem=fs)
        ids.update(set(table.column("problem_id").to_pylist()) - stale)
    return ids
