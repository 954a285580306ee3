"""The pipeline with `output_dir` on an object store (a real S3 API: the moto server of tests/s3server.py).

Unit tier: bad locations refused naming the key; every stage folder a child URI. Integration tier: the
report built from the stages' files on the store and uploaded there (report.md last). Slow tier: the
whole tiny pipeline (the configuration of tests/test_pipeline.py) with its output on S3.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gen_ssd_ray.common.config import load_config
from gen_ssd_ray.common.storage import Storage, StorageError
from gen_ssd_ray.pipeline.config import PipelineConfig
from gen_ssd_ray.pipeline.run import Pipeline, _report_input
from tests.test_pipeline import CONF, TINY

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "arg, key", [("output_dir=s3:/b/exp", "output_dir"), ("teacher=nosuch://b/t", "teacher")]
)
def test_bad_locations_are_refused_naming_the_key(arg, key):
    with pytest.raises(StorageError, match=f"^{key}="):
        load_config(CONF, [arg], schema_cls=PipelineConfig)


def test_stage_folders_are_child_uris_and_nothing_local_is_named_after_them(tmp_path, monkeypatch):
    monkeypatch.setenv("GEN_SSD_CACHE", str(tmp_path / "cache"))
    cfg = load_config(CONF, ["output_dir=s3://bucket/exp/"], schema_cls=PipelineConfig)
    pipe = Pipeline(cfg)
    assert pipe.loc("generate", "gen_ssd") == "s3://bucket/exp/generate/gen_ssd"
    assert pipe.loc("distill", "gen_ssd", "model") == "s3://bucket/exp/distill/gen_ssd/model"
    assert pipe._generate_config("gen_ssd", "t", "s").output.dir == "s3://bucket/exp/generate/gen_ssd"
    assert pipe.out.is_relative_to(tmp_path / "cache")  # the local staging folder
    local = Pipeline(load_config(CONF, [f"output_dir={tmp_path / 'exp'}"], schema_cls=PipelineConfig))
    assert local.loc("eval", "teacher") == str(tmp_path / "exp" / "eval" / "teacher")


def test_report_inputs_leave_out_checkpoints_models_and_locks():
    assert _report_input("pipeline.json") and _report_input("generate/gen_ssd/shard-00000.parquet")
    assert _report_input("eval/teacher/predictions.parquet") and _report_input("cold_start/metrics.jsonl")
    assert not _report_input("cold_start/checkpoints/step-000002/mp_rank_00_model_states.pt")
    assert not _report_input("generate/gen_ssd/_manifest.log/000000000001.json")
    assert not _report_input("generate/gen_ssd/_journal/seg-1-ab.jsonl.gz")
    assert not _report_input("distill/gen_ssd/model/model.safetensors")
    assert not _report_input("models/student-init-student-seed0/config.json")
    assert not _report_input("eval/teacher/_lock") and not _report_input(
        "eval/teacher/_partial/part-00000.parquet"
    )


@pytest.mark.integration
def test_report_from_stage_files_on_s3_is_uploaded_there(s3_bucket, tmp_path, monkeypatch):
    import pandas as pd

    monkeypatch.setenv("GEN_SSD_CACHE", str(tmp_path / "cache"))
    uri = f"{s3_bucket}/exp"
    store = Storage(uri)
    stages = {name: {"status": "done"} for name in ("cold_start", "eval/teacher", "eval/cold_start")}
    store.write_json("pipeline.json", {"stages": stages, "init_seed": 0})
    store.write_json(
        "cold_start/summary.json", {"examples": 9, "steps": 3, "first_loss": 2.5, "final_loss": 1.25}
    )
    store.write_text(
        "cold_start/metrics.jsonl",
        "".join(json.dumps({"step": s, "loss": 3.0 - s / 2, "lr": 1e-3}) + "\n" for s in (1, 2, 3)),
    )
    store.write_bytes("cold_start/checkpoints/step-000003/huge.pt", b"never downloaded")
    for name, correct in (("teacher", [True, True, False]), ("cold_start", [True, False, False])):
        store.write_json(f"eval/{name}/summary.json", {"accuracy": sum(correct) / 3, "problems": 3})
        df = pd.DataFrame({"problem_id": ["a", "b", "c"], "correct": correct, "response": ["x"] * 3})
        with store.writer(f"eval/{name}/predictions.parquet") as fh:
            df.to_parquet(fh)

    pipe = Pipeline(load_config(CONF, [f"output_dir={uri}"], schema_cls=PipelineConfig))
    report = pipe._remote_report()
    assert report == f"{uri}/report/report.md"
    names = store.list("report")
    assert {
        "report/report.md",
        "report/metrics.json",
        "report/accuracy.png",
        "report/training_loss.png",
    } <= set(names)
    metrics = json.loads(store.read_text("report/metrics.json"))
    assert metrics["accuracy"] == {"teacher": 2 / 3, "cold_start": 1 / 3}
    assert metrics["training"]["cold_start"]["final_loss"] == 1.25
    assert "| cold_start | 9 | 3 |" in store.read_text("report/report.md")
    assert not (pipe.out / "cold_start" / "checkpoints").exists()


@pytest.mark.slow
def test_pipeline_with_output_on_s3(s3_bucket, tmp_path):
    """The tiny pipeline of tests/test_pipeline.py with output_dir=s3://...: every stage's files and the
    report on the store, nothing written under a local folder named after the URI. Needs generation's
    output on object stores (generate/output.py)."""
    uri = f"{s3_bucket}/exp"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "RAY_AUTH_MODE": "disabled",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "GEN_SSD_CACHE": str(tmp_path / "cache"),
    }
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.pipeline", "--config", str(CONF), f"output_dir={uri}", *TINY],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    store = Storage(uri)
    state = json.loads(store.read_text("pipeline.json"))
    assert state["report"] == f"{uri}/report/report.md" and store.exists("report/report.md")
    for stage in ("teacher", "cold_start", "distill/gen_ssd"):
        assert store.exists(f"{stage}/summary.json") and store.exists(f"{stage}/model/.complete")
    for name in ("teacher", "cold_start", "gen_ssd"):
        assert store.exists(f"eval/{name}/summary.json") and store.exists(f"eval/{name}/predictions.parquet")
    assert not store.exists("_lock") and not (ROOT / "s3:").exists()
