"""The generation job's metrics on a real local Ray (integration): a small job on simulated engines,
then the node's Prometheus endpoint (what Prometheus and the dashboard scrape) shows the gen_ssd_
metrics with the run's own numbers; with `runtime.metrics=false` it shows none of them."""

from __future__ import annotations

import time
import urllib.request
from collections import defaultdict

import pytest

pytestmark = pytest.mark.integration

PROBLEMS = 6


def sim_cfg(data, out, *extra):
    from gen_ssd_ray.sim.harness import sim_config

    return sim_config(
        [
            f"data.path={data}",
            f"output.dir={out}",
            "teacher.num_engines=2",
            "student.num_scorers=1",
            "sim.engines_per_actor=2",
            "sim.model_load=false",
            "sim.time_compression=100",
            "search.max_new_tokens=1024",
            "search.chunk_tokens=256",
            "runtime.num_beam_managers=2",
            "runtime.journal_interval_s=0",
            *extra,
        ]
    )


def scrape(output: str) -> dict[tuple, float]:
    """The node's gen_ssd_ series of one run, summed over processes: {(name, label values...): value}."""
    import ray
    from prometheus_client.parser import text_string_to_metric_families

    node = next(n for n in ray.nodes() if n["Alive"])
    url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    values: dict[tuple, float] = defaultdict(float)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.startswith("ray_gen_ssd_") and s.labels.get("output") == output:
                tags = tuple(s.labels.get(k) for k in ("status", "pool", "kind", "state") if k in s.labels)
                values[(s.name, *tags)] += s.value
    return values


def test_job_metrics_reach_the_nodes_prometheus_endpoint(tmp_path, monkeypatch):
    import ray

    from gen_ssd_ray.generate.driver import prepare, run_generate
    from gen_ssd_ray.generate.manifest import read_output
    from gen_ssd_ray.generate.pools import build_pools, shutdown_pools
    from gen_ssd_ray.sim.harness import write_problems

    monkeypatch.setenv("RAY_metrics_report_interval_ms", "500")  # Ray's agent exports every 0.5 s
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    data = write_problems(tmp_path / "p.jsonl", PROBLEMS)
    cfg = sim_cfg(data, tmp_path / "on")
    off = sim_cfg(data, tmp_path / "off", "runtime.metrics=false")
    prepared = prepare(cfg)
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        pools = build_pools(cfg, prepared.teacher_path, prepared.student_path)
        try:
            s = run_generate(cfg, prepared, pools=pools)  # the managers stay up: their last values export
            output = str(cfg.output.dir)
            want = s["teacher/tokens_generated"]
            deadline = time.monotonic() + 30
            while True:
                v = scrape(output)
                done = v.get(("ray_gen_ssd_problems_total", "done"))
                tokens = v.get(("ray_gen_ssd_tokens_total", "teacher", "generated"))
                count = v.get(("ray_gen_ssd_problem_seconds_count",))
                if (done, tokens, count) == (PROBLEMS, want, PROBLEMS) or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
        finally:
            shutdown_pools(pools)
        s_off = run_generate(off)
        time.sleep(2)  # four export intervals
        assert not scrape(str(off.output.dir)), "runtime.metrics=false exported metrics"
    finally:
        ray.shutdown()

    assert s["problems_done_this_run"] == PROBLEMS and s_off["problems_done_this_run"] == PROBLEMS
    assert done == PROBLEMS and count == PROBLEMS
    assert ("ray_gen_ssd_problems_total", "error") not in v and (
        "ray_gen_ssd_problems_total",
        "failed",
    ) not in v
    by_status = {k[1]: n for k, n in v.items() if k[0] == "ray_gen_ssd_trajectories_total"}
    assert by_status == s["trajectories_by_status"]
    rows = read_output(cfg.output.dir).to_pylist()
    assert v[("ray_gen_ssd_chunks_total",)] == sum(len(r["chunks"]) for r in rows)  # beam_width 1
    assert tokens == want > 0
    prompt = v[("ray_gen_ssd_tokens_total", "teacher", "prompt")]
    cached = v.get(("ray_gen_ssd_tokens_total", "teacher", "cached_prompt"), 0)
    assert cached / prompt == pytest.approx(s["teacher/prefix_cache_hit_rate"], abs=1e-3)
    processed = v[("ray_gen_ssd_tokens_total", "scorer", "processed")]
    scored = v[("ray_gen_ssd_tokens_total", "scorer", "scored")]
    assert processed / scored == pytest.approx(s["scorer/tokens_processed_per_scored"], abs=1e-3)
    assert v[("ray_gen_ssd_queue_depth", "in_flight")] == 0 and v[("ray_gen_ssd_queue_depth", "queued")] == 0
    for pool in ("teacher", "scorer"):  # one gauge per manager: each a rate
        assert 0 <= v[("ray_gen_ssd_cache_hit_rate", pool)] <= 2
