"""The report's figures and intervals (gen_ssd_ray.pipeline.report, .figures) on a fake pipeline output
folder: generation folders written by the real ShardWriter, evaluation and fine-tuning summaries as the
stages write them, pipeline.json as the pipeline records it. One method has NaN/inf PPLs, one has no
rows and no distilled student: the report is still written and says what it left out."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from gen_ssd_ray.pipeline.report import wilson_interval, write_report

METHODS = ["gen_ssd", "standard_kd", "posthoc_ppl"]


def _rows(method: str, n: int, ppl) -> list[list[dict]]:
    """`n` problems, two trajectories each (the first kept), with student PPL `ppl(i, j)`."""
    problems = []
    for i in range(n):
        problems.append(
            [
                {
                    "problem_id": f"p{i}",
                    "trajectory_index": j,
                    "question": f"q{i}",
                    "response": f"answer {i} {j}",
                    "status": "completed",
                    "correct": j == 0,
                    "student_ppl": ppl(i, j),
                    "num_response_tokens": 20 + 3 * i + j,
                    "teacher_tokens_generated": 100 * (1 + (method == "standard_kd")),
                    "student_tokens_processed": 40,
                    "method": method,
                    "selected": j == 0,
                    "config_fingerprint": "fp",
                }
                for j in range(2)
            ]
        )
    return problems


def _eval(out: Path, name: str, correct: int, total: int) -> None:
    folder = out / "eval" / name
    folder.mkdir(parents=True)
    summary = {
        "accuracy": correct / total,
        "problems": total,
        "problems_scored": total,
        "correct": correct,
        "unverified": 0,
        "mean_response_tokens": 30.0,
        "sampling": {"temperature": 0.0, "n": 1},
    }
    (folder / "summary.json").write_text(json.dumps(summary))


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    from gen_ssd_ray.generate.output import ShardWriter

    out = tmp_path_factory.mktemp("pipe")
    ppls = {
        "gen_ssd": lambda i, j: 1.5 + i * 0.7 + j * 4.0,
        # NaN and inf PPLs among finite ones
        "standard_kd": lambda i, j: [float("nan"), float("inf"), 3.0, 12.0, 40.0, 90.0][(2 * i + j) % 6],
    }
    for m in METHODS:  # posthoc_ppl: a folder with no rows
        with ShardWriter(
            out / "generate" / m, fingerprint="fp", config_yaml="search:\n  seed: 0\n", shard_size=3
        ) as w:
            for rows in _rows(m, 6, ppls[m]) if m in ppls else []:
                w.add(rows[0]["problem_id"], rows)
    _eval(out, "teacher", 8, 10)
    _eval(out, "cold_start", 3, 10)
    _eval(out, "gen_ssd", 6, 10)
    _eval(out, "standard_kd", 5, 10)
    (out / "cold_start").mkdir()
    (out / "cold_start" / "summary.json").write_text(
        json.dumps({"examples": 8, "steps": 3, "final_loss": 0.5})
    )
    (out / "cold_start" / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "loss": 2.0 / s}) + "\n" for s in (1, 2, 3))
    )
    stages = {
        **{f"generate/{m}": {"status": "done"} for m in METHODS},
        **{f"eval/{n}": {"status": "done"} for n in ("teacher", "cold_start", "gen_ssd", "standard_kd")},
        "cold_start": {"status": "done"},
        "distill/posthoc_ppl": {"status": "empty", "reason": "nothing kept"},
    }
    (out / "pipeline.json").write_text(json.dumps({"init_seed": 0, "stages": stages}))
    return write_report(out, METHODS)


def test_wilson_interval_known_case():
    # 8 of 10: Wilson 95% interval 0.490-0.943 (standard tables); symmetric, inside [0, 1]
    lo, hi = wilson_interval(8, 10)
    assert (lo, hi) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    assert wilson_interval(2, 10) == pytest.approx((1 - hi, 1 - lo))
    assert wilson_interval(10, 10)[1] == pytest.approx(1.0) and wilson_interval(0, 10)[0] == pytest.approx(
        0.0
    )
    assert 0.69 < wilson_interval(10, 10)[0] < 0.73  # not degenerate at 10 of 10
    assert wilson_interval(0, 0) is None


@pytest.mark.parametrize(
    "png",
    ["accuracy.png", "student_ppl.png", "cost_accuracy.png", "response_length.png", "training_loss.png"],
)
def test_figures_are_images_embedded_with_relative_links(report, png):
    from PIL import Image

    path = report.parent / png
    assert path.stat().st_size > 10_000  # not an empty canvas
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width >= 500 and im.height >= 300
        # drawn on: a good share of the pixels is not the white background
        dark = sum(im.convert("L").histogram()[:200])
        assert dark > 0.01 * im.width * im.height
    assert f"]({png})" in report.read_text()


def test_markdown_prints_the_intervals(report):
    text = report.read_text()
    lines = text.splitlines()
    teacher = next(ln for ln in lines if ln.startswith("| teacher |"))
    assert "| 0.800 | [0.490, 0.943] |" in teacher
    cold = next(ln for ln in lines if ln.startswith("| cold_start |"))
    lo, hi = wilson_interval(3, 10)
    assert f"[{lo:.3f}, {hi:.3f}]" in cold
    gen = next(ln for ln in lines if ln.startswith("| gen_ssd |"))  # methods table: accuracy [lo, hi]
    lo, hi = wilson_interval(6, 10)
    assert gen.endswith(f"| 0.600 [{lo:.3f}, {hi:.3f}] |")
    metrics = json.loads((report.parent / "metrics.json").read_text())
    assert metrics["accuracy_ci95"]["teacher"] == [0.49, 0.943]
    assert set(metrics["figures"]) == {
        "accuracy.png",
        "student_ppl.png",
        "cost_accuracy.png",
        "response_length.png",
        "training_loss.png",
    }


def test_what_is_missing_is_said(report):
    text = report.read_text()
    # standard_kd: 12 trajectories, 2 in every 6 with NaN or inf PPL
    assert "standard_kd: 4 of 12 trajectories have no finite student PPL" in text
    assert "posthoc_ppl has no evaluated distilled student" in text
    assert "posthoc_ppl has no generated trajectories" in text
    assert "| posthoc_ppl | no student: nothing was kept to train on |" in text
    metrics = json.loads((report.parent / "metrics.json").read_text())
    assert metrics["generation"]["posthoc_ppl"]["trajectories"] == 0
    assert not any(math.isnan(v) for v in [metrics["generation"]["gen_ssd"]["kept_mean_student_ppl"]])


def test_report_of_a_run_that_recorded_nothing(tmp_path):
    report = write_report(tmp_path, METHODS)
    text = report.read_text()
    assert "No figure" in text and "| gen_ssd | no generation results" in text
    assert not list(report.parent.glob("*.png"))
