"""Fingerprints, pinned: the value each job records for a few configs.

A fingerprint decides whether a re-run resumes in a folder or is refused, so a refactor that changed
these values would refuse every output folder written before it. The values were recorded before the
shared-job-layer refactor; change them only with a deliberate change of what identifies the data.
"""

import pytest

PINNED = {
    "generate/default": "a60884238f2524c6",
    "generate/standard_kd": "c3f836118860a63c",
    "generate/posthoc": "9ccc273dc33db32b",
    "generate/knobs": "e54e7aab64739f8e",
    "evaluate/default": "e59458793227c812",
    "evaluate/sampled": "6513271bae8a946a",
    "finetune/default": "cb697050bfae9ab8",
    "finetune/zero3": "3c5f1f70781bfece",
}


def generation_fingerprints() -> dict[str, str]:
    from gen_ssd_ray.common.config import load_config
    from gen_ssd_ray.generate.config import GenerateConfig, fingerprint

    out = {}
    for name, overrides in {
        "default": [],
        "standard_kd": ["method=standard_kd", "search.trajectories_per_problem=2"],
        "posthoc": ["method=posthoc_ppl", "search.trajectories_per_problem=4", "search.seed=3"],
        "knobs": ["search.chunk_tokens=32", "student.backend=vllm", "prompt.system=Be brief."],
    }.items():
        cfg = load_config(None, overrides, GenerateConfig)
        out[f"generate/{name}"] = fingerprint(cfg, {"teacher": "rev-t", "student": "rev-s"})
    return out


def evaluation_fingerprints() -> dict[str, str]:
    from gen_ssd_ray.common.config import load_config
    from gen_ssd_ray.common.data import Problem
    from gen_ssd_ray.evaluate.config import EvaluateConfig, evaluation_fingerprint

    problems = [Problem("a-0", "1+1?", "2"), Problem("a-1", None, None, "empty question")]
    out = {}
    for name, overrides in {"default": [], "sampled": ["sampling.temperature=0.6", "sampling.n=4"]}.items():
        cfg = load_config(None, overrides, schema_cls=EvaluateConfig)
        out[f"evaluate/{name}"] = evaluation_fingerprint(cfg, "rev-m", problems)
    return out


def training_fingerprints() -> dict[str, str]:
    from gen_ssd_ray.common.config import load_config
    from gen_ssd_ray.train.config import FinetuneConfig, train_fingerprint

    out = {}
    for name, overrides in {
        "default": [],
        "zero3": ["deepspeed.zero_stage=3", "optim.lr=2e-5", "runtime.num_workers=2", "output.dir=x"],
    }.items():
        cfg = load_config(None, overrides, schema_cls=FinetuneConfig)
        out[f"finetune/{name}"] = train_fingerprint(cfg, "rev-m", "rows-sig")
    return out


def all_fingerprints() -> dict[str, str]:
    return {**generation_fingerprints(), **evaluation_fingerprints(), **training_fingerprints()}


@pytest.mark.parametrize("name", sorted(PINNED))
def test_fingerprint_unchanged(name):
    assert all_fingerprints()[name] == PINNED[name]


def test_every_fingerprint_is_pinned():
    assert sorted(all_fingerprints()) == sorted(PINNED)


def test_model_revision_pinned(tmp_path):
    """A model's revision is part of every fingerprint: pinned like them (recorded when tokenizer, chat
    template, generation config and remote-code files joined it, by content)."""
    from gen_ssd_ray.common.models import model_revision
    from tests.test_model_identity import FILES, _folder

    assert model_revision(str(_folder(tmp_path, FILES))) == "420601c216db6284"
