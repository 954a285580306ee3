"""Evaluation with its model and its output on a real S3 API (the moto server of tests/s3server.py).

The real `prepare` (the model `s3://.../models/tiny` resolved through the node's cache, the output
folder's lease, the staging folder rebuilt from the store) and `evaluate` with fake engines: an
interrupted run leaves its committed pieces on the store, the same command resumes from them (the
model not downloaded again), predictions.parquet and summary.json (last) land on the store, `_partial`
and the lease are gone, and a third run is skipped.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from gen_ssd_ray.common.storage import Storage
from tests.test_evaluate import FakeEngines, cfg_with

pytestmark = pytest.mark.integration


def test_evaluation_output_and_model_on_s3_interrupt_resume_skip(
    tiny_model, s3_bucket, tmp_path, monkeypatch
):
    import pandas as pd

    from gen_ssd_ray.common.errors import JobInterrupted
    from gen_ssd_ray.common.models import DOWNLOAD_LOG, MARKER, models_dir
    from gen_ssd_ray.evaluate.run import evaluate, prepare

    cache = tmp_path / "cache"
    monkeypatch.setenv("GEN_SSD_CACHE", str(cache))
    model_uri = f"{s3_bucket}/models/tiny"
    Storage(model_uri).upload_dir(tiny_model, "")
    data = tmp_path / "problems.jsonl"
    data.write_text(
        "".join(json.dumps({"question": f"q{i}", "answer": f"#### {10 + i}"}) + "\n" for i in range(6))
    )
    out_uri = f"{s3_bucket}/evals/tiny"
    store = Storage(out_uri)
    cfg = cfg_with(
        f"model.model={model_uri}",
        f"data.path={data}",
        f"output.dir={out_uri}",
        "model.max_num_seqs=2",
        "model.max_model_len=512",
        "sampling.max_new_tokens=16",
        "runtime.progress=false",
    )

    first = prepare(cfg)
    assert Path(first.model_path).is_relative_to(models_dir(cache))
    assert store.exists("_lock")  # the lease, held from prepare on
    engines = FakeEngines(first.problems, interrupt_after=2)
    with pytest.raises(JobInterrupted, match="4 of 6 problems are committed"):
        evaluate(cfg, first, generate_fn=engines)
    pieces = store.list("_partial")
    assert len(pieces) == 2 and not store.exists("summary.json") and not store.exists("predictions.parquet")
    assert not store.exists("_lock")  # released

    download = (Path(first.model_path) / DOWNLOAD_LOG).read_text()
    second = prepare(cfg)  # a second use of the model on this node: no second download
    assert second.model_path == first.model_path and second.model_revision == first.model_revision
    assert (Path(second.model_path) / DOWNLOAD_LOG).read_text() == download
    assert len(list((models_dir(cache) / "remote").rglob(MARKER))) == 1
    again = FakeEngines(second.problems)
    summary = evaluate(cfg, second, generate_fn=again)
    assert again.asked == [4, 5] and summary["resumed_problems"] == 4
    assert summary["output_dir"] == out_uri and summary["predictions"] == f"{out_uri}/predictions.parquet"
    assert json.loads(store.read_text("summary.json"))["fingerprint"] == summary["fingerprint"]
    df = pd.read_parquet(io.BytesIO(store.read_bytes("predictions.parquet")))
    assert list(df.problem_id) == [q.problem_id for q in second.problems]
    assert summary["correct"] == 3 and summary["incorrect"] == 3
    assert store.list("_partial") == [] and not store.exists("_lock")

    third = prepare(cfg)
    assert third.existing is not None and third.lock is None
    assert evaluate(cfg, third)["skipped"] is True

    # Another evaluation into the same folder is refused, naming the folder on the store.
    from gen_ssd_ray.evaluate.run import EvaluationExistsError

    other = cfg_with(
        *[f"{k}={v}" for k, v in [("model.model", model_uri), ("data.path", data)]],
        f"output.dir={out_uri}",
        "model.max_model_len=512",
        "sampling.max_new_tokens=8",
    )
    with pytest.raises(EvaluationExistsError, match=f"output.dir='{out_uri}'.*output.force=true"):
        prepare(other)
    assert not store.exists("_lock")
