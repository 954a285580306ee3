"""The generation job's dashboard metrics: `ray.util.metrics` that the driver and the beam managers
record and Ray's metrics agent on each node exports to Prometheus (where to see them: cluster/README.md).

The metrics, as Prometheus shows them (Ray adds `ray_` in front of every name and `_total` to counters;
every series also carries Ray's own labels: SessionName, NodeAddress, WorkerId, ...):

- `ray_gen_ssd_problems_total{status}` (counter, driver): problems by how they ended. `done`: committed
  with at least one trajectory that is not an error; `error`: committed as error rows (the problem
  itself failed: a prompt too long, unreadable data, a poison problem); `failed`: left uncommitted for
  a re-run (engines failed on every attempt). Problems committed in the run: done + error.
- `ray_gen_ssd_trajectories_total{status}` (counter, driver): committed trajectories by row status:
  completed, pruned, truncated, error.
- `ray_gen_ssd_chunks_total` (counter, beam managers): search steps done, one per chunk round of a
  trajectory (each of its beams expanded by up to `search.chunk_tokens` tokens, then scored). Chunks
  per second is its rate: `rate(ray_gen_ssd_chunks_total[1m])`.
- `ray_gen_ssd_tokens_total{pool, kind}` (counter, beam managers, per step): pool="teacher":
  kind="generated" (candidate tokens sampled), "prompt" (prompt tokens sent, prefix included),
  "cached_prompt" (of those, read from vLLM's prefix cache); pool="scorer": "scored" (candidate
  tokens scored), "processed" (tokens the scorer ran through the model), "context" (student prompt +
  accepted prefix of each score request: what a scorer without a cache would recompute).
- `ray_gen_ssd_queue_depth{state}` (gauge, driver): state="queued" (problems of this run not yet handed
  to a beam manager; only when the problem count is known), "in_flight" (handed out, not yet committed:
  running, waiting for a retry or for their confirmation alone). Both 0 once the run ends.
- `ray_gen_ssd_cache_hit_rate{pool}` (gauge, per beam manager, over its run so far): pool="teacher":
  cached_prompt / prompt tokens (vLLM's prefix cache; the summary's `teacher/prefix_cache_hit_rate`
  is the same ratio over committed rows); pool="scorer": the share of score requests' context the
  scorer did not recompute, 1 - (processed - scored) / context, clamped to [0, 1] (exact for the hf
  and sim scorers with the teacher's tokenizer; the vllm scorer's extra warm-up request, or other
  vocabularies, make it approximate). Across several managers the exact figure is the counters' ratio.
- `ray_gen_ssd_problem_seconds` (histogram, beam managers): wall seconds of one problem's successful
  attempt on a manager, all its trajectories.

Tags of every metric: `output` (the run's `output.dir`: one set of series per dataset, the same across
resumes; not `job`, which Prometheus reserves for its scrape job) and `method`; plus `status`, `pool`,
`kind`, `state` where listed. vLLM's own engine metrics (`ray_vllm_*`) come from the engine actors
(gen_ssd_ray.engines.teacher_vllm.ray_stat_loggers).

Cost: the driver records once per committed problem, a manager once per chunk round of a trajectory
and once per problem, never per token (Ray buffers and exports every few seconds). Measured in a Ray
worker: 29 microseconds per chunk round (`ManagerMetrics.step`: 9 records), 19 per committed problem,
against the milliseconds to seconds a chunk round takes. `runtime.metrics=false` records nothing and
keeps vLLM's stats off in the engines the job starts (`engine_metrics`).

Metric objects are created lazily, once per process, after Ray is initialized (Ray drops what a
process records before `ray.init`). `sink` (tests) replaces `ray.util.metrics`: a callable
`sink(name, spec)` returning an object with Ray's `inc` / `set` / `observe(value, tags=...)`. Knows
nothing about the search, files or engines beyond the result types it counts.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from gen_ssd_ray.generate.rows import ERROR


@dataclass(frozen=True)
class MetricSpec:
    kind: str  # "counter", "gauge" or "histogram"
    description: str
    tags: tuple[str, ...] = ()  # besides `output` and `method`
    boundaries: tuple[float, ...] = ()  # histograms only


# The one list of the job's metrics (names without Ray's `ray_` prefix and counters' `_total`).
METRICS: dict[str, MetricSpec] = {
    "gen_ssd_problems": MetricSpec(
        "counter",
        "Problems by outcome: done, error (committed as error rows), failed (left for a re-run)",
        ("status",),
    ),
    "gen_ssd_trajectories": MetricSpec(
        "counter", "Committed trajectories by status (completed, pruned, truncated, error)", ("status",)
    ),
    "gen_ssd_chunks": MetricSpec("counter", "Search steps: chunk rounds of a trajectory (expand + score)"),
    "gen_ssd_tokens": MetricSpec(
        "counter",
        "Tokens by pool and kind: teacher generated/prompt/cached_prompt, scorer scored/processed/context",
        ("pool", "kind"),
    ),
    "gen_ssd_queue_depth": MetricSpec(
        "gauge", "Problems of the run queued (not yet handed to a beam manager) or in flight", ("state",)
    ),
    "gen_ssd_cache_hit_rate": MetricSpec(
        "gauge", "Per beam manager: teacher prefix-cache and scorer context-cache hit rate so far", ("pool",)
    ),
    "gen_ssd_problem_seconds": MetricSpec(
        "histogram",
        "Seconds of one problem's successful attempt on a beam manager",
        boundaries=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000),
    ),
}

Sink = Callable[[str, MetricSpec], Any]

_created: dict[str, Any] = {}  # name -> the ray.util.metrics object of this process


def ray_sink(name: str, spec: MetricSpec) -> Any:
    """The `ray.util.metrics` object for `name`, created once per process."""
    if name not in _created:
        from ray.util import metrics

        tags = ("output", "method", *spec.tags)
        if spec.kind == "counter":
            _created[name] = metrics.Counter(name, spec.description, tag_keys=tags)
        elif spec.kind == "gauge":
            _created[name] = metrics.Gauge(name, spec.description, tag_keys=tags)
        else:
            _created[name] = metrics.Histogram(name, spec.description, list(spec.boundaries), tag_keys=tags)
    return _created[name]


class _Recorder:
    """Records the job's metrics with the tags `output` and `method`; does nothing when disabled."""

    def __init__(self, output: str, method: str, enabled: bool = True, sink: Sink | None = None):
        self.enabled = enabled
        self.tags = {"output": output, "method": method}
        self._sink = sink or ray_sink
        self._metrics: dict[str, Any] = {}

    def _metric(self, name: str) -> Any:
        m = self._metrics.get(name)
        if m is None:
            m = self._metrics[name] = self._sink(name, METRICS[name])
        return m

    def inc(self, name: str, value: float, **tags: str) -> None:
        if self.enabled and value > 0:  # Ray refuses increments of 0
            self._metric(name).inc(value, tags={**self.tags, **tags})

    def set(self, name: str, value: float, **tags: str) -> None:
        if self.enabled:
            self._metric(name).set(value, tags={**self.tags, **tags})

    def observe(self, name: str, value: float) -> None:
        if self.enabled:
            self._metric(name).observe(value, tags=self.tags)


class JobMetrics(_Recorder):
    """The driver's metrics: problems and trajectories as they are committed, and the queue depth.

    `todo`: the problems this run has to do (None when the count is unknown: no `queued` gauge).
    Call `admitting(problems)` on the stream the dispatcher reads (a problem is handed out when it is
    read), `committed(rows, failed)` after each committed problem, `finish(failed)` at the end;
    `failed` is the run's count of problems left for a re-run so far (RunStats.failed)."""

    def __init__(
        self, output: str, method: str, todo: int | None, enabled: bool = True, sink: Sink | None = None
    ):
        super().__init__(output, method, enabled, sink)
        self.todo = todo
        self.admitted = self.done = self.failed = 0

    def admitting(self, problems: Iterable) -> Iterator:
        for q in problems:
            self.admitted += 1
            self._depth()
            yield q

    def committed(self, rows: Sequence[dict], failed: int) -> None:
        self.done += 1
        statuses = Counter(r["status"] for r in rows)
        self.inc("gen_ssd_problems", 1, status=ERROR if statuses[ERROR] == len(rows) else "done")
        for status, n in statuses.items():
            self.inc("gen_ssd_trajectories", n, status=status)
        self._failed(failed)
        self._depth()

    def finish(self, failed: int) -> None:
        self._failed(failed)
        self.set("gen_ssd_queue_depth", 0, state="in_flight")
        if self.todo is not None:
            self.set("gen_ssd_queue_depth", 0, state="queued")

    def _failed(self, failed: int) -> None:
        self.inc("gen_ssd_problems", failed - self.failed, status="failed")
        self.failed = max(self.failed, failed)

    def _depth(self) -> None:
        self.set("gen_ssd_queue_depth", max(0, self.admitted - self.done - self.failed), state="in_flight")
        if self.todo is not None:
            self.set("gen_ssd_queue_depth", max(0, self.todo - self.admitted), state="queued")


class ManagerMetrics(_Recorder):
    """A beam manager's metrics: `step` after each chunk round of a trajectory, `solved` per problem."""

    def __init__(self, output: str, method: str, enabled: bool = True, sink: Sink | None = None):
        super().__init__(output, method, enabled, sink)
        self.totals: Counter = Counter()  # (pool, kind) -> tokens so far, for the hit-rate gauges

    def step(self, expanded: Sequence, score_requests: Sequence, scored: Sequence) -> None:
        """One chunk round: the teacher's ExpandResults, the ScoreRequests sent, the ScoreResults."""
        if not self.enabled:
            return
        counts = {
            ("teacher", "generated"): sum(len(c.token_ids) for r in expanded for c in r.candidates),
            ("teacher", "prompt"): sum(r.prompt_tokens for r in expanded),
            ("teacher", "cached_prompt"): sum(r.cached_prompt_tokens for r in expanded),
            ("scorer", "scored"): sum(r.tokens_scored for r in scored),
            ("scorer", "processed"): sum(r.tokens_processed for r in scored),
            ("scorer", "context"): sum(len(q.student_prompt_ids) + len(q.prefix_ids) for q in score_requests),
        }
        self.inc("gen_ssd_chunks", 1)
        for (pool, kind), n in counts.items():
            self.inc("gen_ssd_tokens", n, pool=pool, kind=kind)
        self.totals.update(counts)
        t = self.totals
        if t["teacher", "prompt"]:
            self.set(
                "gen_ssd_cache_hit_rate",
                t["teacher", "cached_prompt"] / t["teacher", "prompt"],
                pool="teacher",
            )
        if t["scorer", "context"]:
            recomputed = t["scorer", "processed"] - t["scorer", "scored"]
            rate = min(1.0, max(0.0, 1 - recomputed / t["scorer", "context"]))
            self.set("gen_ssd_cache_hit_rate", rate, pool="scorer")

    def solved(self, started: float) -> None:
        """A problem solved; `started` is its time.perf_counter() at the start."""
        self.observe("gen_ssd_problem_seconds", time.perf_counter() - started)


@contextlib.contextmanager
def engine_metrics(enabled: bool) -> Iterator[None]:
    """Within it, engine actors started by this process export vLLM's engine metrics or not
    (`runtime.metrics`; gen_ssd_ray.engines.actors.METRICS_ENV, read where their engines start)."""
    from gen_ssd_ray.engines.actors import METRICS_ENV

    before = os.environ.get(METRICS_ENV)
    os.environ[METRICS_ENV] = "1" if enabled else "0"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(METRICS_ENV, None)
        else:
            os.environ[METRICS_ENV] = before
