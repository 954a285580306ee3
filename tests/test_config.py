"""Config: every preset loads into the schema; bad keys and values fail naming the key; fingerprints."""

from __future__ import annotations

from pathlib import Path

import pytest

from gen_ssd_ray.common.config import ConfigError
from gen_ssd_ray.common.config import load_config as _load
from gen_ssd_ray.generate.config import GenerateConfig, fingerprint


def load_config(path, overrides=None, schema_cls=GenerateConfig):
    return _load(path, overrides, schema_cls)


CONF = Path(__file__).resolve().parents[1] / "conf"


# Each preset names the job that runs it in its header ("python -m jobs.<job>"); its schema:
JOB_SCHEMAS = {
    "generate": ("gen_ssd_ray.generate.config", "GenerateConfig"),
    "finetune": ("gen_ssd_ray.train.config", "FinetuneConfig"),
    "evaluate": ("gen_ssd_ray.evaluate.config", "EvaluateConfig"),
    "pipeline": ("gen_ssd_ray.pipeline.config", "PipelineConfig"),
    "export": ("gen_ssd_ray.export.config", "ExportConfig"),
}


@pytest.mark.parametrize("path", sorted(CONF.glob("*.yaml")), ids=lambda p: p.name)
def test_every_preset_loads(path):
    import importlib
    import re

    text = path.read_text()
    assert text.startswith("#")  # says what it is for and how to run it
    job = re.search(r"jobs\.(\w+)", text.split("\n\n")[0])
    assert job and job.group(1) in JOB_SCHEMAS, f"{path.name}: the header must name python -m jobs.<job>"
    module, name = JOB_SCHEMAS[job.group(1)]
    schema = getattr(importlib.import_module(module), name)
    cfg = load_config(path, schema_cls=schema)
    assert isinstance(cfg, schema)


def test_defaults_and_overrides():
    cfg = load_config(None, ["search.chunk_tokens=32", "data.limit=null", "search.prune_ppl=50"])
    assert cfg.search.chunk_tokens == 32 and cfg.data.limit is None and cfg.search.prune_ppl == 50.0
    assert cfg.teacher.model == "embedded:teacher"


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["search.nope=1"], "search.nope"),
        (["nope.x=1"], "nope"),
        (["search.chunk_tokens=abc"], "search.chunk_tokens"),
        (["search.chunk_tokens=0"], "search.chunk_tokens"),
        (["search.top_p=1.5"], "search.top_p"),
        (["search.temperature=-1"], "search.temperature"),
        (["search.prune_ppl=0.5"], "search.prune_ppl"),
        (["search.selection=max"], "registered"),
        (["search.max_new_tokens=4096"], "search.max_new_tokens"),
        (["student.backend=onnx"], "student.backend"),
        (["teacher.num_gpus=1", "teacher.tensor_parallel_size=2"], "teacher.num_gpus"),
        (["prompt.instruction=no placeholder"], "prompt.instruction"),
        (["output.shard_size=0"], "output.shard_size"),
        (["runtime.call_timeout_s=0"], "runtime.call_timeout_s"),
        (["runtime.late_call_limit=0.5"], "runtime.late_call_limit"),
        (["runtime.scheduling_strategy=PACK"], "runtime.scheduling_strategy"),
        (["teacher.admission=auto"], "teacher.admission"),
        (["teacher.revision=v1"], "teacher.revision"),  # embedded:teacher is no hub id
        (["search.chunk_tokens"], "key=value"),
    ],
)
def test_bad_config_names_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, overrides)


def test_missing_config_file():
    with pytest.raises(ConfigError, match="no such file"):
        load_config("conf/does-not-exist.yaml")


def test_fingerprint_tracks_data_fields_only():
    base = fingerprint(load_config(None, []))
    assert fingerprint(load_config(None, ["teacher.num_engines=8", "data.limit=100", "output.dir=x"])) == base
    for o in [
        "search.seed=1",
        "search.chunk_tokens=32",
        "teacher.model=/m",
        "prompt.system=hi",
        "data.path=x.jsonl",
    ]:
        assert fingerprint(load_config(None, [o])) != base, o


def test_revision_and_subset_keys_change_the_fingerprint_only_when_set():
    hub = ["teacher.model=org/teacher", "student.model=org/student"]
    base = load_config(None, hub)
    assert base.teacher.revision is None and base.data.subset is None and base.data.revision is None
    assert fingerprint(load_config(None, [*hub, "data.split=train"])) != fingerprint(base)
    changed = {
        fingerprint(load_config(None, [*hub, o]))
        for o in ("teacher.revision=v1", "student.revision=v1", "data.subset=main", "data.revision=abc")
    }
    assert len(changed) == 4 and fingerprint(base) not in changed
