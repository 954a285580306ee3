"""Thin actor classes and the code that turns them into Ray actor pools.

The classes are plain Python: `ray.remote` is applied in `build_pools`, with resources (num_cpus,
num_gpus), restarts and concurrency from the config, never hard-coded on a class. Each actor owns
one engine backend (gen_ssd_ray.engines) and translates calls; the search lives in the BeamManager.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from typing import Any

from gen_ssd_ray.engines.scorer_hf import ScorerSpec
from gen_ssd_ray.engines.teacher_vllm import TeacherEngineSpec
from gen_ssd_ray.generate.config import GenerateConfig


class TeacherEngine:
    """One vLLM async engine. Many concurrent `expand` calls are batched by the engine."""

    def __init__(self, spec: TeacherEngineSpec):
        from gen_ssd_ray.engines.teacher_vllm import VllmTeacher

        self.spec = spec
        self.backend = VllmTeacher(spec)
        self.calls = 0
        self.prompt_tokens = 0
        self.cached_prompt_tokens = 0
        self.generated_tokens = 0

    async def ready(self) -> dict[str, Any]:
        await self.backend.check_health()
        return {"pid": os.getpid(), "model": self.spec.model}

    async def expand(self, requests):
        results = await self.backend.expand(requests)
        self.calls += 1
        for r in results:
            self.prompt_tokens += r.prompt_tokens
            self.cached_prompt_tokens += r.cached_prompt_tokens
            self.generated_tokens += sum(len(c.token_ids) for c in r.candidates)
        return results

    async def sample(self, prompts, n: int, max_tokens: int, seed: int | None = None):
        return await self.backend.sample(prompts, n, max_tokens, seed)

    async def generate(self, prompts, n: int, max_tokens: int, seed=None):
        """Whole responses with text and finish reason (`VllmTeacher.generate`), for evaluation."""
        results = await self.backend.generate(prompts, n, max_tokens, seed)
        self.calls += 1
        self.prompt_tokens += sum(len(p) for p in prompts)
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
    """The student behind `score`. HF scoring runs in a worker thread so health checks stay responsive."""

    def __init__(
        self,
        spec: ScorerSpec,
        backend: str = "hf",
        kv_cache_gib: float = 1.0,
        max_model_len: int = 2048,
        gpu_memory_utilization: float = 0.85,
        enforce_eager: bool = False,
    ):
        self.kind = backend
        if backend == "hf":
            from gen_ssd_ray.engines.scorer_hf import HfScorer

            self.backend = HfScorer(spec)
        else:
            from gen_ssd_ray.engines.scorer_vllm import VllmPromptLogprobScorer

            self.backend = VllmPromptLogprobScorer(
                spec, kv_cache_gib=kv_cache_gib, max_model_len=max_model_len
            )
        self._lock = asyncio.Lock()
        self.tokens_processed = 0
        self.tokens_scored = 0

    async def ready(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "backend": self.kind}

    async def score(self, requests):
        if self.kind == "hf":  # one forward at a time; the KV cache is not thread-safe
            async with self._lock:
                results = await asyncio.to_thread(self.backend.score, requests)
        else:  # vLLM batches concurrent calls itself
            results = await self.backend.score(requests)
        self.tokens_processed += sum(r.tokens_processed for r in results)
        self.tokens_scored += sum(r.tokens_scored for r in results)
        return results

    async def shutdown(self) -> None:
        if hasattr(self.backend, "shutdown"):
            self.backend.shutdown()

    async def release(self, groups) -> None:
        async with self._lock:
            self.backend.release(groups)

    async def stats(self) -> dict[str, int]:
        return {"tokens_processed": self.tokens_processed, "tokens_scored": self.tokens_scored}


@dataclass
class Pools:
    teachers: list
    scorers: list
    managers: list


def teacher_spec(cfg: GenerateConfig, model_path: str) -> TeacherEngineSpec:
    t, q = cfg.teacher, cfg.search
    return TeacherEngineSpec(
        model=model_path,
        dtype=t.dtype,
        max_model_len=t.max_model_len,
        tensor_parallel_size=t.tensor_parallel_size,
        gpu_memory_utilization=t.gpu_memory_utilization,
        kv_cache_gib=t.kv_cache_gib,
        enable_prefix_caching=t.enable_prefix_caching,
        block_size=t.block_size,
        max_num_seqs=t.max_num_seqs,
        enforce_eager=t.enforce_eager,
        trust_remote_code=t.trust_remote_code,
        temperature=q.temperature,
        top_p=q.top_p,
        seed=q.seed,
    )


def scorer_spec(cfg: GenerateConfig, student_path: str, teacher_path: str) -> ScorerSpec:
    s = cfg.student
    return ScorerSpec(
        model=student_path,
        teacher_model=teacher_path,
        dtype=s.dtype,
        kv_cache_tokens=s.kv_cache_tokens,
        num_threads=s.num_threads,
        trust_remote_code=s.trust_remote_code,
    )


def _engine_env(kv_cache_gib: float) -> dict[str, str]:
    """Environment for an engine actor: its CPU KV-cache size, and the driver's settings if any."""
    env = {"TOKENIZERS_PARALLELISM": "false", "VLLM_CPU_KVCACHE_SPACE": str(max(1, round(kv_cache_gib)))}
    for name in ("HF_HUB_OFFLINE", "VLLM_USE_AOT_COMPILE"):
        if name in os.environ:
            env[name] = os.environ[name]
    # vLLM's per-step INFO lines drown the job's progress; VLLM_LOGGING_LEVEL=INFO brings them back.
    env["VLLM_LOGGING_LEVEL"] = os.environ.get("VLLM_LOGGING_LEVEL", "WARNING")
    return env


def build_pools(cfg: GenerateConfig, teacher_path: str, student_path: str) -> Pools:
    """Start teacher, scorer and beam-manager actors with resources from the config; wait until ready."""
    import ray

    t, s, r = cfg.teacher, cfg.student, cfg.runtime

    teacher_cls = ray.remote(TeacherEngine).options(
        num_cpus=t.num_cpus,
        num_gpus=t.num_gpus,
        max_restarts=1,
        max_task_retries=0,
        max_concurrency=max(
            64, 2 * t.max_inflight_problems * cfg.search.beam_width * cfg.search.trajectories_per_problem
        ),
        runtime_env={"env_vars": _engine_env(t.kv_cache_gib)},
    )
    scorer_cls = ray.remote(StudentScorer).options(
        num_cpus=s.num_cpus,
        num_gpus=s.num_gpus,
        max_restarts=1,
        max_task_retries=0,
        max_concurrency=1000,
        runtime_env={"env_vars": _engine_env(s.kv_cache_gib)},
    )
    tspec = teacher_spec(cfg, teacher_path)
    sspec = scorer_spec(cfg, student_path, teacher_path)
    teachers = [teacher_cls.remote(tspec) for _ in range(t.num_engines)]
    scorers = [
        scorer_cls.remote(
            sspec, s.backend, s.kv_cache_gib, t.max_model_len, s.gpu_memory_utilization, s.enforce_eager
        )
        for _ in range(s.num_scorers)
    ]
    ray.get([a.ready.remote() for a in teachers + scorers], timeout=r.startup_timeout_s)
    return Pools(teachers, scorers, build_managers(cfg, teacher_path, student_path, teachers, scorers))


def build_managers(
    cfg: GenerateConfig, teacher_path: str, student_path: str, teachers: list, scorers: list
) -> list:
    """Beam-manager actors for `cfg` (its method and search knobs) over existing engines; waits until ready.

    A caller that runs several configs on the same engines (the pipeline's methods) builds new managers
    per config and keeps the engines."""
    import ray

    from gen_ssd_ray.generate.manager import BeamManager, ManagerSpec

    r = cfg.runtime
    mspec = ManagerSpec.from_config(cfg, teacher_path, student_path)
    # No restarts: a dead manager's problems are re-queued by the driver onto the live managers.
    manager_cls = ray.remote(BeamManager).options(
        num_cpus=r.manager_num_cpus,
        max_concurrency=100_000,
        max_restarts=0,
        runtime_env={"env_vars": _engine_env(cfg.teacher.kv_cache_gib)},
    )
    managers = [manager_cls.remote(mspec, teachers, scorers) for _ in range(r.num_beam_managers)]
    ray.get([m.ready.remote() for m in managers], timeout=r.startup_timeout_s)
    return managers


def shutdown_pools(pools: Pools, timeout_s: float = 60.0) -> None:
    """Stop every engine cleanly (vLLM engine cores included), then release the actors."""
    import ray

    refs = [a.shutdown.remote() for a in pools.teachers + pools.scorers]
    ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    for a in pools.teachers + pools.scorers + pools.managers:
        ray.kill(a)
