"""`make bench`: measure the generation job on the embedded default, print one JSON object.

In one run, on the same Ray actors:
1. Gen-SSD: the real job (driver, beam managers, teacher engine, student scorer) on `data.limit`
   problems, into a temporary output folder. Wall time includes scoring.
2. Plain batch sampling on the same teacher engine (prefix cache reset first): the same prompts,
   n = K samples of whole responses, repeated until at least as many tokens were generated.
Reports teacher tokens/s of both and their ratio, scorer tokens processed per token scored, the teacher prefix-cache hit rate, and the peak memory (PSS summed
over this process tree, which holds every Ray process of the private local cluster) sampled every
0.5 s. Then, after the actors are gone, the scorer's own figures (scripts/bench_scorer.py): the
simulated scorer at 512 live trajectories of 8k tokens, one real scorer's scored tokens/s with 64
trajectories in flight (calls alone versus batched), and score calls per scorer on the simulated
cluster with more scorers than engines.

    python -m scripts.bench [--config conf/default.yaml] key=value ...
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import threading
import time


class PeakMemory:
    """Samples the summed PSS (RSS where PSS is unavailable) of this process and its descendants."""

    def __init__(self, interval_s: float = 0.5):
        import psutil

        self.psutil, self.interval, self.peak = psutil, interval_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        me = self.psutil.Process()
        total = 0
        for p in [me, *me.children(recursive=True)]:
            try:
                info = p.memory_full_info()
                total += getattr(info, "pss", info.rss)
            except (self.psutil.NoSuchProcess, self.psutil.AccessDenied):
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def plain_sampling(teacher, prompts, search, target_tokens: int) -> tuple[int, float]:
    """Whole-response sampling of the same prompts (n = K, the search's sampling) until `target_tokens`
    are generated. Returns (tokens, seconds)."""
    import ray

    from gen_ssd_ray.core.types import ExpandRequest

    ray.get(teacher.actor.reset_prefix_cache.remote())
    generated, t0, rnd = 0, time.perf_counter(), 0
    while generated < target_tokens:
        requests = [
            ExpandRequest(
                key=f"plain{rnd}-{i}",
                prompt_token_ids=tuple(p),
                n=search.num_candidates,
                max_tokens=search.max_new_tokens,
                seed=search.seed + rnd,
                temperature=search.temperature,
                top_p=search.top_p,
            )
            for i, p in enumerate(prompts)
        ]
        outs = ray.get(teacher.call("generate", requests))
        tokens = sum(len(s.token_ids) for g in outs for s in g.samples)
        if not tokens:
            errors = sorted({g.error for g in outs if g.error})
            raise RuntimeError(f"plain sampling generated nothing (engine errors: {errors})")
        generated += tokens
        rnd += 1
    return generated, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.bench")
    parser.add_argument("--config", default="conf/default.yaml")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")

    import ray

    from gen_ssd_ray.common.cluster import init_ray
    from gen_ssd_ray.common.config import load_config
    from gen_ssd_ray.generate.config import GenerateConfig
    from gen_ssd_ray.generate.driver import prepare, run_generate
    from gen_ssd_ray.generate.pools import build_pools
    from scripts.bench_scorer import batched, routing, sim512

    with tempfile.TemporaryDirectory(prefix="gen-ssd-bench-") as out, PeakMemory() as mem:
        cfg = load_config(
            args.config, [*args.overrides, f"output.dir={out}", "runtime.progress=false"], GenerateConfig
        )
        prepared = prepare(cfg)
        init_ray(cfg.runtime.ray_address, cfg.runtime.local_num_cpus)
        t0 = time.perf_counter()
        pools = build_pools(cfg, prepared.teacher_path, prepared.student_path)
        startup_s = time.perf_counter() - t0

        t0 = time.perf_counter()
        summary = run_generate(cfg, prepared, pools=pools)
        gen_s = time.perf_counter() - t0
        gen_tokens = summary["teacher/tokens_generated"]
        teacher_stats = ray.get(pools.teachers[0].actor.stats.remote())

        # the same prompts, rendered exactly as the job rendered them
        import pandas as pd

        df = pd.read_parquet(out)
        df = df[df.status != "error"]
        manager = pools.managers[0]
        prompts = ray.get([manager.render_prompt_ids.remote(q) for q in df.question])
        plain_tokens, plain_s = plain_sampling(pools.teachers[0], prompts, cfg.search, gen_tokens)
        ray.shutdown()  # the scorer figures below run in this process, on the machine alone
        scorer_batched = batched(prepared.student_path, cfg)
        scorer_sim = sim512()
        scorer_routing = routing()

    gen_rate = gen_tokens / gen_s
    plain_rate = plain_tokens / plain_s
    result = {
        "config": args.config,
        "overrides": args.overrides,
        "problems": summary["problems_done_this_run"],
        "trajectories_by_status": summary["trajectories_by_status"],
        "startup_s": round(startup_s, 1),
        "gen_ssd/seconds": round(gen_s, 1),
        "gen_ssd/teacher_tokens": gen_tokens,
        "gen_ssd/teacher_tokens_per_s": round(gen_rate, 1),
        "plain/seconds": round(plain_s, 1),
        "plain/teacher_tokens": plain_tokens,
        "plain/teacher_tokens_per_s": round(plain_rate, 1),
        "teacher/throughput_ratio_gen_ssd_over_plain": round(gen_rate / plain_rate, 3),
        "target/throughput_ratio": ">= 0.85",
        "scorer/tokens_processed_per_scored": summary["scorer/tokens_processed_per_scored"],
        "target/scorer_ratio": "<= 1.1",
        "scorer/calls_max_over_min": scorer_routing["calls_max_over_min"],
        "target/calls_max_over_min": "<= 1.5 (simulated cluster, 2 engines, 4 scorers)",
        "scorer/tokens_processed_per_scored_sim512": scorer_sim["profile_eos"]["tokens_processed_per_scored"],
        "scorer/tokens_processed_per_scored_sim512_full_8k": scorer_sim["full_8k"][
            "tokens_processed_per_scored"
        ],
        "scorer/sim512_oom": scorer_sim["profile_eos"]["oom"] + scorer_sim["full_8k"]["oom"],
        "target/sim512": "<= 1.1, no out-of-memory",
        "scorer/scored_tokens_per_s_alone": scorer_batched["alone"]["scored_tokens_per_s"],
        "scorer/scored_tokens_per_s_batched": scorer_batched["batched"]["scored_tokens_per_s"],
        "scorer/batched_speedup": scorer_batched["speedup"],
        "target/batched_speedup": ">= 2",
        "teacher/prefix_cache_hit_rate": summary["teacher/prefix_cache_hit_rate"],
        "teacher/prefix_cache_hit_rate_engine": round(
            teacher_stats["cached_prompt_tokens"] / max(1, teacher_stats["prompt_tokens"]), 3
        ),
        "target/prefix_cache_hit_rate": ">= 0.8",
        "memory/peak_gb": round(mem.peak / 2**30, 2),
        "target/peak_gb": "<= 12",
    }
    result["scorer/details"] = {"sim512": scorer_sim, "routing": scorer_routing, "batched": scorer_batched}
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
