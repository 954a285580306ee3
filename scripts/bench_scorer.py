"""The scorer's figures for `make bench` (also runnable alone; prints one JSON object).

1. `sim512`: the simulated hf scorer (gen_ssd_ray.sim.scorer, the H100 profile: a 1.5B student, 2.4M
   tokens of KV) driven by 512 live trajectories at once, 8k-token contexts, K = 4 x 256-token chunks
   (gen_ssd_ray.sim.scorer_load): tokens processed per token scored, evictions, out-of-memory. Twice:
   trace lengths from the profile's EOS rate (as the simulated teacher ends them), and every
   trajectory running to the full 8k (the worst case, which 2.4M tokens cannot hold at 512).
2. `batched`: the real hf scorer on this CPU (the job's student) with 64 live trajectories at the
   default's chunk, K and response length: scored tokens per second with each call run alone
   (`student.batch_tokens=1`) and batched (the configured `student.batch_tokens`).
3. `routing`: the real job on the simulated cluster (gen_ssd_ray.sim) with 2 teacher engines and 4
   scorers, more scorers than engines: score calls answered per scorer, and max over min.

    python -m scripts.bench_scorer [--config conf/default.yaml] key=value ...
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

LIVE_SIM = 512
LIVE_CPU = 64


def sim512(batch_tokens: int = 16384) -> dict:
    from gen_ssd_ray.common.config import SimConfig
    from gen_ssd_ray.engines.base import ScorerSpec
    from gen_ssd_ray.generate.config import StudentConfig
    from gen_ssd_ray.sim.profile import load_profile
    from gen_ssd_ray.sim.scorer import SimScorer
    from gen_ssd_ray.sim.scorer_load import ScorerLoad, drive

    sim = SimConfig(profile="h100", time_compression=1e7, model_load=False)
    student = StudentConfig(model="embedded:student", backend="sim", batch_tokens=batch_tokens)
    eos = load_profile("h100").teacher.eos_prob
    out = {}
    for name, p in (("profile_eos", eos), ("full_8k", 0.0)):
        scorer = SimScorer(ScorerSpec(student, teacher_model="sim", sim=sim))
        out[name] = asyncio.run(drive(scorer, ScorerLoad(live=LIVE_SIM, eos_prob=p)))
    return out


def batched(student_path: str, cfg, rounds: int = 6) -> dict:
    """Scored tokens/s of one real hf scorer, calls alone versus batched."""
    import dataclasses

    from gen_ssd_ray.engines.base import ScorerSpec
    from gen_ssd_ray.engines.scorer_hf import HfScorer
    from gen_ssd_ray.generate.config import search_params
    from gen_ssd_ray.sim.scorer_load import ScorerLoad, drive

    run = search_params(cfg)
    out = {}
    for name, tokens in (("alone", 1), ("batched", cfg.student.batch_tokens)):
        student = dataclasses.replace(cfg.student, model=student_path, batch_tokens=tokens)
        scorer = HfScorer(ScorerSpec(student, teacher_model=student_path, device="cpu"))
        load = ScorerLoad(
            live=LIVE_CPU,
            context_tokens=cfg.search.max_new_tokens,
            chunk_tokens=cfg.search.chunk_tokens,
            num_candidates=run.num_candidates,
            prompt_tokens=150,
            rounds=rounds,
            warmup_rounds=2,
            vocab_size=scorer.vocab,
        )
        t0 = time.perf_counter()
        before = dict(scorer.stats)
        figures = asyncio.run(drive(scorer, load))
        seconds = scorer.stats["seconds"] - before["seconds"]
        scored = scorer.stats["tokens_scored"] - before["tokens_scored"]
        figures["wall_s"] = round(time.perf_counter() - t0, 1)
        figures["scored_tokens_per_s"] = round(scored / max(seconds, 1e-9), 1)
        out[name] = figures
        scorer.shutdown()
    out["speedup"] = round(out["batched"]["scored_tokens_per_s"] / out["alone"]["scored_tokens_per_s"], 2)
    return out


def routing(problems: int = 128) -> dict:
    """Score calls per scorer in a simulated-cluster run with more scorers than teacher engines."""
    import tempfile
    from pathlib import Path

    from gen_ssd_ray.sim.harness import SimCluster, run, sim_config, write_problems
    from gen_ssd_ray.sim.scenarios import base_overrides

    with tempfile.TemporaryDirectory(prefix="gen-ssd-routing-") as tmp, SimCluster(nodes=2) as cluster:
        path = write_problems(Path(tmp) / "problems.jsonl", problems)
        overrides = base_overrides(Path(tmp), "routing", cluster.address, path, short=True)
        cfg = sim_config([*overrides, "teacher.num_engines=2", "student.num_scorers=4"])
        r = run(cfg)
    s = r.summary
    return {
        "teacher_engines": 2,
        "scorers": 4,
        "problems": problems,
        "error": r.error,
        "calls": s.get("scorer/calls"),
        "calls_max_over_min": s.get("scorer/calls_max_over_min"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.bench_scorer")
    parser.add_argument("--config", default="conf/default.yaml")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)

    from gen_ssd_ray.common.config import load_config
    from gen_ssd_ray.generate.config import GenerateConfig
    from gen_ssd_ray.generate.driver import prepare

    cfg = load_config(args.config, args.overrides, GenerateConfig)
    prepared = prepare(cfg)
    figures = {"sim512": sim512(), "routing": routing(), "batched": batched(prepared.student_path, cfg)}
    print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
