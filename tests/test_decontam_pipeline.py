"""The pipeline never trains on what it evaluates: every training stage of the shipped pipeline presets
is decontaminated against the evaluate stage's data (checked here on the data each stage would read,
with an index built independently of the pipeline's), and the counts reach the report."""

from __future__ import annotations

from pathlib import Path

import pytest

from gen_ssd_ray.common.config import ConfigError, load_config
from gen_ssd_ray.common.decontam import EvalIndex, words
from gen_ssd_ray.pipeline.config import TRAINING_SECTIONS, PipelineConfig, decontaminate_links, stage_config

ROOT = Path(__file__).resolve().parents[1]


def stage(cfg: PipelineConfig, section: str):
    """A stage's config as the pipeline derives it (pipeline/run.py passes these links too)."""
    return stage_config(cfg, section, decontaminate_links(cfg, section))


@pytest.mark.parametrize("preset", ["pipeline.yaml", "pipeline_gsm8k.yaml", "pipeline_gpu.yaml"])
def test_every_training_stage_is_checked_against_the_evaluation_set(preset):
    cfg = load_config(ROOT / "conf" / preset, [], PipelineConfig)
    e = cfg.evaluate.data
    for section in TRAINING_SECTIONS:
        dc = stage(cfg, section).data.decontaminate
        assert dc.enabled and dc.threshold == cfg.decontaminate.threshold, section
        assert (e.path, e.split, e.question_field) in {
            (r.path, r.split, r.question_field) for r in dc.against
        }
    assert stage(cfg, "evaluate").data.decontaminate.against == []


@pytest.mark.parametrize("preset", ["pipeline.yaml", "pipeline_gsm8k.yaml"])
def test_what_the_pipeline_trains_on_does_not_overlap_what_it_evaluates(preset):
    from gen_ssd_ray.common.data import load_problems, open_problems
    from gen_ssd_ray.train.data import read_filtered

    cfg = load_config(ROOT / "conf" / preset, [], PipelineConfig)
    evaluated = [p.question for p in load_problems(cfg.evaluate.data) if p.question]
    exact = {" ".join(words(q)) for q in evaluated}
    index = EvalIndex(enumerate(evaluated), cfg.decontaminate.ngram)
    trained: dict[str, list[str]] = {}
    g = stage(cfg, "generate")
    trained["generate"] = [p.question for p in open_problems(g.data) if p.question]
    assert open_problems(g.data).count == len(trained["generate"])
    for section in ("teacher_train", "cold_start"):
        ft = stage(cfg, section)
        if section == "teacher_train" and not cfg.teacher.startswith("lab:"):
            continue  # a ready teacher: the stage does not run
        df, _, _ = read_filtered(ft.data)
        trained[section] = list(df[ft.data.question_field])
    for section, questions in trained.items():
        assert questions, section
        assert not exact & {" ".join(words(q)) for q in questions}, section
        worst = max(index.match(q).overlap for q in questions)
        assert worst <= cfg.decontaminate.threshold, (section, worst)


def test_the_lab_preset_without_decontamination_would_train_on_near_copies():
    """The check above is not vacuous: with decontaminate.enabled=false the lab generation slice holds
    problems above the threshold."""
    from gen_ssd_ray.common.data import load_problems

    cfg = load_config(ROOT / "conf" / "pipeline.yaml", ["decontaminate.enabled=false"], PipelineConfig)
    index = EvalIndex(((p.problem_id, p.question) for p in load_problems(cfg.evaluate.data)), 8)
    problems = load_problems(stage(cfg, "generate").data)
    assert len(problems) == cfg.generate.data.limit
    assert sum(index.match(p.question).contaminated(cfg.decontaminate.threshold) for p in problems) > 0


def test_stage_sections_may_not_set_their_own_decontamination():
    conf = ROOT / "conf" / "pipeline.yaml"
    with pytest.raises(ConfigError, match=r"generate\.data\.decontaminate.*top level"):
        load_config(conf, ["generate.data.decontaminate.threshold=0.3"], PipelineConfig)
    with pytest.raises(ConfigError, match=r"^decontaminate\.threshold"):
        load_config(conf, ["decontaminate.threshold=2"], PipelineConfig)
    extra = load_config(conf, ["decontaminate.against=[{path: embedded:gsm8k/test}]"], PipelineConfig)
    paths = [r.path for r in stage(extra, "distill").data.decontaminate.against]
    assert paths == ["embedded:gsm8k/test", "embedded:lab/test"]


def test_report_shows_what_each_stage_dropped():
    from gen_ssd_ray.pipeline.report import decontamination, render_markdown
    from gen_ssd_ray.pipeline.run import format_summary

    expr = "decontaminate: 8-gram overlap > 0.8 or exact duplicate of embedded:lab/test"
    ft = {
        "filters": [
            {"expr": "non-empty question and response", "before": 10, "after": 10},
            {"expr": expr, "before": 10, "after": 7},
        ]
    }
    state = {
        "methods": ["gen_ssd"],
        "stages": {
            "cold_start": {"status": "done", "summary": ft},
            "generate/gen_ssd": {
                "status": "done",
                "summary": {"problems_total": 60, "problems_dropped_contaminated": 4},
            },
        },
        "report": "r.md",
    }
    rows = decontamination(state, {"cold_start": {"summary": ft}}, ["gen_ssd"])
    assert rows == [
        {"stage": "generate/gen_ssd", "unit": "problems", "dropped": 4, "kept": 60},
        {"stage": "cold_start", "unit": "rows", "dropped": 3, "kept": 7, "check": expr},
    ]
    data = {"generation": {}, "eval": {}, "training": {}, "state": state, "decontamination": rows}
    text = render_markdown(data, ["gen_ssd"], [], [], {})
    assert "## Decontamination" in text and "| generate/gen_ssd | 4 problems | 60 |" in text
    assert "| cold_start | 3 rows | 7 |" in text and expr in text
    assert "generate/gen_ssd 4 problems, cold_start 3 rows" in format_summary(state)


def test_the_pipeline_passes_the_check_to_its_generation_and_fine_tuning_stages(tmp_path, monkeypatch):
    """pipeline/run.py's call sites: the generation config and each fine-tuning stage's config carry the
    evaluation set in data.decontaminate.against (fine-tuning's prepare is replaced by a recorder)."""
    from gen_ssd_ray.pipeline.run import Pipeline
    from gen_ssd_ray.train import run as train_run
    from gen_ssd_ray.train.data import EmptyTrainingSetError

    cfg = load_config(ROOT / "conf" / "pipeline.yaml", [f"output_dir={tmp_path}"], PipelineConfig)
    pipe = Pipeline(cfg)
    g = pipe._generate_config("gen_ssd", "/t", "/s")
    assert [r.path for r in g.data.decontaminate.against] == ["embedded:lab/test"]
    assert g.data.decontaminate.threshold == 0.8
    seen = []

    def record(ft):
        seen.append(ft)
        raise EmptyTrainingSetError("recorded")

    monkeypatch.setattr(train_run, "prepare", record)
    for section in ("teacher_train", "cold_start", "distill"):
        assert pipe.finetune(section, section, "/m") is None
    assert [[r.path for r in ft.data.decontaminate.against] for ft in seen] == [["embedded:lab/test"]] * 3
