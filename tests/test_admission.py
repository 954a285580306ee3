"""Admission per teacher engine follows its KV capacity and the problems' context length."""

from gen_ssd_ray.common.config import derive
from gen_ssd_ray.generate.admission import inflight_per_engine
from gen_ssd_ray.generate.config import GenerateConfig


def _cfg(**changes) -> GenerateConfig:
    return derive(GenerateConfig(), {"teacher.max_inflight_problems": 10_000, **changes})


def test_a_32b_engine_holds_tens_of_long_problems():
    # 800k KV tokens (4 x H100, conf/sim/h100.yaml), 256 seqs x 256-token chunks, 8k-16k budgets
    # (every problem counted at its full budget: 8k-16k prefixes, 40 to 80 problems)
    cfg = _cfg(**{"search.chunk_tokens": 256, "search.max_new_tokens": 16384})
    assert 35 <= inflight_per_engine(cfg, 800_000, 256, 300) <= 45
    cfg = _cfg(**{"search.chunk_tokens": 256, "search.max_new_tokens": 8192})
    assert 70 <= inflight_per_engine(cfg, 800_000, 256, 300) <= 85


def test_more_trajectories_or_longer_prompts_admit_fewer():
    base = _cfg(**{"search.max_new_tokens": 4096})
    n = inflight_per_engine(base, 800_000, 256, 200)
    assert (
        inflight_per_engine(derive(base, {"search.trajectories_per_problem": 4}), 800_000, 256, 200) < n / 3
    )
    assert inflight_per_engine(base, 800_000, 256, 2000) < n


def test_bounds():
    cfg = _cfg(**{"teacher.max_inflight_problems": 32})
    assert inflight_per_engine(cfg, 10**9, 256, 100) == 32  # the configured count is the cap
    assert inflight_per_engine(cfg, 1000, 256, 100) == 1  # never below one
    assert inflight_per_engine(cfg, 0, 256, 100) == 32  # unknown capacity: the configured count


def test_fixed_admission_is_the_configured_count():
    cfg = _cfg(**{"teacher.max_inflight_problems": 256, "teacher.admission": "fixed"})
    assert inflight_per_engine(cfg, 1000, 256, 100) == 256  # even where the cache holds one


def test_slots_bound_the_queue_when_the_cache_is_not_the_limit():
    # a big cache, 64 slots, K = 4 candidates per problem: four rounds of the slots are 64 problems
    cfg = _cfg(**{"search.num_candidates": 4, "search.max_new_tokens": 1024})
    assert inflight_per_engine(cfg, 10**9, 64, 50) == 64
    # whole-solution methods run one sequence per trajectory
    kd = derive(cfg, {"method": "standard_kd"})
    assert inflight_per_engine(kd, 10**9, 64, 50) == 256


def test_the_scorers_kv_bounds_the_problems_of_all_engines():
    # 1.5B student in bf16 (28 KiB of KV per token) on 2 x 80 GB: ~2.4M tokens each; 4 engines,
    # 8k budgets, K=4 x 256-token chunks: each beam holds ~9.5k tokens -> ~450 problems, ~110 per engine
    cfg = _cfg(
        **{
            "search.chunk_tokens": 256,
            "search.max_new_tokens": 8192,
            "teacher.num_engines": 4,
            "student.batch_tokens": 16384,
        }
    )
    n = inflight_per_engine(cfg, 10**9, 10**6, 300, [2_400_000, 2_400_000])
    assert 100 <= n <= 120
    assert inflight_per_engine(cfg, 10**9, 10**6, 300, [2_400_000] * 4) > 1.9 * n  # more scorers, more
    assert inflight_per_engine(cfg, 10**9, 10**6, 300) > 2 * n  # a scorer that reports nothing: no bound
