"""The shared job layer: frozen configs and `derive`, the failure model and `run_job`'s exit codes, the
SIGINT/SIGTERM policy, the engine registry and protocols."""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import signal
from dataclasses import dataclass, field

import pytest

from gen_ssd_ray.common.cli import Job, run_job
from gen_ssd_ray.common.config import ConfigError, derive, load_config
from gen_ssd_ray.common.errors import InputError, JobFailed, JobInterrupted
from gen_ssd_ray.common.interrupts import raise_on_signals, stop_on_signals
from gen_ssd_ray.generate.config import GenerateConfig

# ---- configs ---------------------------------------------------------------------------------------


def test_loaded_configs_are_frozen_and_derive_copies():
    cfg = load_config(None, [], GenerateConfig)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.teacher.model = "x"  # type: ignore[misc]
    new = derive(cfg, {"teacher.model": "/m", "output.dir": "/o", "method": "standard_kd"})
    assert (new.teacher.model, new.output.dir, new.method) == ("/m", "/o", "standard_kd")
    assert (cfg.teacher.model, cfg.output.dir, cfg.method) == (
        "embedded:teacher",
        "outputs/generate",
        "gen_ssd",
    )
    assert new.student is cfg.student  # untouched sections are shared, not copied
    with pytest.raises(ConfigError, match="teacher.nope"):
        derive(cfg, {"teacher.nope": 1})


def test_every_job_config_is_frozen():
    from gen_ssd_ray.evaluate.config import EvaluateConfig
    from gen_ssd_ray.pipeline.config import PipelineConfig
    from gen_ssd_ray.train.config import FinetuneConfig

    for schema in (GenerateConfig, EvaluateConfig, FinetuneConfig, PipelineConfig):
        hints = {f.name: f for f in dataclasses.fields(schema)}
        cfg = schema()
        assert schema.__dataclass_params__.frozen, schema
        for name in hints:
            value = getattr(cfg, name)
            if dataclasses.is_dataclass(value):
                assert type(value).__dataclass_params__.frozen, f"{schema.__name__}.{name}"


def test_one_engine_section_and_one_runtime_section():
    from gen_ssd_ray.common.config import EngineConfig, EngineJobRuntimeConfig, RayConfig
    from gen_ssd_ray.evaluate.config import EvaluateConfig
    from gen_ssd_ray.pipeline.config import PipelineConfig
    from gen_ssd_ray.train.config import FinetuneConfig

    assert isinstance(GenerateConfig().teacher, EngineConfig)
    assert isinstance(EvaluateConfig().model, EngineConfig)
    for runtime in (GenerateConfig().runtime, EvaluateConfig().runtime):
        assert isinstance(runtime, EngineJobRuntimeConfig)
    for runtime in (FinetuneConfig().runtime, PipelineConfig().runtime):
        assert isinstance(runtime, RayConfig)


def test_unknown_key_names_the_jobs_own_preset():
    from gen_ssd_ray.evaluate.config import EvaluateConfig

    with pytest.raises(ConfigError, match=r"conf/evaluate\.yaml"):
        load_config(None, ["model.nope=1"], EvaluateConfig)
    with pytest.raises(ConfigError, match=r"conf/default\.yaml"):
        load_config(None, ["teacher.nope=1"], GenerateConfig)


# ---- run_job ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tiny:
    PRESET = "conf/tiny.yaml"
    x: int = 1
    tags: list[str] = field(default_factory=list)

    def validate(self) -> None:
        if self.x < 0:
            raise ConfigError("x: must be >= 0")


def tiny_job(prepare=lambda cfg: "ready", run=None) -> Job:
    return Job(
        name="tiny",
        schema=Tiny,
        prepare=prepare,
        run=run or (lambda cfg, p: {"x": cfg.x, "prepared": p}),
        format_summary=lambda s: f"summary x={s['x']}",
    )


def raise_(exc):
    def f(*_):
        raise exc

    return f


@pytest.mark.parametrize(
    "job, argv, code",
    [
        (tiny_job(), ["x=3"], 0),
        (tiny_job(), ["x=-1"], 2),  # bad config
        (tiny_job(), ["nope=1"], 2),  # unknown key
        (tiny_job(prepare=raise_(InputError("data.path: no such file"))), [], 2),
        (tiny_job(prepare=raise_(OSError("disk"))), [], 2),
        (tiny_job(run=raise_(InputError("stage x: bad data"))), [], 2),
        (tiny_job(run=raise_(JobFailed("engines died; re-run", {"x": 7, "prepared": None}))), [], 1),
        (tiny_job(run=raise_(JobInterrupted("stopped", {"x": 8, "prepared": None}))), [], 130),
        (tiny_job(run=raise_(KeyboardInterrupt())), [], 130),
    ],
    ids=[
        "ok",
        "bad-value",
        "unknown-key",
        "bad-input",
        "os-error",
        "late-input",
        "failed",
        "interrupted",
        "ctrl-c",
    ],
)
def test_run_job_exit_codes(job, argv, code, capsys):
    assert run_job(job, "A tiny job.", argv) == code
    out, err = capsys.readouterr()
    if code == 0:
        assert out.splitlines()[-1] == json.dumps({"x": 3, "prepared": "ready"})
    else:
        assert err.startswith(("error: ", "interrupted: "))
    if code in (1, 130) and "x=" in out:  # a summary carried by the failure is printed first
        assert json.loads(out.splitlines()[-1])["x"] in (7, 8)


def _disk(err: int = 28, file: str | None = "/out/part-00003.parquet") -> OSError:
    return OSError(err, os.strerror(err), file) if file else OSError(err, os.strerror(err))


def _wrapped(inner: BaseException, outer: BaseException, *, hide: bool = False) -> BaseException:
    """`outer` raised while handling `inner` (`raise outer from inner`, or `from None` with hide)."""
    try:
        try:
            raise inner
        except BaseException:
            if hide:
                raise outer from None
            raise outer from inner
    except BaseException as e:
        return e


class RayTaskErrorLike(RuntimeError):
    """What a Ray worker's failure looks like to the driver: the cause only as text (or as `.cause`)."""

    def __init__(self, text: str, cause: BaseException | None = None):
        super().__init__(text)
        self.cause = cause


def _locked():
    from pathlib import Path

    from gen_ssd_ray.common.joblock import FolderLockedError

    return FolderLockedError(
        "job folder /o is in use by job x (lock file /o/_lock): use another output.dir",
        Path("/o/_lock"),
        None,
    )


# A full disk or quota anywhere in a job (prepare or run, bare or wrapped): exit 1, one line naming the
# file if known and "free space". A folder another job holds: exit 2, one line.
DISK_AND_LOCK_CASES = {
    "enospc-in-prepare": ("prepare", lambda: _disk(), 1, "/out/part-00003.parquet"),
    "edquot-in-prepare": ("prepare", lambda: _disk(122, "/out/_manifest.log"), 1, "/out/_manifest.log"),
    "enospc-in-run": ("run", lambda: _disk(), 1, "/out/part-00003.parquet"),
    "edquot-in-run-no-file": ("run", lambda: _disk(122, None), 1, "Disk quota exceeded"),
    "enospc-behind-jobfailed": (
        "run",
        lambda: _wrapped(_disk(), JobFailed("stage x: failed", {"x": 7, "prepared": None})),
        1,
        "part-00003",
    ),
    "enospc-behind-input-error-from-none": (
        "run",
        lambda: _wrapped(_disk(), InputError("stage y: bad"), hide=True),
        1,
        "part-00003",
    ),
    "enospc-as-ray-cause": ("run", lambda: RayTaskErrorLike("worker died", _disk()), 1, "part-00003"),
    "enospc-only-as-text": (
        "run",
        lambda: RayTaskErrorLike(
            "ray::Trainer.fit()\nOSError: [Errno 28] No space left on device: '/ck/step-4/model.pt'"
        ),
        1,
        "/ck/step-4/model.pt",
    ),
    "pyarrow-style-text": (
        "run",
        lambda: OSError("Error writing bytes to file. Detail: [errno 28] No space left on device"),
        1,
        "No space left",
    ),
    "enospc-in-exception-group": (
        "run",
        lambda: ExceptionGroup("workers", [ValueError("x"), _disk()]),
        1,
        "part-00003",
    ),
    "locked-in-prepare": ("prepare", _locked, 2, "is in use by job x"),
    "locked-in-run": ("run", _locked, 2, "is in use by job x"),
    "locked-behind-runtime-error": (
        "run",
        lambda: _wrapped(_locked(), RuntimeError("stage z")),
        2,
        "is in use by job x",
    ),
}


@pytest.mark.parametrize("case", list(DISK_AND_LOCK_CASES), ids=list(DISK_AND_LOCK_CASES))
def test_full_disk_and_locked_folder_end_in_one_line(case, capsys):
    where, make, code, needle = DISK_AND_LOCK_CASES[case]
    job = tiny_job(prepare=raise_(make())) if where == "prepare" else tiny_job(run=raise_(make()))
    assert run_job(job, "A tiny job.", []) == code
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("error: ") and needle in err, err
    if code == 1:
        assert "disk full" in err and "free space" in err


def test_unexpected_errors_are_not_disguised():
    with pytest.raises(ZeroDivisionError):
        run_job(tiny_job(run=raise_(ZeroDivisionError())), "A tiny job.", [])


# ---- signals ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signals_set_the_stop_flag_in_a_work_loop_and_raise_elsewhere(sig):
    before = signal.getsignal(signal.SIGTERM)
    with raise_on_signals():
        with stop_on_signals() as stop:
            os.kill(os.getpid(), sig)
            assert stop.wait(5)  # a flag, no exception
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), sig)
    assert signal.getsignal(signal.SIGTERM) == before


# A job whose `prepare` or `run` takes long; it says when it got there.
SLOW_JOB = """
import sys, time
from dataclasses import dataclass
from gen_ssd_ray.common.cli import Job, run_job

@dataclass(frozen=True)
class Cfg:
    PRESET = "conf/none.yaml"
    def validate(self): pass

def slow(phase):
    def f(*_):
        if phase == sys.argv[1]:
            print("in " + phase, flush=True)
            time.sleep(60)
        return {}
    return f

sys.exit(run_job(Job("slow", Cfg, slow("prepare"), slow("run"), str), "slow", []))
"""


@pytest.mark.parametrize("phase", ["prepare", "run"])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "ray-job-stop"])
def test_a_signal_in_any_phase_exits_130(phase, sig):
    """Before, a signal during `prepare` (reading a large data set, building a model) gave a
    KeyboardInterrupt traceback (exit 1) or, for SIGTERM, a kill by signal (exit -15)."""
    import subprocess
    import sys
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    p = subprocess.Popen(
        [sys.executable, "-c", SLOW_JOB, phase],
        cwd=root,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == f"in {phase}"
        t0 = time.monotonic()
        p.send_signal(sig)
        code = p.wait(timeout=30)
        assert time.monotonic() - t0 < 10
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    err = p.stderr.read() if p.stderr else ""
    assert code == 130, err[-2000:]
    assert "interrupted" in err and "Traceback" not in err, err[-2000:]


def test_sigterm_while_ray_starts_is_an_interrupt(monkeypatch):
    """ray.init installs a SIGTERM handler that calls sys.exit(15) while it runs; a SIGTERM landing then
    is the job's interrupt (exit 130), not exit 15."""
    import sys
    import types

    from gen_ssd_ray.common import cluster

    def init(**_):
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))  # what ray.init does
        os.kill(os.getpid(), signal.SIGTERM)

    fake = types.SimpleNamespace(is_initialized=lambda: False, init=init)
    monkeypatch.setitem(sys.modules, "ray", fake)
    with raise_on_signals():
        with pytest.raises(KeyboardInterrupt):
            cluster.init_ray(None, 1)
        assert signal.getsignal(signal.SIGTERM) is signal.default_int_handler


# ---- engines ---------------------------------------------------------------------------------------


def test_registry_lists_backends_and_refuses_unknown_names():
    from gen_ssd_ray.common.config import EngineConfig
    from gen_ssd_ray.engines.registry import SCORER_BACKENDS, TEACHER_BACKENDS, build_teacher

    assert set(TEACHER_BACKENDS) == {"vllm", "sim"} and set(SCORER_BACKENDS) == {"hf", "vllm", "sim"}
    with pytest.raises(ValueError, match=r"registered: \['sim', 'vllm'\]"):
        build_teacher(EngineConfig(backend="onnx"))
    with pytest.raises(ConfigError, match="teacher.backend"):
        load_config(None, ["teacher.backend=onnx"], GenerateConfig)
    with pytest.raises(ConfigError, match="student.backend"):
        load_config(None, ["student.backend=onnx"], GenerateConfig)


@pytest.mark.parametrize(
    "kind, name",
    [("teacher", "vllm"), ("scorer", "hf"), ("scorer", "vllm"), ("teacher", "sim"), ("scorer", "sim")],
    ids=["vllm", "hf", "vllm-scorer", "sim", "sim-scorer"],
)
def test_every_registered_backend_satisfies_its_protocol(kind, name):
    import importlib

    from gen_ssd_ray.engines import base, registry

    table = registry.TEACHER_BACKENDS if kind == "teacher" else registry.SCORER_BACKENDS
    module, _, attr = table[name].partition(":")
    cls = getattr(importlib.import_module(module), attr)
    protocol = base.TeacherBackend if kind == "teacher" else base.ScorerBackend
    for method, fn in inspect.getmembers(protocol, inspect.isfunction):
        if method.startswith("_"):
            continue
        impl = getattr(cls, method, None)
        assert impl is not None, f"{cls.__name__}.{method} is missing"
        assert inspect.iscoroutinefunction(impl) == inspect.iscoroutinefunction(fn), (
            f"{cls.__name__}.{method}"
        )


def test_actors_hold_no_backend_branches():
    from gen_ssd_ray.engines import actors

    source = inspect.getsource(actors)
    for backend in ("vllm", "hf", "VllmTeacher", "HfScorer"):
        for needle in (f'== "{backend}"', f"'{backend}'", f"import {backend}"):
            assert needle not in source


@pytest.mark.integration
def test_init_ray_keeps_the_jobs_sigterm_policy():
    """ray.init installs its own SIGTERM handler (sys.exit(15)); a job's handler survives it, so a
    preempted job still exits 130."""
    import ray

    from gen_ssd_ray.common.cluster import init_ray

    try:
        with raise_on_signals():
            init_ray(None, 1)
            assert signal.getsignal(signal.SIGTERM) is signal.default_int_handler
    finally:
        ray.shutdown()


def test_pipeline_bad_output_folder_is_bad_input(tmp_path, capsys):
    from jobs.pipeline import main

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main([f"output_dir={blocker / 'pipe'}"]) == 2
    assert capsys.readouterr().err.startswith("error: ")
