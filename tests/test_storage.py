"""gen_ssd_ray.common.storage and the object-store lease of gen_ssd_ray.common.joblock.

The same contract is run on a local folder (unit tier) and on a real S3 API (the moto server of
tests/s3server.py, integration tier): exclusive create, conditional replace, sorted recursive listing,
an all-or-nothing writer, folder upload/download. Then the location checks (refusals name the key),
and the lease: refused while its holder renews it, taken over after its ttl once the holder is gone,
and a holder whose lease was taken over finds out (`check` raises LeaseLostError).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from gen_ssd_ray.common.storage import Storage, StorageError, check_local, check_location, is_remote


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.integration)])
def folder(request, tmp_path) -> Storage:
    if request.param == "local":
        return Storage(str(tmp_path / "store"))
    bucket = request.getfixturevalue("s3_bucket")
    return Storage(f"{bucket}/prefix/run")


def test_write_read_stat_list_delete(folder):
    assert folder.list() == [] and not folder.exists("a.json") and folder.stat("a.json") is None
    folder.write_json("a.json", {"x": 1})
    folder.write_bytes("sub/b.bin", b"\x00" * 10)
    folder.write_text("sub/deeper/c.txt", "hé")
    assert json.loads(folder.read_text("a.json")) == {"x": 1}
    assert folder.read_text("sub/deeper/c.txt") == "hé"
    assert folder.list() == ["a.json", "sub/b.bin", "sub/deeper/c.txt"]
    assert folder.list("sub") == ["sub/b.bin", "sub/deeper/c.txt"]
    assert folder.list("nothing") == []
    assert folder.stat("sub/b.bin").size == 10
    with pytest.raises(FileNotFoundError):
        folder.read_bytes("missing")
    folder.delete("a.json")
    folder.delete("a.json")  # absent: nothing
    folder.delete_tree("sub")
    assert folder.list() == []
    assert folder.child("sub").uri == folder.uri_of("sub")


def test_create_is_exclusive_and_replace_is_conditional(folder):
    assert folder.create_bytes("lease", b"first") is True
    assert folder.create_bytes("lease", b"second") is False
    assert folder.read_bytes("lease") == b"first"
    token = folder.stat("lease").token
    time.sleep(0.01)  # a local mtime_ns token must be able to change
    assert folder.replace_bytes("lease", b"mine", token) is True
    assert folder.read_bytes("lease") == b"mine"
    assert folder.replace_bytes("lease", b"stale", token) is False  # the version moved on
    assert folder.read_bytes("lease") == b"mine"
    assert folder.replace_bytes("absent", b"x", token) is False
    assert not folder.exists("absent")


def test_writer_is_all_or_nothing(folder):
    with folder.writer("out.bin") as fh:
        fh.write(b"complete")
    with pytest.raises(RuntimeError), folder.writer("out.bin") as fh:
        fh.write(b"half")
        raise RuntimeError("the writer dies")
    assert folder.read_bytes("out.bin") == b"complete"
    with pytest.raises(RuntimeError), folder.writer("never.bin") as fh:
        fh.write(b"x")
        raise RuntimeError
    assert not folder.exists("never.bin")
    assert folder.list() == ["out.bin"]  # no temporary left behind


def test_upload_and_download_dir(folder, tmp_path):
    src = tmp_path / "src"
    (src / "nested").mkdir(parents=True)
    (src / "config.json").write_text("{}")
    (src / "nested" / "w.bin").write_bytes(bytes(range(256)) * 100)
    names = folder.upload_dir(src, "model")
    assert names == ["model/config.json", "model/nested/w.bin"]
    dest = tmp_path / "dest"
    assert sorted(folder.download_dir("model", dest)) == ["config.json", "nested/w.bin"]
    assert (dest / "nested" / "w.bin").read_bytes() == (src / "nested" / "w.bin").read_bytes()
    single = tmp_path / "single.json"
    folder.download_file("model/config.json", single)
    assert single.read_text() == "{}"
    with folder.open_input("model/nested/w.bin") as fh:
        fh.seek(256)
        assert fh.read(3) == bytes([0, 1, 2])


def test_arrow_filesystem_reads_parquet(folder, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    with folder.writer("t.parquet") as fh:
        pq.write_table(pa.table({"a": [1, 2, 3]}), fh)
    fs, root = folder.arrow()
    assert pq.read_table(f"{root}/t.parquet", filesystem=fs).column("a").to_pylist() == [1, 2, 3]


@pytest.mark.parametrize(
    "value, says",
    [
        ("s3:/bucket/x", "slash missing"),
        ("nosuch://bucket/x", "unknown storage scheme"),
        ("https://example.com/x", "cannot hold a job's files"),
        ("s3://", "no bucket"),
        ("", "not a path or URI"),
    ],
)
def test_check_location_refusals_name_the_key(value, says):
    with pytest.raises(StorageError, match=says) as e:
        check_location(value, "output.dir")
    assert "output.dir" in str(e.value)


def test_check_location_accepts_and_normalizes():
    assert check_location("s3://bucket/prefix/", "k") == "s3://bucket/prefix"
    assert check_location("file:///tmp/x", "k") == "/tmp/x"
    assert check_location("relative/dir", "k") == "relative/dir"
    assert is_remote("s3://b/x") and not is_remote("/tmp/x") and not is_remote("file:///x")
    with pytest.raises(StorageError, match="must be a local path"):
        check_local("s3://b/cache", "runtime.cache", "the cache")


# ---- the object-store lease -----------------------------------------------------------------------


@pytest.mark.integration
def test_lease_refused_while_renewed_taken_over_after_ttl_and_loss_detected(s3_bucket, monkeypatch):
    from gen_ssd_ray.common.joblock import (
        FolderLockedError,
        LeaseLostError,
        ObjectLease,
        lock_job_folder,
    )

    monkeypatch.setenv("GEN_SSD_LEASE_TTL_S", "2")
    uri = f"{s3_bucket}/job"
    holder = lock_job_folder(uri, "first")
    assert isinstance(holder, ObjectLease) and holder.held
    holder.check()
    # A second job watches the lease for a ttl; the holder renews it meanwhile: refused.
    start = time.monotonic()
    with pytest.raises(FolderLockedError, match="renewed while this job watched it"):
        lock_job_folder(uri, "second")
    assert time.monotonic() - start < 2 * 2 + 2
    holder.check()  # still held

    # The holder is gone without releasing (its renewals stop): taken over after its ttl.
    holder._stop.set()
    holder._thread.join()
    start = time.monotonic()
    taker = lock_job_folder(uri, "taker")
    waited = time.monotonic() - start
    assert 2 <= waited < 2 * 3, waited
    assert json.loads(Storage(uri).read_text("_lock"))["job"] == "taker"
    # The old holder finds out before it writes anything else.
    with pytest.raises(LeaseLostError):
        holder.check()
    taker.check()
    taker.release()
    assert not Storage(uri).exists("_lock")
    holder._token = None  # nothing of it left to release


@pytest.mark.parametrize("store", ["memory", pytest.param("s3", marks=pytest.mark.integration)])
def test_lease_stale_by_the_store_clock_is_taken_over_without_waiting(store, request, monkeypatch):
    """A resubmitted job whose predecessor died more than a ttl ago (by the store's clock) takes the
    lease over at once: no watching, so a resume costs no ttl. A live holder is still refused."""
    import uuid

    from gen_ssd_ray.common import joblock
    from gen_ssd_ray.common.joblock import FolderLockedError, LeaseLostError, lock_job_folder

    monkeypatch.setenv("GEN_SSD_LEASE_TTL_S", "2")
    if store == "memory":
        uri = f"memory://lease-{uuid.uuid4().hex[:10]}/job"
    else:
        uri = f"{request.getfixturevalue('s3_bucket')}/job"
    holder = lock_job_folder(uri, "first")
    with pytest.raises(FolderLockedError, match="renewed while this job watched it"):
        lock_job_folder(uri, "second")  # alive: it renews every ttl/4
    holder._stop.set()  # the holder dies without releasing
    holder._thread.join()
    time.sleep(2 + joblock._CLOCK_MARGIN_S + 0.5)  # past its ttl (and the margin), on every clock

    def no_watching(seconds):
        raise AssertionError(f"the job watched a lease the store shows stale (slept {seconds} s)")

    monkeypatch.setattr(joblock.time, "sleep", no_watching)
    taker = lock_job_folder(uri, "taker")
    assert json.loads(Storage(uri).read_text("_lock"))["job"] == "taker"
    assert Storage(uri).list() == ["_lock"]  # the clock probe is gone
    with pytest.raises(LeaseLostError):
        holder.check()
    taker.release()
    holder._token = None


def test_lease_of_a_dead_process_of_this_machine_is_taken_over_without_waiting(monkeypatch):
    """A lease whose holder line names a process of this machine (boot id, pid namespace) that no
    longer runs is taken over at once; one naming a live process, or another machine, is watched."""
    import subprocess
    import sys
    import uuid

    from gen_ssd_ray.common import joblock
    from gen_ssd_ray.common.joblock import ObjectLease, holder_gone

    monkeypatch.setenv("GEN_SSD_LEASE_TTL_S", "30")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    machine = joblock._machine()
    alive = {"pid": os.getpid(), "machine": machine, "pid_start": joblock._start_ticks(os.getpid())}
    assert machine and not holder_gone(alive)
    assert holder_gone({**alive, "pid": dead.pid})  # no such process (reaped)
    assert holder_gone({**alive, "pid_start": "1"})  # the pid now belongs to a later process
    assert not holder_gone({**alive, "pid": dead.pid, "machine": "another-boot/pid:[1]"})
    assert not holder_gone({"pid": dead.pid, "job": "older holder line"})

    uri = f"memory://lease-{uuid.uuid4().hex[:10]}/job"
    holder = ObjectLease(Storage(uri), "first").acquire()
    holder._stop.set()  # stops renewing; its line is then rewritten as a killed process's
    holder._thread.join()
    line = json.loads(Storage(uri).read_text("_lock"))
    token = Storage(uri).stat("_lock").token
    dead_line = {**line, "pid": dead.pid}
    assert Storage(uri).replace_bytes("_lock", json.dumps(dead_line).encode(), token)

    def no_watching(seconds):
        raise AssertionError(f"the job watched a lease whose holder is gone (slept {seconds} s)")

    monkeypatch.setattr(joblock.time, "sleep", no_watching)
    taker = ObjectLease(Storage(uri), "taker").acquire()
    assert json.loads(Storage(uri).read_text("_lock"))["job"] == "taker"
    taker.release()
    holder._token = None


@pytest.mark.integration
def test_lease_of_a_sigkilled_job_on_this_machine_is_taken_over_at_once(s3_bucket, monkeypatch):
    """A job SIGKILLed while holding an S3 lease, resubmitted at once on the same machine: no ttl wait."""
    import signal
    import subprocess
    import sys

    from gen_ssd_ray.common import joblock
    from gen_ssd_ray.common.joblock import lock_job_folder

    uri = f"{s3_bucket}/killed"
    code = (
        "import sys, time\n"
        "from gen_ssd_ray.common.joblock import lock_job_folder\n"
        f"lock_job_folder({uri!r}, 'killed')\n"
        "print('held', flush=True)\n"
        "time.sleep(600)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert json.loads(Storage(uri).read_text("_lock"))["job"] == "killed"

    def no_watching(seconds):
        raise AssertionError(f"the job watched the lease of a killed process (slept {seconds} s)")

    monkeypatch.setattr(joblock.time, "sleep", no_watching)
    taker = lock_job_folder(uri, "resubmitted")  # the default ttl (60 s) is not waited
    assert json.loads(Storage(uri).read_text("_lock"))["job"] == "resubmitted"
    taker.release()


@pytest.mark.integration
def test_worker_side_lease_check(s3_bucket, monkeypatch):
    """What a training worker checks before each upload (gen_ssd_ray.train.remote.check_lease)."""
    from gen_ssd_ray.common.joblock import LeaseLostError, lock_job_folder
    from gen_ssd_ray.train.remote import check_lease

    monkeypatch.setenv("GEN_SSD_LEASE_TTL_S", "2")
    storage = Storage(f"{s3_bucket}/ft")
    lease = lock_job_folder(storage.uri, "finetune")
    check_lease(storage, lease.lease_id)
    with pytest.raises(LeaseLostError, match="taken over"):
        check_lease(storage, "someone-else")
    lease._stop.set()  # the driver stops renewing: stale after its ttl
    lease._thread.join()
    time.sleep(2 + 2.5)
    with pytest.raises(LeaseLostError, match="not renewed"):
        check_lease(storage, lease.lease_id)
    lease.release()
    with pytest.raises(LeaseLostError):
        check_lease(storage, lease.lease_id)


def test_local_folder_has_no_fsspec_import(tmp_path):
    """A local Storage imports only the standard library (the module contract)."""
    import subprocess
    import sys

    code = (
        "import sys; from gen_ssd_ray.common.storage import Storage;"
        f"s = Storage({str(tmp_path)!r}); s.write_text('a', 'x'); s.list();"
        "print('fsspec' in sys.modules, 's3fs' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[1]
    )
    assert out.stdout.split() == ["False", "False"], out.stderr
