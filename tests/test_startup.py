"""Late failures at start-up: a resource request the cluster can never meet is refused in seconds with
the key to change (gen_ssd_ray.common.cluster.check_fits), and every start-up wait ends promptly on
Ctrl-C / SIGTERM (`ray job stop`), also under generation's stop_on_signals (engines.actors.wait_ready).

Unit tests use a fake `ray` module (actors that become ready when told, a node list); the integration
tests run `python -m jobs.generate` on simulated engines in a subprocess."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import pytest

from gen_ssd_ray.common import cluster
from gen_ssd_ray.common.cluster import Demand, ResourcesError, actor_demand, check_fits, unsatisfiable
from gen_ssd_ray.common.errors import InputError, JobFailed, JobInterrupted
from gen_ssd_ray.common.interrupts import raise_on_signals, stop_on_signals

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30

# ---- a fake ray ------------------------------------------------------------------------------------


class GetTimeoutError(Exception):
    pass


class FakeRay(types.ModuleType):
    """What wait_ready, check_fits and the pool builders use of `ray`: actors whose `ready` answers at
    a set time (None: never) or fails, `wait`/`get` that honour timeouts, `kill`, `nodes`."""

    def __init__(self, nodes=()):
        super().__init__("ray")
        self.exceptions = types.SimpleNamespace(GetTimeoutError=GetTimeoutError)
        self.killed: list = []
        self._nodes = [{"Alive": True, "Resources": dict(n)} for n in nodes]
        self.created: list = []

    def nodes(self):
        return self._nodes

    def kill(self, actor):
        self.killed.append(actor)

    def wait(self, refs, num_returns=1, timeout=None):
        end = time.monotonic() + (timeout if timeout is not None else 1e9)
        while True:
            done = [r for r in refs if r.done()]
            if len(done) >= num_returns or time.monotonic() >= end:
                return done, [r for r in refs if r not in done]
            time.sleep(0.01)

    def get(self, refs, timeout=None):
        refs = list(refs)
        done, pending = self.wait(refs, len(refs), timeout)
        if pending:
            raise GetTimeoutError("timed out")
        return [r.value() for r in refs]

    def remote(self, cls):  # ray.remote(cls).options(**o).remote(...)
        fake = self

        class Handle:
            def options(self, **o):
                self.o = o
                return self

            def remote(self, *a, **k):
                fake.created.append(self.o)
                return FakeActor(None)

        return Handle()


class Ref:
    def __init__(self, at, error):
        self.at, self.error = at, error

    def done(self):
        return self.error is not None or (self.at is not None and time.monotonic() >= self.at)

    def value(self):
        if self.error is not None:
            raise self.error
        return {}


class FakeActor:
    def __init__(self, ready_in: float | None, error: Exception | None = None):
        at = None if ready_in is None else time.monotonic() + ready_in
        self.ready = types.SimpleNamespace(remote=lambda: Ref(at, error))


@pytest.fixture
def fake_ray(monkeypatch):
    def install(nodes=()):
        fake = FakeRay(nodes)
        monkeypatch.setitem(sys.modules, "ray", fake)
        return fake

    return install


def _signal_soon(sig, delay=0.3):
    threading.Timer(delay, os.kill, (os.getpid(), sig)).start()


# ---- every start-up wait is interruptible ----------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "ray-job-stop"])
def test_signal_during_engine_start_up_under_generations_stop_flag_ends_the_wait(fake_ray, sig):
    """Generation waits for its engines under stop_on_signals (a signal only sets a flag): before, the
    wait ignored the flag until runtime.startup_timeout_s (900-1800 s)."""
    from gen_ssd_ray.engines.actors import wait_ready

    ray = fake_ray()
    actors = [FakeActor(None), FakeActor(0.1)]
    t0 = time.monotonic()
    with stop_on_signals():
        _signal_soon(sig)
        with pytest.raises(JobInterrupted, match="the teacher engines"):
            wait_ready(actors, 5.0, "the teacher engines")
    assert time.monotonic() - t0 < 2.0
    assert ray.killed == actors  # no half-started engines left behind


def test_signal_during_engine_start_up_under_a_raising_handler(fake_ray):
    from gen_ssd_ray.engines.actors import wait_ready

    ray = fake_ray()
    actors = [FakeActor(None)]
    t0 = time.monotonic()
    with raise_on_signals():
        _signal_soon(signal.SIGINT)
        with pytest.raises(KeyboardInterrupt):
            wait_ready(actors, 5.0, "the engines")
    assert time.monotonic() - t0 < 2.0 and ray.killed == actors


@pytest.mark.parametrize(
    "actors, timeout, match",
    [
        ([FakeActor(0.05), FakeActor(0.2)], 5.0, None),
        ([FakeActor(0.05), FakeActor(None, RuntimeError("CUDA out of memory"))], 5.0, "CUDA out of memory"),
        ([FakeActor(None)], 0.3, "startup_timeout_s=0.3"),
    ],
    ids=["ready", "failed-start", "missed-deadline"],
)
def test_wait_ready_outcomes(fake_ray, actors, timeout, match):
    from gen_ssd_ray.engines.actors import wait_ready

    ray = fake_ray()
    if match is None:
        wait_ready(actors, timeout, "x")
        assert ray.killed == []
    else:
        with pytest.raises(JobFailed, match=match):
            wait_ready(actors, timeout, "x")
        assert ray.killed == actors


# ---- impossible resource requests ------------------------------------------------------------------

LAPTOP = [{"CPU": 2.0, "memory": 8 * GIB}]
GPU_NODES = [{"CPU": 16.0, "GPU": 4.0, "memory": 64 * GIB}] * 2 + [{"CPU": 8.0, "memory": 32 * GIB}]


@pytest.mark.parametrize(
    "demands, nodes, needle",
    [
        # more engines than CPUs on a laptop
        ([actor_demand("engines", 4, "teacher.num_engines", num_cpus=1)], LAPTOP, "only 2 fit"),
        # a GPU count no node has
        ([actor_demand("engines", 1, "teacher.num_gpus", num_gpus=8)], GPU_NODES, "largest node has 4 GPU"),
        # GPUs on a CPU-only cluster
        ([actor_demand("engines", 1, "teacher.num_gpus", num_gpus=1)], LAPTOP, "largest node has 0 GPU"),
        # fits in total (3 x 1.5 = 4.5 >= 4) but not node by node
        (
            [actor_demand("engines", 4, "teacher.num_gpus", num_gpus=1)],
            [{"GPU": 1.5}] * 3,
            "only 3 fit",
        ),
        # each kind fits alone, not together
        (
            [
                actor_demand("teacher engines", 2, "teacher.num_gpus", num_gpus=4),
                actor_demand("scorers", 1, "student.num_gpus", num_gpus=1),
            ],
            GPU_NODES,
            "ask for 9 GPU in all",
        ),
        # memory
        (
            [actor_demand("beam managers", 1, "runtime.manager_memory_gib", memory=100 * GIB)],
            GPU_NODES,
            "memory",
        ),
        # a custom resource no node has
        ([Demand("engines", 1, {"accelerator_type:H200": 0.001}, "teacher.accelerator")], GPU_NODES, "H200"),
        # no alive node at all
        ([actor_demand("engines", 1, "teacher.num_cpus", num_cpus=1)], [], "0 alive node"),
    ],
    ids=[
        "engines-over-cpus",
        "gpus-per-engine-over-any-node",
        "gpu-on-cpu-cluster",
        "node-by-node",
        "kinds-together",
        "memory",
        "custom-resource",
        "no-nodes",
    ],
)
def test_impossible_requests_are_named(demands, nodes, needle):
    why = unsatisfiable(demands, nodes)
    assert why is not None and needle in why, why
    keys = " ".join(d.keys for d in demands)
    assert any(k.strip() in why for k in keys.split()), why


@pytest.mark.parametrize(
    "demands, nodes",
    [
        ([actor_demand("engines", 2, "k", num_cpus=1)], LAPTOP),
        ([actor_demand("engines", 64, "k", num_cpus=0)], LAPTOP),  # sim engines ask for nothing
        ([actor_demand("engines", 8, "k", num_gpus=1)], GPU_NODES),
        (
            [actor_demand("engines", 2, "k", num_gpus=0.5), actor_demand("s", 3, "k", num_gpus=0.1)],
            [{"GPU": 1.3}],
        ),
        ([actor_demand("engines", 3, "k", num_cpus=0.1)] * 10, [{"CPU": 3.0}]),  # 3.0 exactly, in floats
    ],
    ids=["fits", "zero", "gpus", "fractions", "float-sum"],
)
def test_possible_requests_pass(demands, nodes):
    assert unsatisfiable(demands, nodes) is None


def test_check_fits_refuses_on_a_fixed_cluster_and_skips_an_autoscaling_one(fake_ray, monkeypatch):
    fake_ray(LAPTOP)
    too_many = [actor_demand("engines", 4, "teacher.num_engines / teacher.num_cpus", num_cpus=1)]
    monkeypatch.setenv("GEN_SSD_AUTOSCALING", "0")
    with pytest.raises(ResourcesError) as info:
        check_fits(too_many)
    assert isinstance(info.value, InputError) and "teacher.num_engines" in str(info.value)
    monkeypatch.setenv("GEN_SSD_AUTOSCALING", "1")
    check_fits(too_many)  # the autoscaler may add nodes: the wait is its to decide


def test_a_private_local_ray_is_fixed(monkeypatch):
    monkeypatch.delenv("GEN_SSD_AUTOSCALING", raising=False)
    monkeypatch.setattr(cluster, "_private_local", True)
    assert cluster.cluster_autoscales() is False


@pytest.mark.parametrize(
    "v2, status, autoscales",
    [
        (True, None, True),  # autoscaler v2 enabled (ray up, KubeRay v2)
        (False, None, True),  # no status yet: never refuse on a guess
        (False, b"not json", True),
        (False, b'{"load_metrics_report": {}}', False),  # a head started by ray start / ray.init
        (False, b'{"autoscaler_report": {"active_nodes": {"node_ab12": 1}}}', False),  # read-only provider
        (False, b'{"autoscaler_report": {"active_nodes": {"headgroup": 1, "gpu": 2}}}', True),  # KubeRay v1
        (False, b'{"autoscaler_report": {"active_nodes": {}, "pending_launches": {"gpu_worker": 1}}}', True),
    ],
    ids=["v2", "no-status", "junk-status", "plain-head", "readonly", "kuberay-v1", "launching"],
)
def test_autoscaling_detection(v2, status, autoscales):
    assert cluster.autoscales_from(v2, status) is autoscales


def test_generation_refuses_before_creating_any_actor(fake_ray, monkeypatch):
    """Teacher engines, scorers and beam managers are checked together, before any actor exists."""
    from gen_ssd_ray.common.config import load_config
    from gen_ssd_ray.generate.config import GenerateConfig
    from gen_ssd_ray.generate.pools import build_pools

    ray = fake_ray(LAPTOP)
    monkeypatch.setenv("GEN_SSD_AUTOSCALING", "0")
    cases = {
        "teacher.num_engines": ["teacher.num_engines=3", "teacher.num_cpus=1"],
        "student.num_scorers": ["student.num_scorers=3", "student.num_cpus=1"],
        "runtime.num_beam_managers": ["runtime.num_beam_managers=3", "runtime.manager_num_cpus=1"],
        "teacher.num_gpus": ["teacher.num_gpus=1"],
    }
    for key, overrides in cases.items():
        cfg = load_config(None, overrides, GenerateConfig)
        with pytest.raises(ResourcesError, match=key.replace(".", r"\.")):
            build_pools(cfg, "/t", "/s")
    assert ray.created == []


# ---- the real job, in a subprocess -----------------------------------------------------------------


def _sim_job(tmp_path: Path, *extra: str) -> list[str]:
    from tests.test_job_e2e import write_problems

    data = write_problems(tmp_path / "p.jsonl", 2, bad=False)
    return [
        sys.executable,
        "-m",
        "jobs.generate",
        "--config",
        str(ROOT / "conf" / "sim_cluster.yaml"),
        f"data.path={data}",
        f"output.dir={tmp_path / 'out'}",
        "teacher.num_engines=1",
        "student.num_scorers=1",
        "runtime.num_beam_managers=1",
        "runtime.local_num_cpus=2",
        *extra,
    ]


def _env() -> dict[str, str]:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "RAY_AUTH_MODE": "disabled",
        "TOKENIZERS_PARALLELISM": "false",
    }
    env.pop("RAY_ADDRESS", None)
    env.pop("GEN_SSD_AUTOSCALING", None)
    return env


@pytest.mark.integration
def test_more_engines_than_cpus_is_refused_in_seconds(tmp_path):
    """Before: the job waited runtime.startup_timeout_s and failed with exit 1 (here 120 s)."""
    t0 = time.monotonic()
    r = subprocess.run(
        _sim_job(tmp_path, "teacher.num_engines=4", "teacher.num_cpus=1", "runtime.startup_timeout_s=120"),
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    elapsed = time.monotonic() - t0
    assert r.returncode == 2, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the job's actors can never start") and "teacher.num_engines" in last, last
    assert "Traceback" not in r.stderr
    assert elapsed < 60, elapsed
    print(f"refused in {elapsed:.1f} s (whole job, Ray start-up included)")


@pytest.mark.integration
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "ray-job-stop"])
def test_signal_during_engine_start_up_exits_130_at_once(tmp_path, sig):
    """Simulated engines that take 120 s to load; the signal arrives while the job waits for them."""
    p = subprocess.Popen(
        _sim_job(tmp_path, "sim.profile=h100", "sim.model_load=true"),
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert p.stderr is not None
        lines = []
        deadline = time.monotonic() + 240
        for line in p.stderr:
            lines.append(line)
            if "waiting for the teacher engines" in line:
                break
            assert time.monotonic() < deadline, "".join(lines)[-3000:]
        time.sleep(2.0)  # inside the wait
        t0 = time.monotonic()
        p.send_signal(sig)
        code = p.wait(timeout=60)
        elapsed = time.monotonic() - t0
        rest = p.stderr.read()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert code == 130, ("".join(lines) + rest)[-3000:]
    assert "interrupted" in rest and "Traceback" not in rest, rest[-3000:]
    assert elapsed < 20, elapsed
    print(f"exit 130 {elapsed:.1f} s after the signal")


def test_finetune_refuses_workers_the_cluster_cannot_place_before_writing(
    fake_ray, monkeypatch, chat_models, one_problem, tmp_path
):
    """More training workers than fit: refused (exit 2, the keys named) before Ray Train starts and
    before anything but the folder's lock is written."""
    import gen_ssd_ray.train.run as train_run
    from gen_ssd_ray.common.config import derive
    from gen_ssd_ray.train.config import FinetuneConfig

    fake_ray(LAPTOP)
    monkeypatch.setenv("GEN_SSD_AUTOSCALING", "0")
    monkeypatch.setattr(train_run, "init_ray", lambda *a, **k: None)
    monkeypatch.setattr(train_run, "launch", lambda *a, **k: pytest.fail("workers started"))
    out = tmp_path / "ft"
    cfg = derive(
        FinetuneConfig(),
        {
            "model.path": str(chat_models["good"]),
            "data.path": str(one_problem),
            "data.response_field": "answer",
            "data.filters": [],
            "output.dir": str(out),
            "runtime.num_workers": 4,
            "runtime.cpus_per_worker": 1,
        },
    )
    with pytest.raises(ResourcesError, match=r"runtime\.num_workers"):
        train_run.run_finetune(cfg)
    assert sorted(p.name for p in out.iterdir()) == ["_lock"]
