"""Thin actor classes over engine backends, and starting and stopping them as Ray actors.

The classes are plain Python: `ray.remote` is applied in `start_actors`, with resources (num_cpus,
num_gpus), restarts and concurrency from the caller's config, never hard-coded on a class. Each actor
owns one backend, built by name from `gen_ssd_ray.engines.registry`, calls it only through the
protocols of `gen_ssd_ray.engines.base`, and counts what it did; it holds no backend-specific code.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from gen_ssd_ray.common.config import EngineConfig, SimConfig
from gen_ssd_ray.common.errors import JobFailed, JobInterrupted, reason
from gen_ssd_ray.core.types import Candidate, ExpandRequest, ScoreRequest
from gen_ssd_ray.engines.base import EngineContext, EngineDead, ScorerSpec


class _Slots:
    """What both actor classes share: one backend per slot (virtual engines sharing one process: the
    simulated backends run many per actor; a real engine has one slot), and what to do when an
    engine core dies inside this live actor (EngineDead): answer the call with the error, then end
    the process so that Ray restarts the actor with fresh engines (`max_restarts`)."""

    backends: list

    async def _run(self, coro):
        try:
            return await coro
        except EngineDead:
            asyncio.get_running_loop().call_later(0.2, os._exit, 1)
            raise

    async def check_health(self) -> None:
        for b in self.backends:
            await self._run(b.check_health())

    async def progress(self, slot: int = 0) -> int:
        """The slot's work counter (a late caller tells a busy engine from a hung one)."""
        return int(self.backends[slot].progress())

    async def ping(self, _=None, slot: int = 0) -> None:
        """A minimal unit of real work through the slot's engine (one token generated or scored): a
        probe that a hung engine fails even while its actor answers. Not counted in `stats`."""
        await self._run(self._ping(self.backends[slot]))

    async def _ping(self, backend) -> None:
        raise NotImplementedError

    async def shutdown(self) -> None:
        """Stop the engines' processes cleanly before the actor goes away."""
        for b in self.backends:
            b.shutdown()


class TeacherEngine(_Slots):
    """`slots` teacher backends (`cfg.backend`), engines `first_index .. first_index + slots - 1` of
    the pool. Many concurrent calls are batched by each engine."""

    def __init__(self, cfg: EngineConfig, first_index: int = 0, slots: int = 1, sim: SimConfig | None = None):
        from gen_ssd_ray.common.models import localize_model
        from gen_ssd_ray.engines.registry import build_teacher

        # A model folder on an object store is downloaded once on this node (gen_ssd_ray.common.models).
        cfg = dataclasses.replace(cfg, model=localize_model(cfg.model))
        self.cfg = cfg
        again = _restarted()
        self.backends = [build_teacher(cfg, EngineContext(first_index + j, sim, again)) for j in range(slots)]
        self.calls = 0
        self.prompt_tokens = 0
        self.cached_prompt_tokens = 0
        self.generated_tokens = 0

    async def ready(self) -> dict[str, Any]:
        await self.check_health()
        return {
            "pid": os.getpid(),
            "model": self.cfg.model,
            "backend": self.cfg.backend,
            "node_id": _node_id(),
            "capacity": [b.capacity() for b in self.backends],
        }

    async def expand(self, requests: Sequence[ExpandRequest], slot: int = 0):
        results = await self._run(self.backends[slot].expand(requests))
        self.calls += 1
        for r in results:
            self.prompt_tokens += r.prompt_tokens
            self.cached_prompt_tokens += r.cached_prompt_tokens
            self.generated_tokens += sum(len(c.token_ids) for c in r.candidates)
        return results

    async def _ping(self, backend) -> None:
        await backend.expand([ExpandRequest("ping", (1,), 1, 1, 0, temperature=0.0, top_p=1.0)])

    async def generate(self, requests: Sequence[ExpandRequest], slot: int = 0):
        """Whole responses with text and finish reason (evaluation, plain batch sampling)."""
        results = await self._run(self.backends[slot].generate(requests))
        self.calls += 1
        self.prompt_tokens += sum(len(r.prompt_token_ids) for r in requests)
        self.generated_tokens += sum(len(s.token_ids) for g in results for s in g.samples)
        return results

    async def reset_prefix_cache(self, slot: int | None = None) -> None:
        for b in self.backends if slot is None else [self.backends[slot]]:
            await b.reset_prefix_cache()

    async def stats(self) -> dict[str, Any]:
        return {
            "calls": self.calls,
            "prompt_tokens": self.prompt_tokens,
            "cached_prompt_tokens": self.cached_prompt_tokens,
            "generated_tokens": self.generated_tokens,
            "backends": [getattr(b, "stats", None) for b in self.backends],
        }


class StudentScorer(_Slots):
    """`slots` scorer backends (`student.backend`) behind `score` and `release`."""

    def __init__(self, spec: ScorerSpec, first_index: int = 0, slots: int = 1):
        from gen_ssd_ray.common.models import localize_model
        from gen_ssd_ray.engines.registry import build_scorer

        # Model folders on an object store are downloaded once on this node (gen_ssd_ray.common.models).
        spec = dataclasses.replace(
            spec,
            student=dataclasses.replace(spec.student, model=localize_model(spec.student.model)),
            teacher_model=localize_model(spec.teacher_model),
        )
        self.spec = spec
        again = _restarted()
        self.backends = [
            build_scorer(spec, EngineContext(first_index + j, spec.sim, again)) for j in range(slots)
        ]
        self.tokens_processed = 0
        self.tokens_scored = 0

    async def ready(self) -> dict[str, Any]:
        await self.check_health()
        return {
            "pid": os.getpid(),
            "backend": self.spec.student.backend,
            "node_id": _node_id(),
            # what each scorer holds ({} from a backend that reports nothing: vllm)
            "capacity": [b.capacity() if hasattr(b, "capacity") else {} for b in self.backends],
        }

    async def score(self, requests, slot: int = 0):
        results = await self._run(self.backends[slot].score(requests))
        self.tokens_processed += sum(r.tokens_processed for r in results)
        self.tokens_scored += sum(r.tokens_scored for r in results)
        return results

    async def release(self, groups, slot: int = 0) -> None:
        await self.backends[slot].release(groups)

    async def _ping(self, backend) -> None:
        group = "\0ping"
        try:
            await backend.score(
                [ScoreRequest("ping", group, (1,), (), "", (Candidate((1,), " 1", "length"),))]
            )
        finally:
            await backend.release([group])

    async def stats(self) -> dict[str, Any]:
        return {
            "tokens_processed": self.tokens_processed,
            "tokens_scored": self.tokens_scored,
            "backends": [getattr(b, "stats", None) for b in self.backends],
        }


@dataclass(frozen=True)
class EngineRef:
    """One engine of a pool: an actor and the slot (virtual engine) inside it. `call(method, *args)`
    is `actor.method.remote(*args, slot=slot)`."""

    actor: Any
    slot: int = 0

    def call(self, method: str, *args):
        return getattr(self.actor, method).remote(*args, slot=self.slot)


def _restarted() -> bool:
    try:
        import warnings

        import ray

        with warnings.catch_warnings():  # Ray's own deprecated access inside this property
            warnings.simplefilter("ignore")
            return bool(ray.get_runtime_context().was_current_actor_reconstructed)
    except Exception:  # pragma: no cover - outside Ray
        return False


def _node_id() -> str | None:
    try:
        import ray

        return ray.get_runtime_context().get_node_id()
    except Exception:  # pragma: no cover - outside Ray
        return None


# "0" in the driver's environment when actors start: their engines export no metrics of their own
# (gen_ssd_ray.generate.metrics.engine_metrics sets it from `runtime.metrics`).
METRICS_ENV = "GEN_SSD_METRICS"


def engine_env(kv_cache_gib: float) -> dict[str, str]:
    """Environment for an engine actor: its CPU KV-cache size, and the driver's settings if any."""
    env = {"TOKENIZERS_PARALLELISM": "false", "VLLM_CPU_KVCACHE_SPACE": str(max(1, round(kv_cache_gib)))}
    for name in ("HF_HUB_OFFLINE", "VLLM_USE_AOT_COMPILE", METRICS_ENV):
        if name in os.environ:
            env[name] = os.environ[name]
    # vLLM's per-step INFO lines drown the job's progress; VLLM_LOGGING_LEVEL=INFO brings them back.
    env["VLLM_LOGGING_LEVEL"] = os.environ.get("VLLM_LOGGING_LEVEL", "WARNING")
    return env


def create_actors(
    cls: type, args: tuple, count: int, per_actor: Callable[[int], dict] | None = None, **options
) -> list:
    """`count` actors of `cls(*args, **per_actor(i))` with Ray `options` (resources, restarts,
    concurrency, env, scheduling strategy)."""
    import ray

    actor_cls = ray.remote(cls).options(**options)
    return [actor_cls.remote(*args, **(per_actor(i) if per_actor else {})) for i in range(count)]


def pool_actors(num_engines: int, slots: int) -> list[tuple[int, int]]:
    """(first engine index, slots) of each actor hosting `num_engines` engines, `slots` per actor."""
    return [(first, min(slots, num_engines - first)) for first in range(0, num_engines, slots)]


def pool_demands(cfg: EngineConfig, slots: int, what: str, section: str | None) -> list:
    """What a pool of `cfg.num_engines` engines, `slots` per actor, asks of the cluster
    (gen_ssd_ray.common.cluster.Demand per actor size); `section` names the config keys."""
    from gen_ssd_ray.common.cluster import actor_demand

    prefix = f"{section}." if section else "the engine section's "
    keys = f"{prefix}num_engines / {prefix}num_cpus / {prefix}num_gpus" + (
        " / sim.engines_per_actor" if slots > 1 else ""
    )
    sizes: dict[int, int] = {}
    for _, n in pool_actors(cfg.num_engines, slots):
        sizes[n] = sizes.get(n, 0) + 1
    return [
        actor_demand(
            what if n == 1 else f"{what} ({n} per actor)",
            count,
            keys,
            num_cpus=cfg.num_cpus * n,
            num_gpus=cfg.num_gpus * n,
        )
        for n, count in sizes.items()
    ]


def create_engine_pool(
    cfg: EngineConfig,
    model_path: str,
    max_concurrency: int,
    *,
    sim: SimConfig | None = None,
    max_restarts: int = -1,
    scheduling_strategy: str = "SPREAD",
    section: str | None = None,
) -> list[EngineRef]:
    """The `cfg.num_engines` engines of a pool serving `model_path`, as EngineRefs (`max_concurrency`
    calls per engine).

    One TeacherEngine actor per engine, or `sim.engines_per_actor` simulated engines per actor; each
    actor asks for the section's resources times its engines. Actors are spread over nodes (one
    node's loss costs its share; `scheduling_strategy="DEFAULT"` packs them instead), restart up to `max_restarts` times (-1: always; a restarted engine
    reloads its model) and never retry tasks (the caller retries elsewhere).

    Raises ResourcesError (gen_ssd_ray.common.cluster.check_fits) before creating anything if the pool
    can never be placed on a fixed cluster; `section` (teacher, model) names the keys to change.
    """
    from gen_ssd_ray.common.cluster import check_fits

    slots = sim.engines_per_actor if sim is not None else 1
    check_fits(pool_demands(cfg, slots, "engines", section))
    layout = pool_actors(cfg.num_engines, slots)
    actors = [
        create_actors(
            TeacherEngine,
            (dataclasses.replace(cfg, model=model_path), first, n, sim),
            1,
            num_cpus=cfg.num_cpus * n,
            num_gpus=cfg.num_gpus * n,
            max_restarts=max_restarts,
            max_task_retries=0,
            max_concurrency=max_concurrency * n,  # per engine
            scheduling_strategy=scheduling_strategy,
            runtime_env={"env_vars": engine_env(cfg.kv_cache_gib)},
        )[0]
        for first, n in layout
    ]
    return [EngineRef(a, j) for a, (_, n) in zip(actors, layout, strict=True) for j in range(n)]


def actors_of(refs: Sequence[EngineRef]) -> list:
    """The distinct actors behind a pool's engines, in order."""
    seen: dict = {}
    for r in refs:
        seen.setdefault(r.actor, None)
    return list(seen)


def wait_ready(actors: Sequence, startup_timeout_s: float, what: str, poll_s: float = 0.5) -> None:
    """Wait until every actor answers `ready` (actors of several pools start in parallel).

    Raises JobFailed (after killing them) if one fails to start or misses `startup_timeout_s`. The
    wait polls every `poll_s` seconds, so a signal ends it at once: KeyboardInterrupt under a raising
    handler, JobInterrupted under `stop_on_signals()` (gen_ssd_ray.common.interrupts.check_stop);
    either way the actors are killed and the interrupt re-raised, so no half-started engines are left.
    """
    import time

    import ray

    from gen_ssd_ray.common.interrupts import check_stop

    deadline = time.monotonic() + startup_timeout_s
    logging.getLogger(__name__).info("waiting for %s to start (up to %g s)", what, startup_timeout_s)
    try:
        pending = [a.ready.remote() for a in actors]
        while pending:
            check_stop(what)
            left = deadline - time.monotonic()
            if left <= 0:
                raise ray.exceptions.GetTimeoutError(f"not ready after {startup_timeout_s:g} s")
            done, pending = ray.wait(pending, num_returns=len(pending), timeout=min(poll_s, left))
            ray.get(done)  # raises the error of an actor that failed to start
    except BaseException as e:
        for a in actors:
            ray.kill(a)
        if not isinstance(e, Exception) or isinstance(e, JobInterrupted):
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
