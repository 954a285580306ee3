"""Poison problems end to end on real Ray (integration): the real driver, beam manager, dispatcher,
engine actors and shard writer against simulated engines, one problem of which kills its teacher
engine core on every attempt (gen_ssd_ray.sim.teacher.POISON_ENV). The run finishes (nothing left for
a re-run), that problem is committed as an error row naming the count, every other problem commits
normally, and the failure ledger forgets it."""

from __future__ import annotations

import json
import os

import pytest

pytestmark = pytest.mark.integration


def test_a_problem_that_kills_its_engine_is_committed_as_an_error_row(tmp_path, monkeypatch):
    from gen_ssd_ray.generate.failures import FAILURES_NAME
    from gen_ssd_ray.generate.manifest import read_output
    from gen_ssd_ray.sim.harness import run, sim_config, write_problems
    from gen_ssd_ray.sim.teacher import POISON_ENV

    data = write_problems(tmp_path / "p.jsonl", 12)
    out = tmp_path / "out"
    monkeypatch.setenv(POISON_ENV, "p-3")  # inherited by the local Ray's workers
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cfg = sim_config(
        [
            f"data.path={data}",
            f"output.dir={out}",
            "output.shard_size=4",
            "teacher.num_engines=2",
            "student.num_scorers=1",
            "sim.engines_per_actor=1",
            "sim.time_compression=50",
            "search.max_new_tokens=256",
            "search.chunk_tokens=128",
            "runtime.num_beam_managers=1",
            "runtime.local_num_cpus=4",
            "runtime.max_attempts=2",
            "runtime.retry_window_s=5",
            "runtime.engine_cooldown_s=5",
            "runtime.max_problem_failures=2",
        ]
    )
    result = run(cfg)
    assert result.error is None, result.error
    s = result.summary
    assert s["problems_failed_retry_later"] == 0 and s["problems_done_this_run"] == 12, s
    t = read_output(out).to_pylist()
    assert sorted({r["problem_id"] for r in t}) == sorted(f"p-{i}" for i in range(12))
    poison = [r for r in t if r["problem_id"] == "p-3"]
    assert all(r["status"] == "error" for r in poison)
    assert "infrastructure failed" in poison[0]["error"] and "max_problem_failures=2" in poison[0]["error"]
    assert "EngineDead" in poison[0]["error"] or "EnginesUnavailable" in poison[0]["error"]
    assert not [r for r in t if r["problem_id"] != "p-3" and r["status"] == "error"]
    assert "p-3" not in json.loads((out / FAILURES_NAME).read_text())["problems"]
    assert os.environ.get(POISON_ENV) == "p-3"
