"""Hub model ids: downloaded once per node at a resolved commit (snapshot_download monkeypatched: no
network here), and refused for real, naming the model, the key and the fix, offline or unreachable."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from gen_ssd_ray.common import models
from gen_ssd_ray.common.models import ModelNotFoundError, hub_cache_folder, localize_model, resolve_model

REPO_ROOT = Path(__file__).resolve().parents[1]
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """An online hub: `model_info` names COMMIT for any revision; `snapshot_download` writes a model."""
    import huggingface_hub
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("GEN_SSD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-empty"))
    calls = types.SimpleNamespace(info=[], download=[])

    def model_info(self, repo_id, revision=None, timeout=None):
        calls.info.append((repo_id, revision))
        return types.SimpleNamespace(sha=COMMIT)

    def snapshot_download(repo_id, revision=None, local_dir=None, **kw):
        calls.download.append((repo_id, revision))
        folder = Path(local_dir)
        (folder / ".cache" / "huggingface").mkdir(parents=True)  # the library's metadata: not kept
        (folder / "config.json").write_text('{"model_type": "llama"}')
        (folder / "tokenizer.json").write_text("{}")
        (folder / "model.safetensors").write_bytes(b"\0" * 64)
        return str(folder)

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return calls


def test_a_hub_id_is_downloaded_once_per_node_at_its_commit(fake_hub):
    path = resolve_model("some-org/tiny", "teacher.model", revision="v1.0")
    assert path == str(hub_cache_folder("some-org/tiny", COMMIT))
    assert fake_hub.info == [("some-org/tiny", "v1.0")] and fake_hub.download == [("some-org/tiny", COMMIT)]
    folder = Path(path)
    assert (folder / "config.json").is_file() and (folder / models.MARKER).is_file()
    assert not (folder / ".cache").exists()
    # Again: the commit is looked up, nothing is downloaded. A commit as revision needs no network at all.
    assert resolve_model("some-org/tiny", "teacher.model") == path
    assert len(fake_hub.download) == 1 and fake_hub.info[-1] == ("some-org/tiny", None)
    assert resolve_model("some-org/tiny", "teacher.model", revision=COMMIT) == path
    assert len(fake_hub.info) == 2
    assert models.model_revision(path) == models.model_revision(path)  # an identity for the fingerprint


def test_another_node_downloads_the_same_commit(fake_hub):
    import shutil

    path = resolve_model("some-org/tiny", "teacher.model")
    shutil.rmtree(path)  # as on a node that never had it
    assert localize_model(path) == path and Path(path, "config.json").is_file()
    assert fake_hub.download == [("some-org/tiny", COMMIT)] * 2 and len(fake_hub.info) == 1


def test_a_download_without_weights_is_refused(fake_hub, monkeypatch):
    import huggingface_hub

    def config_only(repo_id, revision=None, local_dir=None, **kw):
        Path(local_dir, "config.json").write_text("{}")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", config_only)
    with pytest.raises(ModelNotFoundError, match=r"student\.model=.*no weights"):
        resolve_model("some-org/tiny", "student.model")
    assert not hub_cache_folder("some-org/tiny", COMMIT).exists()


def test_offline_and_not_cached_names_the_model_key_and_fix(monkeypatch, tmp_path):
    """For real: HF_HUB_OFFLINE=1, an empty Hugging Face cache."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("GEN_SSD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-empty"))
    with pytest.raises(ModelNotFoundError) as e:
        resolve_model("gen-ssd-test/not-cached", "teacher.model", revision="v2")
    msg = str(e.value)
    assert "teacher.model='gen-ssd-test/not-cached' (teacher.revision='v2')" in msg
    assert "HF_HUB_OFFLINE=1" in msg and "hf download gen-ssd-test/not-cached --revision v2" in msg
    assert "local model folder or an s3:// URI" in msg


def test_unreachable_hub_exits_2_from_the_job(tmp_path):
    """For real, through the command users run: the hub is on (no HF_HUB_OFFLINE) but unreachable."""
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env.update(
        HF_ENDPOINT="http://127.0.0.1:9",  # nothing listens there: connection refused
        GEN_SSD_CACHE=str(tmp_path / "cache"),
        HF_HUB_CACHE=str(tmp_path / "hf-empty"),
        PYTHONPATH=str(REPO_ROOT),
    )
    args = ["model.model=gen-ssd-test/not-a-model", "data.limit=1", f"output.dir={tmp_path / 'out'}"]
    run = subprocess.run(
        [sys.executable, "-m", "jobs.evaluate", *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2, run.stderr[-2000:]
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("error: model.model='gen-ssd-test/not-a-model': huggingface.co is unreachable")
    assert "Traceback" not in run.stderr
