"""Shared fixtures. Integration tests build a tiny random Llama (SmolLM2 tokenizer) once per session."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


@pytest.fixture(scope="session")
def s3_endpoint() -> str:
    """One S3-compatible server on 127.0.0.1 for the session (tests/s3server.py)."""
    from tests.s3server import local_s3

    with local_s3() as endpoint:
        yield endpoint


@pytest.fixture
def s3_bucket(s3_endpoint, monkeypatch, request) -> str:
    """A fresh bucket on the session's S3 server, with the standard AWS environment pointing at it
    (set before the test starts Ray, so its workers inherit it); returns ``s3://<bucket>``."""
    import re
    import uuid

    from tests.s3server import make_bucket, s3_environ

    for k, v in s3_environ(s3_endpoint).items():
        monkeypatch.setenv(k, v)
    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-")
    return make_bucket(f"{name}-{uuid.uuid4().hex[:8]}", s3_endpoint)


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


@pytest.fixture(scope="session")
def chat_models(tmp_path_factory) -> dict[str, Path]:
    """Copies of the embedded teacher's config and tokenizer files (weights linked, not copied): "good",
    and "bare" without a chat template. For `prepare` checks that load no weights."""
    from gen_ssd_ray.common.models import resolve_model

    src, root = Path(resolve_model("embedded:teacher")), tmp_path_factory.mktemp("chat_models")
    good, bare = root / "good", root / "no-template"
    for dst in (good, bare):
        dst.mkdir()
        for f in src.iterdir():
            if f.name.endswith(".safetensors"):  # linked, never loaded by a prepare
                (dst / f.name).symlink_to(f)
            elif f.is_file():
                shutil.copyfile(f, dst / f.name)
    (bare / "chat_template.jinja").unlink()
    config = json.loads((bare / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    return {"good": good, "bare": bare}


@pytest.fixture
def one_problem(tmp_path) -> Path:
    """A JSONL file with one problem."""
    path = tmp_path / "problems.jsonl"
    path.write_text(json.dumps({"question": "1+1?", "answer": "x\n#### 2"}) + "\n")
    return path


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
