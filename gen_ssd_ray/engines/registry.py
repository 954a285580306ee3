"""Backends by name. Adding a backend means adding one module and one entry here.

A teacher backend is built as `cls(cfg: EngineConfig)` (gen_ssd_ray.common.config; `cfg.model` is
the resolved model path); a scorer backend as `cls(spec: ScorerSpec)`. Both satisfy the protocols in
`gen_ssd_ray.engines.base`. Entries are "module:Class" strings so that nothing heavy is imported
until a backend is built.
"""

from __future__ import annotations

import importlib
from typing import Any

TEACHER_BACKENDS: dict[str, str] = {
    "vllm": "gen_ssd_ray.engines.teacher_vllm:VllmTeacher",
}
SCORER_BACKENDS: dict[str, str] = {
    # transformers, the accepted prefix's KV cache reused across chunks
    "hf": "gen_ssd_ray.engines.scorer_hf:HfScorer",
    # vLLM prompt_logprobs: recomputes the prefix at every chunk
    "vllm": "gen_ssd_ray.engines.scorer_vllm:VllmPromptLogprobScorer",
}


def _load(registry: dict[str, str], kind: str, name: str) -> type:
    if name not in registry:
        raise ValueError(f"unknown {kind} backend {name!r}; registered: {sorted(registry)}")
    module, _, attr = registry[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def build_teacher(cfg: Any):
    """The teacher backend `cfg.backend` over `cfg` (an EngineConfig with the model path resolved)."""
    return _load(TEACHER_BACKENDS, "teacher", cfg.backend)(cfg)


def build_scorer(spec: Any):
    """The scorer backend `spec.student.backend` over `spec` (a ScorerSpec)."""
    return _load(SCORER_BACKENDS, "scorer", spec.student.backend)(spec)
