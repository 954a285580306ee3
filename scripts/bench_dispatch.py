"""Micro-benchmark of the dispatch loop (gen_ssd_ray.common.dispatch) over real Ray; prints one JSON line.

A trivial async actor sleeps a random 0-2 s per call and returns. `--calls` calls go through a
`Dispatcher` built on `ray_calls()` with `--pending` of them in flight (`--actors` workers, an equal
share each). Reported: the dispatcher's own time per result (`stats.loop_s`: admission, submit, get,
heaps; not time blocked waiting for a call to end, nor the consumer's time) over the results handled
while the input still had items, i.e. with `--pending` calls pending: p50 / p99 / max in ms. The first
result is left out (its loop time is the initial fill of `--pending` submissions). Also: p50 / p99 ms
of the Ray callables inside that time (`submit` is `actor.call.remote`, `get` is `ray.get`).

    python -m scripts.bench_dispatch [--pending 10000] [--calls 30000] [--actors 4]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from collections.abc import Callable
from typing import Any

from gen_ssd_ray.common.dispatch import Dispatcher, Histogram


class Sleeper:
    """The worker: sleeps the given seconds, returns them."""

    async def call(self, seconds: float) -> float:
        await asyncio.sleep(seconds)
        return seconds


def new_dispatcher(num_workers: int, capacity: int, submit: Callable, timed: Callable) -> Any:
    """The dispatcher under test, its callables wrapped by `timed(name, f)`."""
    from gen_ssd_ray.common.dispatch import ray_calls

    calls = ray_calls()
    return Dispatcher(
        num_workers=num_workers,
        capacity=capacity,
        submit=timed("submit", submit),
        watch=timed("watch", calls.watch),
        get=timed("get", calls.get),
        cancel=calls.cancel,
        deadline_s=600.0,
        max_attempts=3,
    )


def between(end: Histogram, start: Histogram) -> Histogram:
    """The durations added to `end` after `start` was copied (max: its bucket's upper edge)."""
    h = Histogram()
    h.counts = [a - b for a, b in zip(end.counts, start.counts, strict=True)]
    h.count, h.total_s = end.count - start.count, end.total_s - start.total_s
    top = max((i for i, n in enumerate(h.counts) if n), default=0)
    h.max_s = min(end.max_s, h.LOW_S * h.RATIO**top)
    return h


def ms(h: Histogram, q: float) -> float:
    return round(h.quantile(q) * 1e3, 4)


def measure(pending: int, calls: int, actors: int, seed: int = 0, build=new_dispatcher) -> dict[str, Any]:
    """Run `calls` sleeps through a dispatcher from `build(num_workers, capacity, submit, timed)` (Ray
    must be up); the dispatcher must expose `stats.loop_s` (a Histogram) and `stats.peak_in_flight`."""
    import ray

    if calls <= pending:
        raise ValueError(f"--calls must exceed --pending to measure with {pending} pending")
    rng = random.Random(seed)
    workers = [ray.remote(Sleeper).options(num_cpus=0, max_concurrency=20000).remote() for _ in range(actors)]
    ray.get([w.call.remote(0.0) for w in workers])
    delays = [rng.uniform(0.0, 2.0) for _ in range(calls)]
    callables: dict[str, Histogram] = {}

    def timed(name: str, f: Callable) -> Callable:
        h = callables.setdefault(name, Histogram())

        def call(*args):
            t = time.perf_counter()
            try:
                return f(*args)
            finally:
                h.add(time.perf_counter() - t)

        return call

    d = build(actors, -(-pending // actors), lambda i, w, _: workers[w].call.remote(delays[i]), timed)
    # Results 2 .. calls - pending are handled with `pending` calls pending (the input still has
    # items); the first one's loop time is the initial fill.
    marks: dict[str, Histogram] = {}
    t0, done = time.perf_counter(), 0
    for k, out in enumerate(d.run(i for i in range(calls)), 1):
        done += out.ok
        if k in (1, calls - pending):
            marks["end" if k > 1 else "start"] = between(d.stats.loop_s, Histogram())
    wall = time.perf_counter() - t0
    steady = between(marks["end"], marks["start"])
    for w in workers:
        ray.kill(w)
    return {
        "driver_ms_per_result_p99": ms(steady, 0.99),
        "driver_ms_per_result_p50": ms(steady, 0.50),
        "driver_ms_per_result_mean": round(steady.total_s / max(steady.count, 1) * 1e3, 4),
        "driver_ms_per_result_max": round(steady.max_s * 1e3, 2),
        "callables_ms_p50_p99": {k: [ms(h, 0.5), ms(h, 0.99)] for k, h in callables.items()},
        "pending": pending,
        "results_measured": steady.count,
        "calls": calls,
        "ok": done,
        "peak_in_flight": d.stats.peak_in_flight,
        "results_per_s": round(calls / wall, 1),
        "wall_s": round(wall, 1),
    }


def main(argv: list[str] | None = None) -> None:
    import ray

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pending", type=int, default=10_000)
    ap.add_argument("--calls", type=int, default=30_000)
    ap.add_argument("--actors", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        print(json.dumps(measure(args.pending, args.calls, args.actors, args.seed)), flush=True)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
