"""The whole pipeline end to end at a tiny size, as users run it (`python -m jobs.pipeline`), then a re-run
that skips every stage, and the report checked against the run's own files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gen_ssd_ray.common.config import ConfigError, load_config
from gen_ssd_ray.pipeline.config import PipelineConfig

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf" / "pipeline.yaml"

# A pipeline small enough for the test suite: the lab preset with a few steps and a few problems.
TINY = [
    "teacher_train.data.limit=300",
    "teacher_train.optim.epochs=1",
    "cold_start.data.limit=60",
    "cold_start.optim.epochs=1",
    "generate.data.limit=6",
    "generate.search.max_new_tokens=48",
    "generate.output.shard_size=4",
    "distill.optim.epochs=1",
    # A teacher trained for a few steps solves nothing: distil on every trajectory with a response, so
    # every method's fine-tune and evaluation run (the selection rules are unit-tested).
    "distill.data.filters=[]",
    "evaluate.data.limit=6",
    "evaluate.sampling.max_new_tokens=48",
    "posthoc_samples=2",
]


def run_pipeline(out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "RAY_AUTH_MODE": "disabled",
        "VLLM_CPU_KVCACHE_SPACE": "1",
    }
    return subprocess.run(
        [sys.executable, "-m", "jobs.pipeline", "--config", str(CONF), f"output_dir={out}", *TINY, *extra],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )


def test_bad_pipeline_config_names_the_section_key():
    with pytest.raises(ConfigError, match=r"^distill\.optim\.lr"):
        load_config(CONF, ["distill.optim.lr=-1"], schema_cls=PipelineConfig)
    with pytest.raises(ConfigError, match="methods"):
        load_config(CONF, ["methods=[gen_ssd,best_of_n]"], schema_cls=PipelineConfig)
    with pytest.raises(ConfigError, match="posthoc_samples"):
        load_config(CONF, ["posthoc_samples=1"], schema_cls=PipelineConfig)
    with pytest.raises(ConfigError, match="teacher"):
        load_config(CONF, ["teacher=lab:huge"], schema_cls=PipelineConfig)


@pytest.mark.slow
def test_pipeline_end_to_end_resume_and_report(tmp_path):
    import pandas as pd

    from gen_ssd_ray.generate.manifest import read_output
    from gen_ssd_ray.lab.problems import STYLES, classify_style

    out = tmp_path / "pipe"
    first = run_pipeline(out)
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
    state = json.loads((out / "pipeline.json").read_text())
    stages = state["stages"]
    methods = ["gen_ssd", "standard_kd", "posthoc_ppl"]
    for name in [
        "teacher",
        "cold_start",
        *(f"generate/{m}" for m in methods),
        "eval/teacher",
        "eval/cold_start",
    ]:
        assert stages[name]["status"] == "done", name
    assert (out / "teacher" / "model" / "model.safetensors").is_file()

    # Same schema for every method; costs make them comparable.
    for m in methods:
        df = read_output(out / "generate" / m).to_pandas()
        assert (df.method == m).all() and df.selected.notna().all() and len(df.problem_id.unique()) == 6
        per_problem = 2 if m == "posthoc_ppl" else 1
        assert len(df) == 6 * per_problem
        assert (df.teacher_tokens_generated > 0).all()

    # The report's numbers are the files' numbers.
    report = out / "report" / "report.md"
    text = report.read_text()
    metrics = json.loads((out / "report" / "metrics.json").read_text())
    for m in methods:
        df = read_output(out / "generate" / m).to_pandas()
        kept = df[df.selected == True]  # noqa: E712
        g = metrics["generation"][m]
        assert g["kept"] == len(kept) and g["trajectories"] == len(df)
        assert g["teacher_tokens_generated"] == int(df.teacher_tokens_generated.sum())
        if len(kept):
            assert g["teacher_tokens_per_kept"] == pytest.approx(
                df.teacher_tokens_generated.sum() / len(kept), abs=0.1
            )
            assert g["kept_mean_student_ppl"] == pytest.approx(kept.student_ppl.mean(), abs=1e-3)
        assert f"| {m} |" in text
        # the lab table: styles of exactly the kept trajectories
        styles = kept.response.map(classify_style).value_counts().to_dict()
        assert metrics["lab_styles"]["kept"][m] == {st: styles.get(st, 0) for st in STYLES}
        assert stages[f"distill/{m}"]["status"] == "done" and stages[f"eval/{m}"]["status"] == "done"
        assert (out / "distill" / m / "model" / "config.json").is_file()
    for name, acc in metrics["accuracy"].items():
        preds = pd.read_parquet(out / "eval" / name / "predictions.parquet")
        per_problem = (
            preds.assign(ok=preds.correct.fillna(False).astype(bool)).groupby("problem_id").ok.mean()
        )
        assert acc == pytest.approx(per_problem.mean())
        assert metrics["eval_problems"][name] == 6
        low, high = metrics["accuracy_ci95"][name]
        assert low <= acc <= high
        answers = metrics["lab_styles"]["answers"][name]
        assert sum(v["answers"] for v in answers.values()) == len(preds)
    assert "6 held-out problems" in text and "generation seed 0" in text
    # Gen-SSD against every other student, paired on the same problems
    assert {r["other"] for r in metrics["paired"]} == {"cold_start", "standard_kd", "posthoc_ppl"}
    assert all(r["problems"] == 6 and 0 <= r["p_value"] <= 1 for r in metrics["paired"])
    for png in ("accuracy.png", "training_loss.png"):
        assert (out / "report" / png).stat().st_size > 1000 and f"]({png})" in text

    # Re-running the same command skips every finished stage.
    second = run_pipeline(out)
    assert second.returncode == 0, second.stderr[-4000:]
    again = json.loads((out / "pipeline.json").read_text())["stages"]
    for name in [
        "teacher",
        "cold_start",
        "eval/teacher",
        *(f"distill/{m}" for m in methods),
        *(f"eval/{m}" for m in methods),
    ]:
        assert again[name]["status"] == "skipped", name
    for m in methods:
        assert again[f"generate/{m}"]["status"] == "skipped"
        assert again[f"generate/{m}"]["summary"]["problems_done_this_run"] == 0


@pytest.mark.parametrize("where", ["state-file", "generation-stage", "stage-input"])
def test_pipeline_full_disk_ends_in_one_line(tmp_path, capsys, monkeypatch, where):
    """A full disk in any stage of the pipeline: exit 1 and one line naming the file and "free space"
    (before: exit 2 "bad input", or a JobFailed line without the file)."""
    import errno

    from gen_ssd_ray.pipeline import run as pipeline_run
    from jobs.pipeline import main

    out = tmp_path / "pipe"
    file = str(out / "generate" / "gen_ssd" / "part-00001.parquet")

    def full(self):
        disk = OSError(errno.ENOSPC, "No space left on device", file)
        if where == "state-file":
            raise disk
        if where == "generation-stage":
            with pipeline_run._stage("generate/gen_ssd", any_error_fails=True):
                raise disk
        with pipeline_run._stage_input("eval/teacher", out / "eval" / "teacher"):
            raise disk

    monkeypatch.setattr(pipeline_run.Pipeline, "run", full)
    assert main([f"output_dir={out}"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: disk full"), err
    assert file in err and "free space" in err
