"""Model folders on an object store (a real S3 API: the moto server of tests/s3server.py).

`resolve_model("s3://bucket/models/x")` downloads the folder once per node into the model cache, keyed
by the URI and the objects' ETags, verifies it, and is what every job and actor calls. Integration tier:
each test talks to the S3 server over HTTP.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gen_ssd_ray.common.models import (
    DOWNLOAD_LOG,
    MARKER,
    ModelNotFoundError,
    model_revision,
    models_dir,
    resolve_model,
)
from gen_ssd_ray.common.storage import Storage

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("GEN_SSD_CACHE", str(root))
    return root


def upload_model(folder: str, uri: str) -> Storage:
    storage = Storage(uri)
    storage.upload_dir(folder, "")
    return storage


def test_downloaded_once_per_node_verified_and_keyed_by_versions(tiny_model, s3_bucket, cache):
    uri = f"{s3_bucket}/models/tiny"
    storage = upload_model(tiny_model, uri)
    start = time.perf_counter()
    local = resolve_model(uri)
    first_s = time.perf_counter() - start
    log = json.loads((Path(local) / DOWNLOAD_LOG).read_text())
    print(
        f"tiny model download: {log['files']} files, {log['bytes']} bytes, {log['seconds']:.2f} s "
        f"(resolve {first_s:.2f} s)"
    )
    assert Path(local).is_relative_to(models_dir(cache)) and (Path(local) / MARKER).is_file()
    for name in storage.list():
        assert (Path(local) / name).read_bytes() == (Path(tiny_model) / name).read_bytes()
    marker_ns = (Path(local) / MARKER).stat().st_mtime_ns

    # A second use in this process and one in another process of the node: no second download.
    assert resolve_model(uri) == local
    code = (
        "from gen_ssd_ray.common.models import resolve_model, model_revision;"
        f"print(resolve_model({uri!r}));print(model_revision({uri!r}))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=dict(os.environ), capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    other_path, other_rev = proc.stdout.split()
    assert other_path == local
    assert (Path(local) / MARKER).stat().st_mtime_ns == marker_ns
    assert json.loads((Path(local) / DOWNLOAD_LOG).read_text())["pid"] == log["pid"] == os.getpid()
    assert len(list((models_dir(cache) / "remote").rglob(MARKER))) == 1

    # The revision is stable (URI, local copy, another process) and reflects the remote content.
    rev = model_revision(uri)
    assert rev == model_revision(local) == other_rev
    config = json.loads(storage.read_text("config.json"))
    config["rope_theta"] = 1234.0
    storage.write_json("config.json", config)
    changed = resolve_model(uri)
    assert changed != local and json.loads(Path(changed, "config.json").read_text())["rope_theta"] == 1234.0
    assert model_revision(uri) != rev
    assert Path(local, MARKER).is_file()  # the old version's copy is left to whoever still uses it


def test_a_node_without_the_copy_downloads_the_same_version(tiny_model, s3_bucket, cache):
    """An actor handed the driver's local path on a node that lacks it downloads the same version."""
    import shutil

    uri = f"{s3_bucket}/m"
    upload_model(tiny_model, uri)
    local = resolve_model(uri)
    rev = model_revision(local)
    shutil.rmtree(local)  # this "node" never had it
    assert resolve_model(local) == local and model_revision(local) == rev
    Storage(uri).write_text("generation_config.json", "{}")  # the folder changed meanwhile
    shutil.rmtree(local)
    with pytest.raises(ModelNotFoundError, match="changed since this job resolved it"):
        resolve_model(local)


def test_incomplete_folders_are_refused_naming_the_key(tiny_model, s3_bucket, cache):
    uri = f"{s3_bucket}/broken"
    storage = upload_model(tiny_model, uri)
    storage.delete("model.safetensors")
    with pytest.raises(ModelNotFoundError, match=r"teacher\.model=.*no weights"):
        resolve_model(uri, key="teacher.model")
    shards = {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    storage.write_json("model.safetensors.index.json", {"weight_map": shards})
    storage.write_bytes("model-00002-of-00002.safetensors", b"x")  # one shard of two
    with pytest.raises(ModelNotFoundError, match="model-00001-of-00002.safetensors"):
        resolve_model(uri, key="model.path")
    storage.delete("config.json")
    with pytest.raises(ModelNotFoundError, match=r"model\.path=.*no config\.json"):
        resolve_model(uri, key="model.path")
    with pytest.raises(ModelNotFoundError, match="no objects"):
        resolve_model(f"{s3_bucket}/nothing-here", key="model.path")
    assert not (models_dir(cache) / "remote").exists() or not list(
        (models_dir(cache) / "remote").rglob(MARKER)
    )


def test_generation_job_with_teacher_and_student_on_s3(tiny_model, tiny_student, s3_bucket, cache, tmp_path):
    """A short generation job whose teacher and student are s3:// folders: the driver and every
    actor (teacher engine, scorer, beam manager) resolve them on this node, one download each."""
    from gen_ssd_ray.generate.manifest import read_output
    from tests.test_job_e2e import job_args, run_job, write_problems

    teacher, student = f"{s3_bucket}/models/teacher", f"{s3_bucket}/models/student"
    upload_model(tiny_model, teacher)
    upload_model(tiny_student, student)
    data = write_problems(tmp_path / "p.jsonl", 2, bad=False)
    out = tmp_path / "out"
    start = time.perf_counter()
    r = run_job(job_args(teacher, student, data, out, "search.max_new_tokens=16"), timeout=400)
    print(f"generation job with s3:// models: {time.perf_counter() - start:.1f} s")
    assert r.returncode == 0, r.stderr[-3000:]
    assert read_output(out).num_rows == 2
    markers = sorted((models_dir(cache) / "remote").rglob(MARKER))
    assert len(markers) == 2  # one copy per model on this node
    pids = {json.loads((m.parent / DOWNLOAD_LOG).read_text())["pid"] for m in markers}
    assert len(pids) == 1  # both downloaded by the driver's prepare; the actors found them ready
    summary = json.loads(next(x for x in r.stdout.splitlines() if x.startswith('{"output_dir"')))
    assert {summary["teacher_model_path"], summary["student_model_path"]} == {str(m.parent) for m in markers}
