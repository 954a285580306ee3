"""The generation job's dashboard metrics (gen_ssd_ray.generate.metrics) with a fake sink: what the
driver and a beam manager record, the queue depth, the hit rates, `runtime.metrics=false`, and that
every metric is documented where users look (cluster/README.md)."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from gen_ssd_ray.core.types import Candidate, ExpandResult, ScoreRequest, ScoreResult
from gen_ssd_ray.generate.metrics import METRICS, JobMetrics, ManagerMetrics, engine_metrics

ROOT = Path(__file__).resolve().parents[1]


class FakeSink:
    """Records what Ray's metrics would hold: counters summed, gauges last value, observations."""

    def __init__(self):
        self.values: dict[tuple, float] = {}
        self.observed: dict[tuple, list[float]] = {}
        self.created: list[str] = []

    def __call__(self, name, spec):
        self.created.append(name)
        sink = self

        class Metric:
            def inc(self, value, tags):
                key = (name, *sorted(tags.items()))
                sink.values[key] = sink.values.get(key, 0) + value

            def set(self, value, tags):
                sink.values[(name, *sorted(tags.items()))] = value

            def observe(self, value, tags):
                sink.observed.setdefault((name, *sorted(tags.items())), []).append(value)

        assert set(spec.tags) <= {"status", "pool", "kind", "state"}
        return Metric()

    def get(self, name, **tags):
        tags = {"output": "out/x", "method": "gen_ssd", **tags}
        return self.values.get((name, *sorted(tags.items())))


def rows(*statuses):
    return [{"status": s} for s in statuses]


def test_driver_counts_problems_trajectories_and_queue_depth():
    sink = FakeSink()
    m = JobMetrics("out/x", "gen_ssd", todo=4, sink=sink)
    handed = m.admitting(iter(["a", "b", "c", "d"]))
    next(handed), next(handed)
    assert sink.get("gen_ssd_queue_depth", state="queued") == 2
    assert sink.get("gen_ssd_queue_depth", state="in_flight") == 2
    m.committed(rows("completed", "pruned"), failed=0)
    assert sink.get("gen_ssd_queue_depth", state="in_flight") == 1
    next(handed), next(handed)
    m.committed(rows("error", "error"), failed=1)  # and one problem was left for a re-run meanwhile
    m.committed(rows("truncated", "error"), failed=1)
    assert sink.get("gen_ssd_queue_depth", state="queued") == 0
    assert sink.get("gen_ssd_queue_depth", state="in_flight") == 0
    m.finish(failed=1)
    assert sink.get("gen_ssd_problems", status="done") == 2  # a problem with one good trajectory is done
    assert sink.get("gen_ssd_problems", status="error") == 1
    assert sink.get("gen_ssd_problems", status="failed") == 1  # counted once
    assert {
        s: sink.get("gen_ssd_trajectories", status=s) for s in ("completed", "pruned", "truncated", "error")
    } == {
        "completed": 1,
        "pruned": 1,
        "truncated": 1,
        "error": 3,
    }


def test_driver_without_a_problem_count_has_no_queued_gauge_and_ends_at_zero():
    sink = FakeSink()
    m = JobMetrics("out/x", "gen_ssd", todo=None, sink=sink)
    list(m.admitting(["a", "b"]))
    assert sink.get("gen_ssd_queue_depth", state="in_flight") == 2
    m.finish(failed=0)  # an interrupted run: nothing is in flight once it ends
    assert sink.get("gen_ssd_queue_depth", state="in_flight") == 0
    assert sink.get("gen_ssd_queue_depth", state="queued") is None


def step(prompt=100, cached=64, gen=(8, 5), context=120, processed=30, scored=13):
    expanded = [ExpandResult("k", tuple(Candidate((1,) * n, "", "length") for n in gen), prompt, cached)]
    requests = [ScoreRequest("k", "g", (1,) * (context - 20), (2,) * 20, "", expanded[0].candidates)]
    results = [ScoreResult("k", (1.0, 1.0), (scored - 5, 5), processed)]
    return expanded, requests, results


def test_manager_counts_chunks_tokens_and_hit_rates():
    sink = FakeSink()
    m = ManagerMetrics("out/x", "gen_ssd", sink=sink)
    m.step(*step())
    m.step(*step(prompt=100, cached=96, processed=13, scored=13))  # all context from the scorer's cache
    assert sink.get("gen_ssd_chunks") == 2
    assert sink.get("gen_ssd_tokens", pool="teacher", kind="generated") == 26
    assert sink.get("gen_ssd_tokens", pool="teacher", kind="prompt") == 200
    assert sink.get("gen_ssd_tokens", pool="teacher", kind="cached_prompt") == 160
    assert sink.get("gen_ssd_tokens", pool="scorer", kind="processed") == 43
    assert sink.get("gen_ssd_tokens", pool="scorer", kind="scored") == 26
    assert sink.get("gen_ssd_tokens", pool="scorer", kind="context") == 240
    assert sink.get("gen_ssd_cache_hit_rate", pool="teacher") == pytest.approx(0.8)
    # 17 of 240 context tokens recomputed
    assert sink.get("gen_ssd_cache_hit_rate", pool="scorer") == pytest.approx(1 - 17 / 240)
    m.step(*step(processed=10_000))  # more than the context (a vllm scorer's warm-up): clamped
    assert sink.get("gen_ssd_cache_hit_rate", pool="scorer") == 0.0
    m.solved(started=0.0)
    assert len(sink.observed[("gen_ssd_problem_seconds", ("method", "gen_ssd"), ("output", "out/x"))]) == 1


def test_disabled_records_nothing():
    sink = FakeSink()
    m = ManagerMetrics("out/x", "gen_ssd", enabled=False, sink=sink)
    m.step(*step())
    m.solved(0.0)
    j = JobMetrics("out/x", "gen_ssd", todo=3, enabled=False, sink=sink)
    assert list(j.admitting(["a"])) == ["a"]
    j.committed(rows("completed"), failed=0)
    j.finish(failed=0)
    assert sink.created == [] and sink.values == {}


def test_engine_metrics_setting_reaches_engine_actors_and_is_restored(monkeypatch):
    from gen_ssd_ray.engines.actors import METRICS_ENV, engine_env
    from gen_ssd_ray.engines.teacher_vllm import ray_stat_loggers

    monkeypatch.delenv(METRICS_ENV, raising=False)
    with engine_metrics(False):
        assert engine_env(1.0)[METRICS_ENV] == "0"
        assert ray_stat_loggers() == []
    assert METRICS_ENV not in os.environ and METRICS_ENV not in engine_env(1.0)
    assert ray_stat_loggers() == []  # outside a Ray worker vLLM's stats stay off


def test_every_metric_is_documented_where_users_look():
    from gen_ssd_ray.generate import metrics

    readme = (ROOT / "cluster" / "README.md").read_text()
    for name, spec in METRICS.items():
        shown = f"ray_{name}_total" if spec.kind == "counter" else f"ray_{name}"
        assert shown in metrics.__doc__, name
        assert shown in readme, name
    assert "runtime.metrics" in readme and "ray_vllm_" in readme


def test_beam_manager_records_each_chunk_round_and_each_problem():
    """What a manager records adds up to its rows' own cost columns (the fake engines, no Ray)."""
    import asyncio

    from gen_ssd_ray.common.config import PromptConfig
    from gen_ssd_ray.common.data import Problem
    from gen_ssd_ray.common.models import resolve_model
    from gen_ssd_ray.core import SearchParams
    from gen_ssd_ray.engines.fake import FakeScorer, FakeTeacher, InProcessActor
    from gen_ssd_ray.generate.manager import BeamManager, ManagerSpec

    path = resolve_model("embedded:teacher")
    spec = ManagerSpec(
        teacher_path=path,
        student_path=path,
        teacher_name="t",
        student_name="s",
        params=SearchParams(chunk_tokens=4, num_candidates=2, max_new_tokens=12),
        prompt=PromptConfig(),
        trajectories=2,
        seed=5,
        teacher_max_len=4096,
        call_timeout_s=30.0,
        fingerprint="fp",
        output="out/x",
    )
    manager = BeamManager(spec, [InProcessActor(FakeTeacher(vocab=200))], [InProcessActor(FakeScorer())])
    sink = FakeSink()
    manager.metrics = ManagerMetrics(spec.output, spec.method, sink=sink)
    rows = asyncio.run(manager.solve(Problem("p1", "What is 2 + 3?", "5"), 0))

    def total(column):
        return sum(r[column] for r in rows)

    assert sink.get("gen_ssd_chunks") == sum(len(r["chunks"]) for r in rows) > 0  # beam_width 1
    assert sink.get("gen_ssd_tokens", pool="teacher", kind="generated") == total("teacher_tokens_generated")
    assert sink.get("gen_ssd_tokens", pool="teacher", kind="prompt") == total("teacher_prompt_tokens")
    assert sink.get("gen_ssd_tokens", pool="scorer", kind="scored") == total("student_tokens_scored")
    assert sink.get("gen_ssd_tokens", pool="scorer", kind="processed") == total("student_tokens_processed")
    assert sink.get("gen_ssd_cache_hit_rate", pool="scorer") == 1.0  # the fake scorer recomputes nothing
    assert len(sink.observed[("gen_ssd_problem_seconds", ("method", "gen_ssd"), ("output", "out/x"))]) == 1


@pytest.mark.filterwarnings(
    "ignore::DeprecationWarning"
)  # pydantic's, from vLLM's try at importing ray.serve
def test_vllm_engine_metrics_are_ray_metrics(monkeypatch, tiny_model):
    """vLLM's Ray stat logger, as an engine actor gets it (`ray_stat_loggers`), builds on
    `ray.util.metrics` although ray[serve] is not installed, and records an engine step. No engine, no
    Ray: a VllmConfig of the tiny model (a few seconds, mostly importing vLLM)."""
    import ray
    from ray.util import metrics

    from gen_ssd_ray.engines.actors import METRICS_ENV
    from gen_ssd_ray.engines.teacher_vllm import ray_stat_loggers

    monkeypatch.delenv(METRICS_ENV, raising=False)
    with monkeypatch.context() as m:
        m.setattr(ray, "is_initialized", lambda: True)  # as in an engine actor
        m.setattr(ray, "get_runtime_context", lambda: SimpleNamespace(get_actor_id=lambda: "actor-1"))
        (logger_cls,) = ray_stat_loggers()
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.metrics.stats import IterationStats, SchedulerStats

    args = AsyncEngineArgs(
        model=tiny_model, max_model_len=512, enforce_eager=True, enable_chunked_prefill=False
    )
    logger = logger_cls(args.create_engine_config(), [0])
    assert isinstance(logger.gauge_scheduler_running[0].metric, metrics.Gauge)
    logger.record(SchedulerStats(num_running_reqs=3, num_waiting_reqs=1), IterationStats(), engine_idx=0)
