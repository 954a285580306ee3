"""Admission per teacher engine follows its KV capacity and the problems' context length."""

from gen_ssd_ray.common.config import derive
from gen_ssd_ray.generate.admission import inflight_per_engine
from gen_ssd_ray.generate.config import GenerateConfig


def _cfg(**changes) -> GenerateConfig:
    return derive(GenerateConfig(), {"teacher.max_inflight_problems": 10_000, **changes})


def test_a_32b_engine_holds_tens_of_long_problems():
    # 800k KV tokens (4 x H100, conf/sim/h100.yaml), 256 seqs x 256-token chunks, 8k-16k budgets
    cfg = _cfg(**{"search.chunk_tokens": 256, "search.max_new_tokens": 16384})
    assert 60 <= inflight_per_engine(cfg, 800_000, 256, 300) <= 90
    cfg = _cfg(**{"search.chunk_tokens": 256, "search.max_new_tokens": 8192})
    assert 120 <= inflight_per_engine(cfg, 800_000, 256, 300) <= 170


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
