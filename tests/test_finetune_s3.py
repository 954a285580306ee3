"""The fine-tuning job with `output.dir=s3://...` against a real S3 API (the moto server of
tests/s3server.py), as users run it: `python -m jobs.finetune ... key=value` in a subprocess.

The run is SIGKILLed (its whole process group: driver, Ray, workers) after a checkpoint reached the
store, resubmitted with the same command, and must resume from the last complete checkpoint on the
store (step > 0), export, and upload a model folder that `resolve_model(uri)` loads. Bad locations are
refused with exit 2 before anything starts.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gen_ssd_ray.common.storage import Storage
from tests.test_finetune import _summary, base_args, finetune, write_pairs

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "arg, key, says",
    [
        ("output.dir=s3:/bucket/ft", "output.dir", "slash missing"),
        ("output.dir=nosuch://b/ft", "output.dir", "unknown storage scheme"),
        ("output.dir=https://host/ft", "output.dir", "cannot hold a job's files"),
        ("model.path=s3:/b/model", "model.path", "slash missing"),
        ("data.path=nosuch://b/x.jsonl", "data.path", "unknown storage scheme"),
    ],
)
def test_bad_location_exits_2_naming_the_key_and_creates_nothing(
    tmp_path, monkeypatch, capsys, arg, key, says
):
    from jobs.finetune import main

    monkeypatch.chdir(tmp_path)
    assert main([arg]) == 2
    err = capsys.readouterr().err
    assert f"{key}=" in err and says in err
    assert os.listdir(tmp_path) == []


@pytest.mark.integration
def test_checkpoints_and_model_on_s3_sigkill_resume_export(tiny_model, tmp_path, s3_bucket, monkeypatch):
    from gen_ssd_ray.common.models import resolve_model

    cache = tmp_path / "cache"
    env = {"GEN_SSD_CACHE": str(cache), "GEN_SSD_LEASE_TTL_S": "6"}
    data = write_pairs(tmp_path / "pairs.jsonl")
    uri = f"{s3_bucket}/runs/ft"
    store = Storage(uri)
    args = base_args(tiny_model, data, uri, "optim.epochs=4", "output.save_every_steps=1")
    proc_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **env}
    log = (tmp_path / "first.log").open("w")
    first = subprocess.Popen(
        [sys.executable, "-m", "jobs.finetune", *args],
        cwd=ROOT,
        env=proc_env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    # 1. Kill the whole process group once a checkpoint is complete on the store (its marker, last).
    deadline = time.time() + 420
    while time.time() < deadline and first.poll() is None:
        if any(n.endswith("/_complete.json") for n in store.list("checkpoints")):
            break
        time.sleep(0.2)
    else:
        first.kill()
        pytest.fail(f"no checkpoint reached the store: {(tmp_path / 'first.log').read_text()[-3000:]}")
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    assert not store.exists("model/.complete") and not store.exists("summary.json")
    kill_steps = sorted(n.split("/")[1] for n in store.list("checkpoints") if n.endswith("_complete.json"))
    print("complete on the store at the kill:", kill_steps)

    # 2. The same command (after the dead run's lease expires) resumes from the store and exports.
    start = time.perf_counter()
    done = finetune(args, env)
    elapsed = time.perf_counter() - start
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    s = _summary(done)
    print("resubmission:", f"{elapsed:.1f} s", "resumed from", s["resumed_from_step"])
    for line in (done.stdout + done.stderr).splitlines():
        if "[finetune] uploaded" in line:
            print(line.strip())
    assert s["resumed_from_step"] is not None and s["resumed_from_step"] > 0
    assert s["output_dir"] == uri and s["model_dir"] == f"{uri}/model"
    assert s["steps"] == 4 * s["steps_per_epoch"]
    metrics = [json.loads(x) for x in store.read_text("metrics.jsonl").splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, s["steps"] + 1))  # each step logged once
    assert json.loads(store.read_text("summary.json"))["fingerprint"] == s["fingerprint"]
    assert store.exists("loss.png") and store.exists("_config.yaml") and not store.exists("_lock")
    # keep_last=2 complete checkpoints on the store, each with its marker
    tags = sorted({n.split("/")[1] for n in store.list("checkpoints") if n.count("/") >= 2})
    assert len(tags) == 2 and tags[-1] == f"step-{s['steps']:06d}"
    assert store.read_text("checkpoints/latest").strip() == tags[-1]
    for t in tags:
        marker = json.loads(store.read_text(f"checkpoints/{t}/_complete.json"))
        for rel, size in marker["files"].items():
            assert store.stat(f"checkpoints/{t}/{rel}").size == size

    # 3. The exported model on the store is loadable through resolve_model (a fresh node's cache).
    monkeypatch.setenv("GEN_SSD_CACHE", str(tmp_path / "node2"))
    local = resolve_model(f"{uri}/model")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert AutoTokenizer.from_pretrained(local).chat_template
    assert AutoModelForCausalLM.from_pretrained(local) is not None

    # 4. Re-running a complete run is a no-op that reads the store.
    again = finetune(args, env)
    assert again.returncode == 0 and _summary(again)["skipped"] is True


@pytest.mark.integration
def test_training_rows_read_from_s3_jsonl_and_parquet(tmp_path, s3_bucket):
    import pandas as pd

    from gen_ssd_ray.train.config import TrainDataConfig
    from gen_ssd_ray.train.data import TrainDataError, read_filtered

    data = write_pairs(tmp_path / "pairs.jsonl")
    store = Storage(f"{s3_bucket}/data")
    store.upload_file(data, "pairs.jsonl")
    local, steps, read = read_filtered(TrainDataConfig(path=str(data)))
    remote, rsteps, rread = read_filtered(TrainDataConfig(path=store.uri_of("pairs.jsonl")))
    assert read == rread == 24 and len(remote) == len(local) == 18 and rsteps == steps
    assert remote.reset_index(drop=True).equals(local.reset_index(drop=True))

    frame = pd.read_json(data, lines=True)
    with store.writer("folder/part-0.parquet") as fh:
        frame.iloc[:10].to_parquet(fh)
    with store.writer("folder/part-1.parquet") as fh:
        frame.iloc[10:].to_parquet(fh)
    store.write_text("folder/_ignored.parquet", "not parquet")  # names starting with _ are not data
    folder, _, fread = read_filtered(TrainDataConfig(path=store.uri_of("folder")))
    assert fread == 24 and sorted(folder.question) == sorted(local.question)
    with pytest.raises(TrainDataError, match="no such object"):
        read_filtered(TrainDataConfig(path=store.uri_of("missing.jsonl")))
    with pytest.raises(TrainDataError, match="no committed shards"):
        read_filtered(TrainDataConfig(path=store.uri_of("empty-folder")))


def _fake_checkpoint(out: Path, step: int, world: int = 2) -> str:
    """A checkpoint folder as DeepSpeed and the worker leave it (complete on local disk)."""
    from gen_ssd_ray.train import checkpoint as ck

    tag = ck.tag_for(step)
    folder = out / ck.CHECKPOINTS / tag
    folder.mkdir(parents=True)
    (folder / "mp_rank_00_model_states.pt").write_bytes(b"m" * (10 + step))
    for r in range(world):
        (folder / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt").write_bytes(b"o" * (20 + r))
    ck.write_marker(out, tag, world, "fp")
    ck.mark_latest(out, tag, keep_last=2)
    return tag


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.integration)])
def store(request, tmp_path) -> Storage:
    if request.param == "local":
        return Storage(str(tmp_path / "store"))
    return Storage(f"{request.getfixturevalue('s3_bucket')}/ft")


def test_checkpoint_upload_protocol_marker_last_resume_and_prune(store, tmp_path):
    """Every rank uploads its own files, rank 0 the marker last; a checkpoint without its marker is never
    pulled; keep_last prunes on the store as on disk; the staging folder is rebuilt from the store."""
    from gen_ssd_ray.train import checkpoint as ck
    from gen_ssd_ray.train import remote as rm

    out = tmp_path / "staging"
    (out / ck.METRICS).parent.mkdir(parents=True)
    (out / ck.METRICS).write_text('{"step": 1}\n')
    for step in (1, 2, 3):
        tag = _fake_checkpoint(out, step)
        rm.clear_checkpoint(store, tag)
        uploaded = [rm.push_checkpoint(store, out, tag, rank, 2, None)[0] for rank in (0, 1)]
        assert uploaded == [2, 1]  # rank 0: the model states and its optimizer shard; rank 1: its shard
        rm.commit_checkpoint(store, out, tag, 2, "fp", 2, None)
    assert rm.complete_remote_tags(store) == ["step-000002", "step-000003"]  # keep_last=2
    assert store.read_text("checkpoints/latest").strip() == "step-000003" and store.exists(ck.METRICS)

    # Step 4's upload is cut short before its marker: never used; the pull takes step 3.
    tag = _fake_checkpoint(out, 4)
    rm.push_checkpoint(store, out, tag, 0, 2, None)
    assert rm.remote_marker(store, tag) is None and "step-000004" in rm.remote_tags(store)
    # A marker whose files are not all there (a hand-deleted shard) is not complete either.
    store.delete("checkpoints/step-000002/zero_pp_rank_1_mp_rank_00_optim_states.pt")
    assert rm.complete_remote_tags(store) == ["step-000003"]

    fresh = tmp_path / "fresh"
    rm.pull(store, fresh)
    assert ck.complete_tags(fresh) == ["step-000003"] and ck.resume_tag(fresh, "fp", 2) == "step-000003"
    assert (fresh / ck.METRICS).read_text() == '{"step": 1}\n'
    assert sorted(p.name for p in (fresh / ck.CHECKPOINTS).iterdir()) == ["latest", "step-000003"]

    # The incomplete step 4 is overwritten by the next save of that step, and older junk pruned.
    rm.clear_checkpoint(store, tag)
    for rank in (0, 1):
        rm.push_checkpoint(store, out, tag, rank, 2, None)
    rm.commit_checkpoint(store, out, tag, 2, "fp", 2, None)
    assert rm.complete_remote_tags(store) == ["step-000003", "step-000004"]
    assert rm.remote_tags(store) == ["step-000003", "step-000004"]  # the damaged step 2 pruned


def test_model_upload_marker_last_and_stale_files_removed(store, tmp_path):
    from gen_ssd_ray.train import remote as rm

    out = tmp_path / "staging"
    model = out / "model"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"w" * 100)
    (model / ".complete").write_text('{"fingerprint": "a"}\n')
    store.write_text("model/old-shard.safetensors", "stale")
    files, nbytes, _ = rm.push_model(store, out, None)
    assert files == 3 and nbytes == 102
    assert store.list("model") == ["model/.complete", "model/config.json", "model/model.safetensors"]
