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
