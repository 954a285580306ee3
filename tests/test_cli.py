"""The self-documenting command line (gen_ssd_ray.common.cli, gen_ssd_ray.common.confdoc): `--help` lists
every key of the job's typed config with its default and one-line doc, every key has a doc,
`--print-config` prints the resolved YAML without starting anything, and an unknown key names the job,
the nearest keys and what the section holds."""

from __future__ import annotations

import importlib
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from gen_ssd_ray.common import confdoc
from gen_ssd_ray.common.config import ConfigError, load_config

REPO_ROOT = Path(__file__).resolve().parents[1]
JOBS = {
    "generate": ("gen_ssd_ray.generate.config", "GenerateConfig"),
    "finetune": ("gen_ssd_ray.train.config", "FinetuneConfig"),
    "evaluate": ("gen_ssd_ray.evaluate.config", "EvaluateConfig"),
    "pipeline": ("gen_ssd_ray.pipeline.config", "PipelineConfig"),
}
# Modules whose fields other people document (their owners add the comments; see test_every_key_has_a_doc).
NOT_YET_DOCUMENTED = {}


def schema(job: str) -> type:
    module, name = JOBS[job]
    return getattr(importlib.import_module(module), name)


def job_main(job: str):
    return importlib.import_module(f"jobs.{job}").main


# ---- --help ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("job", sorted(JOBS))
def test_help_lists_every_key_with_its_default_and_doc(job, capsys):
    with pytest.raises(SystemExit) as e:
        job_main(job)(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--print-config" in out and schema(job).PRESET in out
    lines = out.splitlines()
    keys = confdoc.config_keys(schema(job))
    assert len(keys) > 20
    for k in keys:
        [i] = [i for i, line in enumerate(lines) if line.strip() == f"{k.key} = {k.default}"]
        if k.doc:  # the one-line doc follows the key (wrapped)
            assert lines[i + 1].strip() == k.line.split()[0] or k.line.startswith(lines[i + 1].strip())


def test_help_shows_the_jobs_own_defaults():
    generate, evaluate = (
        {k.key: k.default for k in confdoc.config_keys(schema(j))} for j in ("generate", "evaluate")
    )
    assert generate["data.limit"] == "16" and evaluate["data.limit"] == "null"  # EvaluateConfig's default
    assert generate["student.model"] == "embedded:student" and generate["teacher.model"] == "embedded:teacher"
    assert generate["sim.faults"] == "[]" and generate["sim.faults[].kind"] == "dead"
    pipeline = {k.key: k.default for k in confdoc.config_keys(schema("pipeline"))}
    assert pipeline["distill.data.filters"] == '["selected == True"]'  # the pipeline's default for the stage
    assert pipeline["generate.search.chunk_tokens"] == "64"


def _modules_with_keys() -> list[str]:
    return sorted({k.module for job in JOBS for k in confdoc.config_keys(schema(job))})


@pytest.mark.parametrize(
    "module",
    [
        pytest.param(m, marks=pytest.mark.xfail(reason=NOT_YET_DOCUMENTED[m], strict=False))
        if m in NOT_YET_DOCUMENTED
        else m
        for m in _modules_with_keys()
    ],
)
def test_every_key_has_a_doc(module):
    """Every key of every job, grouped by the module that declares the field (where its comment goes)."""
    missing = sorted(
        {k.key for job in JOBS for k in confdoc.config_keys(schema(job)) if k.module == module and not k.doc}
    )
    assert not missing, f"add a one-line comment above these fields in {module}: {missing}"


@dataclass(frozen=True)
class Base:
    # The base's doc. More detail.
    a: int = 1
    b: str = "x"  # a trailing doc


@dataclass(frozen=True)
class Child(Base):
    a: int = 2
    # A list of sections.
    items: list[Base] = field(default_factory=list)


def test_docs_come_from_the_config_source():
    keys = {k.key: k for k in confdoc.config_keys(Child)}
    assert keys["a"].doc == "The base's doc. More detail." and keys["a"].line == "The base's doc."
    assert keys["a"].default == "2" and keys["b"].doc == "a trailing doc"
    assert keys["items[].b"].default == "x" and keys["items[].b"].doc == "a trailing doc"
    assert [confdoc.render(v) for v in ("a:b", "1.5", None, True, "a b", [])] == [
        "a:b",
        '"1.5"',
        "null",
        "true",
        '"a b"',
        "[]",
    ]
    assert confdoc.first_sentence('Ray address, e.g. "auto". More.') == 'Ray address, e.g. "auto".'


# ---- --print-config --------------------------------------------------------------------------------


PRINT_ALL = """
import io, contextlib, sys, importlib
for job, args in [
    ("generate", ["--config", "conf/default.yaml", "data.limit=3", "search.beam_width=2"]),
    ("finetune", ["--config", "conf/finetune.yaml", "optim.lr=3e-4"]),
    ("evaluate", ["data.path=openai/gsm8k", "data.subset=main"]),
    ("pipeline", ["--config", "conf/pipeline.yaml", "generate.data.limit=5"]),
]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = importlib.import_module("jobs." + job).main(["--print-config", *args])
    assert code == 0, (job, code)
    open(sys.argv[1] + "/" + job + ".yaml", "w").write(out.getvalue())
heavy = [m for m in ("ray", "torch", "vllm", "transformers", "deepspeed", "datasets") if m in sys.modules]
assert not heavy, heavy
print("ok")
"""


def test_print_config_prints_the_resolved_yaml_without_heavy_imports(tmp_path):
    run = subprocess.run(
        [sys.executable, "-c", PRINT_ALL, str(tmp_path)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-3000:]
    expected = {
        "generate": load_config(
            REPO_ROOT / "conf/default.yaml", ["data.limit=3", "search.beam_width=2"], schema("generate")
        ),
        "finetune": load_config(REPO_ROOT / "conf/finetune.yaml", ["optim.lr=3e-4"], schema("finetune")),
        "evaluate": load_config(None, ["data.path=openai/gsm8k", "data.subset=main"], schema("evaluate")),
        "pipeline": load_config(
            REPO_ROOT / "conf/pipeline.yaml", ["generate.data.limit=5"], schema("pipeline")
        ),
    }
    for job, cfg in expected.items():
        printed = tmp_path / f"{job}.yaml"
        text = printed.read_text()
        assert text.startswith(f"# python -m jobs.{job} ")
        # Every key is there, and the printed file loads back into the same config.
        assert load_config(printed, [], schema(job)) == cfg
    import yaml

    generate = yaml.safe_load((tmp_path / "generate.yaml").read_text())
    assert generate["data"]["limit"] == 3 and generate["search"]["beam_width"] == 2
    assert "journal_interval_s" in generate["runtime"] and "subset" in generate["data"]


def test_print_config_of_a_bad_config_exits_2(capsys):
    assert job_main("evaluate")(["--print-config", "data.limt=3"]) == 2
    assert "unknown config key 'data.limt' for python -m jobs.evaluate" in capsys.readouterr().err


# ---- unknown keys ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "job, override, key, nearest, section",
    [
        ("evaluate", "data.limt=3", "data.limt", "data.limit", "The keys of data: path, subset, split"),
        (
            "generate",
            "teacher.limit=3",
            "teacher.limit",
            "data.limit",
            "The keys of teacher: model, revision",
        ),
        ("generate", "serch.beam_width=2", "serch", "search", "The keys of the top level: method, teacher"),
        (
            "finetune",
            "optim.learning_rate=1",
            "optim.learning_rate",
            None,
            "The keys of optim: epochs, max_steps",
        ),
        ("pipeline", "generate.teacher.modle=x", "generate.teacher.modle", "generate.teacher.model", "model"),
        ("pipeline", "data.limit=3", "data", "teacher_train.data", "The keys of the top level: output_dir"),
    ],
)
def test_unknown_key_names_the_job_the_nearest_key_and_the_section(job, override, key, nearest, section):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override], schema(job), job=job)
    msg = str(e.value)
    assert msg.startswith(f"unknown config key '{key}'")
    assert f"for python -m jobs.{job}." in msg and section in msg
    assert f"python -m jobs.{job} --help" in msg and schema(job).PRESET in msg
    if nearest:
        assert f"Did you mean {nearest}" in msg
    else:
        assert "Did you mean" not in msg


def test_unknown_key_in_a_config_file(tmp_path):
    file = tmp_path / "x.yaml"
    file.write_text("model:\n  modle: some/model\n")
    with pytest.raises(
        ConfigError,
        match=r"unknown config key 'model\.modle' for python -m jobs\.evaluate\. Did you mean model\.model\?",
    ):
        load_config(file, [], schema("evaluate"), job="evaluate")


def test_a_bad_value_is_not_an_unknown_key():
    with pytest.raises(ConfigError, match=r"bad value for 'data\.limit' in python -m jobs\.generate"):
        load_config(None, ["data.limit=lots"], schema("generate"), job="generate")


def test_another_jobs_preset_is_named_as_such():
    with pytest.raises(ConfigError) as e:
        load_config(REPO_ROOT / "conf/default.yaml", [], schema("pipeline"), job="pipeline")
    assert "is a config of python -m jobs.generate, not of python -m jobs.pipeline" in str(e.value)
    assert "(e.g. generate: ...)" in str(e.value)
