"""Backends by name. Adding a backend means adding one module and one entry here.

A teacher backend is built as `cls(cfg: EngineConfig, context: EngineContext)`
(gen_ssd_ray.common.config; `cfg.model` is the resolved model path; the context is the engine's index
and the `sim` section); a scorer backend as `cls(spec: ScorerSpec, context: EngineContext)`. Both satisfy the protocols in
`gen_ssd_ray.engines.base`. Entries are "module:Class" strings so that nothing heavy is imported
until a backend is built.
"""

from __future__ import annotations

import importlib
from typing import Any

TEACHER_BACKENDS: dict[str, str] = {
    "vllm": "gen_ssd_ray.engines.teacher_vllm:VllmTeacher",
    # simulated: models time and memory of a continuous-batching engine (gen_ssd_ray.sim)
    "sim": "gen_ssd_ray.sim.teacher:SimTeacher",
}
SCORER_BACKENDS: dict[str, str] = {
    # transformers, the accepted prefix's KV cache reused across chunks
    "hf": "gen_ssd_ray.engines.scorer_hf:HfScorer",
    # vLLM prompt_logprobs, reading the prefix cache (only what the cache lacks is computed)
    "vllm": "gen_ssd_ray.engines.scorer_vllm:VllmPromptLogprobScorer",
    # simulated: models the hf scorer's time, cache and memory (gen_ssd_ray.sim)
    "sim": "gen_ssd_ray.sim.scorer:SimScorer",
}


def _load(registry: dict[str, str], kind: str, name: str) -> type:
    if name not in registry:
        raise ValueError(f"unknown {kind} backend {name!r}; registered: {sorted(registry)}")
    module, _, attr = registry[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def build_teacher(cfg: Any, context: Any = None):
    """The teacher backend `cfg.backend` over `cfg` (an EngineConfig with the model path resolved)."""
    from gen_ssd_ray.engines.base import EngineContext

    return _load(TEACHER_BACKENDS, "teacher", cfg.backend)(cfg, context or EngineContext())


def build_scorer(spec: Any, context: Any = None):
    """The scorer backend `spec.student.backend` over `spec` (a ScorerSpec)."""
    from gen_ssd_ray.engines.base import EngineContext

    return _load(SCORER_BACKENDS, "scorer", spec.student.backend)(
        spec, context or EngineContext(sim=spec.sim)
    )
