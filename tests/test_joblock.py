"""One writer per job folder (gen_ssd_ray.common.joblock), compatible with generation's ShardWriter;
bounded lock waits (the model-cache build lock); the pipeline refuses a folder another job holds."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from gen_ssd_ray.common import models
from gen_ssd_ray.common.errors import InputError
from gen_ssd_ray.common.joblock import (
    LOCK_NAME,
    FolderLock,
    FolderLockedError,
    LockTimeoutError,
    hold_job_folder,
    hold_lock,
    read_holder,
)

ROOT = Path(__file__).resolve().parents[1]

# A process that holds a folder's lock until killed; prints "held" once it has it.
HOLDER = (
    "import sys, time\n"
    "from gen_ssd_ray.common.joblock import hold_job_folder\n"
    "with hold_job_folder(sys.argv[1], 'finetune'):\n"
    "    print('held', flush=True)\n"
    "    time.sleep(600)\n"
)


def start_holder(folder: Path) -> subprocess.Popen:
    p = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(folder)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    assert p.stdout is not None and p.stdout.readline().strip() == "held"
    return p


def test_second_job_on_a_folder_is_refused_naming_folder_holder_and_fix(tmp_path):
    folder = tmp_path / "run"
    with hold_job_folder(folder, "pipeline", key="output_dir"):
        holder = read_holder(folder / LOCK_NAME)
        assert holder is not None
        assert (holder["job"], holder["pid"], holder["host"]) == (
            "pipeline",
            os.getpid(),
            socket.gethostname(),
        )
        with pytest.raises(FolderLockedError) as info:
            with hold_job_folder(folder, "evaluate"):
                pytest.fail("entered a folder another job holds")
        msg = str(info.value)
        assert isinstance(info.value, InputError)  # exit 2
        assert "\n" not in msg
        for part in (str(folder), "job pipeline", f"pid {os.getpid()}", "output.dir", "wait for that job"):
            assert part in msg, (part, msg)
    assert read_holder(folder / LOCK_NAME) is None  # cleared on release
    with hold_job_folder(folder, "evaluate"):  # free again
        pass


def test_a_lock_taken_in_prepare_is_released_by_run(tmp_path):
    from gen_ssd_ray.common.joblock import lock_job_folder

    folder = tmp_path / "new" / "run"  # created
    lock = lock_job_folder(folder, "evaluate")
    assert lock.held and read_holder(folder / LOCK_NAME)["job"] == "evaluate"
    with pytest.raises(FolderLockedError, match="another output.dir"):
        lock_job_folder(folder, "evaluate")
    lock.release()
    lock.release()  # idempotent
    assert not lock.held
    lock_job_folder(folder, "evaluate").release()


def test_another_process_holds_the_folder_until_it_dies(tmp_path):
    folder = tmp_path / "run"
    p = start_holder(folder)
    try:
        with pytest.raises(FolderLockedError, match=rf"job finetune \(pid {p.pid}"):
            with hold_job_folder(folder, "finetune"):
                pass
    finally:
        p.send_signal(signal.SIGKILL)  # no cleanup at all: the kernel frees the flock
        p.wait(timeout=30)
    with hold_job_folder(folder, "finetune"):  # a dead holder leaves no stale lock
        assert read_holder(folder / LOCK_NAME)["pid"] == os.getpid()


def test_job_folder_lock_and_generation_writer_exclude_each_other(tmp_path):
    from gen_ssd_ray.generate.output import OutputLockedError, ShardWriter

    folder = tmp_path / "gen"
    with ShardWriter(folder, fingerprint="f", config_yaml="x: 1\n", shard_size=1):
        with pytest.raises(FolderLockedError, match="in use by job generate"):
            with hold_job_folder(folder, "pipeline"):
                pass
    with hold_job_folder(folder, "pipeline"):
        with pytest.raises(OutputLockedError):
            ShardWriter(folder, fingerprint="f", config_yaml="x: 1\n", shard_size=1)


@pytest.mark.parametrize("content", [b"", b"not json", b"[1, 2]", b"\xff\xfe", b'{"job": "x"'])
def test_junk_in_a_free_lock_file_is_overwritten(tmp_path, content):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / LOCK_NAME).write_bytes(content)
    assert read_holder(folder / LOCK_NAME) is None
    with hold_job_folder(folder, "evaluate"):
        assert read_holder(folder / LOCK_NAME)["job"] == "evaluate"


def test_bounded_wait_times_out_naming_the_lock_file_and_holder(tmp_path):
    path = tmp_path / ".m.lock"
    with FolderLock(path, "materialize m").acquire():
        t0 = time.monotonic()
        with pytest.raises(LockTimeoutError) as info:
            with hold_lock(path, "materialize m", wait_s=0.5, what="the build lock of m", fix="stop it"):
                pass
        assert 0.4 < time.monotonic() - t0 < 5
    msg = str(info.value)
    assert str(path) in msg and "after 0.5 s" in msg and "job materialize m" in msg and "stop it" in msg


@pytest.mark.parametrize("stop_flag", [False, True], ids=["raising-handler", "stop-flag"])
def test_a_signal_ends_a_lock_wait(tmp_path, stop_flag):
    from gen_ssd_ray.common.errors import JobInterrupted
    from gen_ssd_ray.common.interrupts import raise_on_signals, stop_on_signals

    path = tmp_path / ".m.lock"
    with FolderLock(path, "a").acquire():
        threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM)).start()
        t0 = time.monotonic()
        with raise_on_signals():
            if stop_flag:
                with stop_on_signals(), pytest.raises(JobInterrupted, match="lock"):
                    with hold_lock(path, "b", wait_s=30):
                        pass
            else:
                with pytest.raises(KeyboardInterrupt):
                    with hold_lock(path, "b", wait_s=30):
                        pass
        assert time.monotonic() - t0 < 5


def test_bounded_wait_gets_the_lock_when_it_is_freed(tmp_path):
    path = tmp_path / ".m.lock"
    lock = FolderLock(path, "a").acquire()
    threading.Timer(0.3, lock.release).start()
    with hold_lock(path, "b", wait_s=10):
        assert read_holder(path)["job"] == "b"


def test_materialize_lock_wait_is_bounded(tmp_path, monkeypatch):
    """A builder that hangs holding the model-cache lock: the others fail with a clear error instead of
    waiting forever (before: fcntl.flock(LOCK_EX) blocked with no bound)."""
    dest = tmp_path / "models" / "m"
    dest.parent.mkdir(parents=True)
    code = (
        "import sys, time, pathlib\n"
        "from gen_ssd_ray.common import models\n"
        "def build(tmp):\n"
        "    print('building', flush=True)\n"
        "    time.sleep(600)\n"
        "models.materialize(pathlib.Path(sys.argv[1]), {'v': 1}, build)\n"
    )
    hung = subprocess.Popen(
        [sys.executable, "-c", code, str(dest)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert hung.stdout is not None and hung.stdout.readline().strip() == "building"
        monkeypatch.setenv("GEN_SSD_LOCK_WAIT_S", "1")
        result: list = []

        def other() -> None:
            try:
                models.materialize(dest, {"v": 1}, lambda tmp: (tmp / "config.json").write_text("{}"))
                result.append("built")
            except BaseException as e:  # noqa: BLE001 - the test inspects it
                result.append(e)

        t = threading.Thread(target=other, daemon=True)
        t.start()
        t.join(timeout=20)
        assert not t.is_alive(), "materialize waited for the lock without bound"
        (err,) = result
        assert isinstance(err, LockTimeoutError) and isinstance(err, InputError)
        msg = str(err)
        assert str(dest.parent / ".m.lock") in msg and f"pid {hung.pid}" in msg
        assert "GEN_SSD_LOCK_WAIT_S" in msg and str(dest) in msg
    finally:
        hung.kill()
        hung.wait(timeout=30)


@pytest.mark.parametrize("value", ["soon", "-1", "nan"])
def test_bad_lock_wait_setting_is_refused(monkeypatch, tmp_path, value):
    monkeypatch.setenv("GEN_SSD_LOCK_WAIT_S", value)
    with pytest.raises(InputError, match="GEN_SSD_LOCK_WAIT_S"):
        with hold_lock(tmp_path / "l", "x"):
            pass


# ---- the pipeline job ------------------------------------------------------------------------------


def _no_ray(*_a, **_k):
    raise AssertionError("the pipeline started Ray on a folder another job holds")


def test_pipeline_on_a_held_folder_exits_2_before_starting(tmp_path, capsys, monkeypatch):
    from jobs.pipeline import main

    monkeypatch.setattr("gen_ssd_ray.common.cluster.init_ray", _no_ray)
    out = tmp_path / "pipe"
    p = start_holder(out)
    try:
        assert main([f"output_dir={out}"]) == 2
    finally:
        p.kill()
        p.wait(timeout=30)
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: job folder") and str(out) in err and "job finetune" in err
    assert "output_dir" in err
    assert not (out / "pipeline.json").exists()


def test_pipeline_holds_its_folder_while_it_runs(tmp_path, monkeypatch):
    """While a pipeline runs, the folder is held with the pipeline as holder, and freed after."""
    from gen_ssd_ray.pipeline import run as pipeline_run
    from gen_ssd_ray.pipeline.config import PipelineConfig

    monkeypatch.setattr("gen_ssd_ray.common.cluster.init_ray", _no_ray)
    out = tmp_path / "pipe"
    seen = {}

    def fake_run(self):
        seen["holder"] = read_holder(out / LOCK_NAME)
        with pytest.raises(FolderLockedError):
            with hold_job_folder(out, "pipeline"):
                pass
        return {"ok": True}

    monkeypatch.setattr(pipeline_run.Pipeline, "_run", fake_run, raising=False)
    assert pipeline_run.Pipeline(PipelineConfig(output_dir=str(out))).run() == {"ok": True}
    assert seen["holder"]["job"] == "pipeline"
    assert seen["holder"]["pid"] == os.getpid()
    with hold_job_folder(out, "pipeline"):
        pass
