"""Shared fixtures. Integration tests build a tiny random Llama (SmolLM2 tokenizer) once per session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A 2-layer random Llama (hidden 128, head_dim 32) with the teacher's tokenizer and chat template."""
    from gen_ssd_ray.common.embedded_models import build_tiny_model

    return str(build_tiny_model(tmp_path_factory.mktemp("models") / "tiny", seed=0))


@pytest.fixture(scope="session")
def tiny_student(tmp_path_factory) -> str:
    """A different random tiny model (1 layer) sharing the tokenizer: a student for the tiny teacher."""
    from gen_ssd_ray.common.embedded_models import build_tiny_model

    return str(build_tiny_model(tmp_path_factory.mktemp("models") / "tiny_student", num_layers=1, seed=1))


def pytest_collection_modifyitems(config, items):
    """GPU tests run only where CUDA is available."""
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
