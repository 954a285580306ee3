"""Thin actor classes over engine backends, and starting and stopping them as Ray actors.

The classes are plain Python: `ray.remote` is applied in `start_actors`, with resources (num_cpus,
num_gpus), restarts and concurrency from the caller's config, never hard-coded on a class. Each actor
owns one backend, built by name from `gen_ssd_ray.engines.registry`, calls it only through the
protocols of `gen_ssd_ray.engines.base`, and counts what it did; it holds no backend-specific code.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

from gen_ssd_ray.common.config import EngineConfig
from gen_ssd_ray.common.errors import JobFailed, reason
from gen_ssd_ray.core.types import ExpandRequest
from gen_ssd_ray.engines.base import ScorerSpec


class TeacherEngine:
    """One teacher backend (`cfg.backend`). Many concurrent calls are batched by the engine."""

    def __init__(self, cfg: EngineConfig):
        from gen_ssd_ray.engines.registry import build_teacher

        self.cfg = cfg
        self.backend = build_teacher(cfg)
        self.calls = 0
        self.prompt_tokens = 0
        self.cached_prompt_tokens = 0
        self.generated_tokens = 0

    async def ready(self) -> dict[str, Any]:
        await self.backend.check_health()
        return {"pid": os.getpid(), "model": self.cfg.model, "backend": self.cfg.backend}

    async def expand(self, requests: Sequence[ExpandRequest]):
        results = await self.backend.expand(requests)
        self.calls += 1
        for r in results:
            self.prompt_tokens += r.prompt_tokens
            self.cached_prompt_tokens += r.cached_prompt_tokens
            self.generated_tokens += sum(len(c.token_ids) for c in r.candidates)
        return results

    async def generate(self, requests: Sequence[ExpandRequest]):
        """Whole responses with text and finish reason (evaluation, plain batch sampling)."""
        results = await self.backend.generate(requests)
        self.calls += 1
        self.prompt_tokens += sum(len(r.prompt_token_ids) for r in requests)
        self.generated_tokens += sum(len(s.token_ids) for g in results for s in g.samples)
        return results

    async def reset_prefix_cache(self) -> None:
        await self.backend.reset_prefix_cache()

    async def shutdown(self) -> None:
        """Stop the engine's processes cleanly before the actor goes away."""
        self.backend.shutdown()

    async def stats(self) -> dict[str, int]:
        return {
            "calls": self.calls,
            "prompt_tokens": self.prompt_tokens,
            "cached_prompt_tokens": self.cached_prompt_tokens,
            "generated_tokens": self.generated_tokens,
        }


class StudentScorer:
    """One scorer backend (`student.backend`) behind `score` and `release`."""

    def __init__(self, spec: ScorerSpec):
        from gen_ssd_ray.engines.registry import build_scorer

        self.spec = spec
        self.backend = build_scorer(spec)
        self.tokens_processed = 0
        self.tokens_scored = 0

    async def ready(self) -> dict[str, Any]:
        await self.backend.check_health()
        return {"pid": os.getpid(), "backend": self.spec.student.backend}

    async def score(self, requests):
        results = await self.backend.score(requests)
        self.tokens_processed += sum(r.tokens_processed for r in results)
        self.tokens_scored += sum(r.tokens_scored for r in results)
        return results

    async def release(self, groups) -> None:
        await self.backend.release(groups)

    async def shutdown(self) -> None:
        self.backend.shutdown()

    async def stats(self) -> dict[str, int]:
        return {"tokens_processed": self.tokens_processed, "tokens_scored": self.tokens_scored}


def engine_env(kv_cache_gib: float) -> dict[str, str]:
    """Environment for an engine actor: its CPU KV-cache size, and the driver's settings if any."""
    env = {"TOKENIZERS_PARALLELISM": "false", "VLLM_CPU_KVCACHE_SPACE": str(max(1, round(kv_cache_gib)))}
    for name in ("HF_HUB_OFFLINE", "VLLM_USE_AOT_COMPILE"):
        if name in os.environ:
            env[name] = os.environ[name]
    # vLLM's per-step INFO lines drown the job's progress; VLLM_LOGGING_LEVEL=INFO brings them back.
    env["VLLM_LOGGING_LEVEL"] = os.environ.get("VLLM_LOGGING_LEVEL", "WARNING")
    return env


def create_actors(cls: type, args: tuple, count: int, **options) -> list:
    """`count` actors of `cls(*args)` with Ray `options` (resources, restarts, concurrency, env)."""
    import ray

    actor_cls = ray.remote(cls).options(**options)
    return [actor_cls.remote(*args) for _ in range(count)]


def create_engine_pool(cfg: EngineConfig, model_path: str, max_concurrency: int) -> list:
    """`cfg.num_engines` TeacherEngine actors serving `model_path`, with the section's resources; one
    restart each (a restarted engine reloads its model), no task retries (the caller retries)."""
    return create_actors(
        TeacherEngine,
        (dataclasses.replace(cfg, model=model_path),),
        cfg.num_engines,
        num_cpus=cfg.num_cpus,
        num_gpus=cfg.num_gpus,
        max_restarts=1,
        max_task_retries=0,
        max_concurrency=max_concurrency,
        runtime_env={"env_vars": engine_env(cfg.kv_cache_gib)},
    )


def wait_ready(actors: Sequence, startup_timeout_s: float, what: str) -> None:
    """Wait until every actor answers `ready` (actors of several pools start in parallel).

    Raises JobFailed (after killing them) if one fails to start or misses `startup_timeout_s`; an
    interrupt kills them too and is re-raised, so no half-started engines are left behind.
    """
    import ray

    try:
        ray.get([a.ready.remote() for a in actors], timeout=startup_timeout_s)
    except BaseException as e:
        for a in actors:
            ray.kill(a)
        if not isinstance(e, Exception):
            raise
        raise JobFailed(
            f"{what} did not start ({reason(e)}); see the actor log above "
            f"(raise runtime.startup_timeout_s={startup_timeout_s:g} if loading is slow, or check the "
            "resources asked for: num_gpus / num_cpus)"
        ) from None


def stop_actors(actors: Sequence, timeout_s: float = 60.0) -> None:
    """Stop every engine cleanly (vLLM engine cores included), then release the actors."""
    import ray

    refs = [a.shutdown.remote() for a in actors]
    ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    for a in actors:
        ray.kill(a)
