"""Method presets: how each runs the search and which trajectories it keeps (the `selected` column)."""

from __future__ import annotations

import pytest

from gen_ssd_ray.common.config import ConfigError
from gen_ssd_ray.common.config import load_config as _load
from gen_ssd_ray.core.methods import METHODS, get_method
from gen_ssd_ray.core.search import SearchParams
from gen_ssd_ray.generate.config import GenerateConfig, fingerprint, search_params


def load_config(path, overrides=None, schema_cls=GenerateConfig):
    return _load(path, overrides, schema_cls)


def row(i, status="completed", correct=True, ppl=2.0):
    return {"trajectory_index": i, "status": status, "correct": correct, "student_ppl": ppl}


def test_registry_and_unknown_name():
    assert set(METHODS) >= {"gen_ssd", "standard_kd", "posthoc_ppl"}
    with pytest.raises(ValueError, match="posthoc_ppl"):
        get_method("best_of_n")


def test_baselines_sample_whole_solutions():
    p = SearchParams(chunk_tokens=64, num_candidates=4, beam_width=2, max_new_tokens=300, prune_ppl=9.0)
    assert get_method("gen_ssd").search_params(p) == p
    for name in ("standard_kd", "posthoc_ppl"):
        q = get_method(name).search_params(p)
        assert (q.chunk_tokens, q.num_candidates, q.beam_width, q.prune_ppl) == (300, 1, 1, None)
        assert q.max_new_tokens == 300


def test_selection_rules():
    rows = [
        row(0, correct=True, ppl=3.0),
        row(1, correct=False, ppl=1.5),  # lowest PPL but wrong
        row(2, correct=True, ppl=2.0),
        row(3, status="truncated", correct=None, ppl=1.1),
        row(4, correct=None, ppl=1.2),  # unverified
    ]
    assert get_method("gen_ssd").select(rows) == [True, False, True, False, False]
    assert get_method("standard_kd").select(rows) == [True, False, True, False, False]
    assert get_method("posthoc_ppl").select(rows) == [False, False, True, False, False]
    assert get_method("posthoc_ppl").select(
        [row(0, correct=False), row(1, status="error", correct=None)]
    ) == [
        False,
        False,
    ]
    # ties go to the lower trajectory index
    assert get_method("posthoc_ppl").select([row(0, ppl=2.0), row(1, ppl=2.0)]) == [True, False]


def test_method_config_key():
    cfg = load_config(None, ["method=standard_kd", "search.trajectories_per_problem=4"])
    sp = search_params(cfg)
    assert sp.num_candidates == 1 and sp.chunk_tokens == cfg.search.max_new_tokens
    with pytest.raises(ConfigError, match="method"):
        load_config(None, ["method=nope"])
    with pytest.raises(ConfigError, match="search.trajectories_per_problem"):
        load_config(None, ["method=posthoc_ppl"])
    base = fingerprint(load_config(None, []))
    assert fingerprint(load_config(None, ["method=standard_kd"])) != base
