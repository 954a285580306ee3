"""The generation job's actors: teacher engines, student scorers and beam managers, with resources
from the config (gen_ssd_ray.engines.actors starts and stops them)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from gen_ssd_ray.engines.actors import (
    EngineRef,
    StudentScorer,
    actors_of,
    create_actors,
    create_engine_pool,
    engine_env,
    pool_actors,
    pool_demands,
    stop_actors,
    wait_ready,
)
from gen_ssd_ray.engines.base import ScorerSpec
from gen_ssd_ray.generate.config import GenerateConfig


@dataclass
class Pools:
    """The job's actors: teacher engines and scorers as EngineRefs (an actor and a slot: simulated
    engines share actors), beam managers as actor handles."""

    teachers: list[EngineRef]
    scorers: list[EngineRef]
    managers: list


def build_pools(cfg: GenerateConfig, teacher_path: str, student_path: str) -> Pools:
    """Start teacher, scorer and beam-manager actors with resources from the config; wait until ready.

    Raises ResourcesError (exit 2) before starting anything if the engines, scorers and managers can
    never be placed together on a fixed cluster (`check_resources`), JobFailed if an engine does not
    start within runtime.startup_timeout_s."""
    t, s, r, q = cfg.teacher, cfg.student, cfg.effective().runtime, cfg.search
    sim = cfg.sim if "sim" in (t.backend, s.backend) else None
    check_resources(cfg)
    concurrency = max(64, 2 * t.max_inflight_problems * q.beam_width * q.trajectories_per_problem)
    teachers = create_engine_pool(
        t,
        teacher_path,
        concurrency,
        sim=sim if t.backend == "sim" else None,
        max_restarts=r.max_actor_restarts,
        scheduling_strategy=r.scheduling_strategy,
        section="teacher",
    )
    spec = ScorerSpec(dataclasses.replace(s, model=student_path), teacher_path, t.max_model_len, sim=sim)
    slots = sim.engines_per_actor if s.backend == "sim" and sim is not None else 1
    layout = pool_actors(s.num_scorers, slots)
    scorer_actors = create_actors(
        StudentScorer,
        (spec,),
        len(layout),
        per_actor=lambda i: {"first_index": layout[i][0], "slots": layout[i][1]},
        num_cpus=s.num_cpus * slots,
        num_gpus=s.num_gpus * slots,
        max_restarts=r.max_actor_restarts,
        max_task_retries=0,
        max_concurrency=max(1000, concurrency) * slots,
        scheduling_strategy=r.scheduling_strategy,
        runtime_env={"env_vars": engine_env(s.kv_cache_gib)},
    )
    scorers = [EngineRef(a, j) for a, (_, n) in zip(scorer_actors, layout, strict=True) for j in range(n)]
    wait_ready(
        actors_of(teachers) + scorer_actors,
        r.startup_timeout_s,
        f"the teacher engines ({teacher_path}) or scorers ({student_path})",
    )
    return Pools(teachers, scorers, build_managers(cfg, teacher_path, student_path, teachers, scorers))


def demands(cfg: GenerateConfig, managers: bool = True) -> list:
    """What the job's actors ask of the cluster, all together (gen_ssd_ray.common.cluster.Demand)."""
    from gen_ssd_ray.common.cluster import actor_demand

    t, s, r = cfg.teacher, cfg.student, cfg.effective().runtime
    sim = cfg.sim if "sim" in (t.backend, s.backend) else None
    t_slots = sim.engines_per_actor if t.backend == "sim" and sim is not None else 1
    s_slots = sim.engines_per_actor if s.backend == "sim" and sim is not None else 1
    out = pool_demands(t, t_slots, "teacher engines", "teacher")
    sizes: dict[int, int] = {}
    for _, n in pool_actors(s.num_scorers, s_slots):
        sizes[n] = sizes.get(n, 0) + 1
    keys = "student.num_scorers / student.num_cpus / student.num_gpus" + (
        " / sim.engines_per_actor" if s_slots > 1 else ""
    )
    out += [
        actor_demand(
            "scorers" if n == 1 else f"scorers ({n} per actor)",
            count,
            keys,
            num_cpus=s.num_cpus * n,
            num_gpus=s.num_gpus * n,
        )
        for n, count in sizes.items()
    ]
    if managers:
        out.append(
            actor_demand(
                "beam managers",
                r.num_beam_managers,
                "runtime.num_beam_managers / runtime.manager_num_cpus / runtime.manager_memory_gib",
                num_cpus=r.manager_num_cpus,
                memory=int(r.manager_memory_gib * 2**30),
            )
        )
    return out


def check_resources(cfg: GenerateConfig) -> None:
    """ResourcesError (exit 2, in seconds) if the job's engines, scorers and beam managers can never be
    placed together on this fixed cluster (gen_ssd_ray.common.cluster.check_fits)."""
    from gen_ssd_ray.common.cluster import check_fits

    check_fits(demands(cfg))


def build_managers(
    cfg: GenerateConfig, teacher_path: str, student_path: str, teachers: list, scorers: list
) -> list:
    """Beam-manager actors for `cfg` (its method and search knobs) over existing engines; waits until ready.

    A caller that runs several configs on the same engines (the pipeline's methods) builds new managers
    per config and keeps the engines."""
    from gen_ssd_ray.generate.manager import BeamManager, ManagerSpec

    r = cfg.effective().runtime
    # A manager that dies (with its node) is restarted by Ray; meanwhile the driver re-queues its
    # problems onto the others and lets it cool down (generate.solve.Managers).
    managers = create_actors(
        BeamManager,
        (ManagerSpec.from_config(cfg.effective(), teacher_path, student_path), teachers, scorers),
        r.num_beam_managers,
        num_cpus=r.manager_num_cpus,
        memory=int(r.manager_memory_gib * 2**30) or None,
        scheduling_strategy=r.scheduling_strategy,
        max_concurrency=100_000,
        max_restarts=r.max_actor_restarts,
        max_task_retries=0,
        runtime_env={"env_vars": engine_env(cfg.teacher.kv_cache_gib)},
    )
    wait_ready(managers, r.startup_timeout_s, "the beam managers")
    return managers


def shutdown_pools(pools: Pools, timeout_s: float = 60.0) -> None:
    """Stop every engine cleanly (vLLM engine cores included), then release all actors."""
    import ray

    stop_actors(actors_of(pools.teachers) + actors_of(pools.scorers), timeout_s)
    for m in pools.managers:
        ray.kill(m)
