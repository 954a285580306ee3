"""Joining or starting Ray, the same way for every job, and refusing resource requests that can never
be met.

- `init_ray`: join the job's cluster or start a private local Ray (see its docstring).
- `check_fits(demands)`: before a job creates its actors, compare what they ask for (`Demand`: count x
  per-actor CPU / GPU / memory / custom resources) with the alive nodes of a fixed cluster, and raise
  `ResourcesError` (an InputError: exit 2, in seconds) naming the config keys to change when they can
  never be placed: one actor larger than every node, a total above the cluster's, or more actors of a
  kind than fit node by node. These are necessary conditions only, so a request that could be placed is
  never refused; one that passes may still wait for resources other jobs hold (then
  runtime.startup_timeout_s applies).
- An autoscaling cluster may add nodes, so there the check is skipped (the wait is the autoscaler's).
  `cluster_autoscales()` decides: GEN_SSD_AUTOSCALING=1 / 0 forces the answer; a private local Ray is
  fixed; otherwise the cluster autoscales if Ray's autoscaler v2 is enabled (GCS key
  `__autoscaler_v2_enabled`, set by `ray up` and KubeRay autoscaler v2), or if the v1 autoscaler's
  status (`__autoscaling_status`, what `ray status` shows) names node types of an autoscaling config.
  A head started with `ray start` or `ray.init` reports no autoscaler there, or only the read-only
  provider's `node_<id>` types (checked on Ray 2.60's local head): fixed. Unknown (no status yet, an
  error): treated as autoscaling, so nothing is refused on a guess.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from gen_ssd_ray.common.errors import InputError

log = logging.getLogger(__name__)

# Set by init_ray when it started a private local Ray (a fixed cluster: this machine).
_private_local = False


def init_ray(address: str | None, local_num_cpus: int | None, dashboard: bool = False) -> None:
    """Join the cluster named by `address` or RAY_ADDRESS (set by `ray job submit`), else start a private
    local Ray with `local_num_cpus` CPUs (None: all), even when a head started by `ray start` runs on
    this machine (a plain `ray.init()` would join it, and refuse `num_cpus`). A no-op when Ray is already initialized (a
    pipeline runs every stage on one Ray). `dashboard` also serves the State API, which Ray Train's
    placement-group cleaner polls (without it, a warning a second).

    `ray.init` installs its own SIGTERM handler (`sys.exit`); a handler the job had installed before
    (gen_ssd_ray.common.interrupts) is put back, so SIGTERM keeps meaning what the job's policy says,
    and a SIGTERM that lands while `ray.init` runs raises KeyboardInterrupt (exit 130), not exit 15."""
    import ray

    if ray.is_initialized():
        return
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main else None
    try:
        _init(ray, address or os.environ.get("RAY_ADDRESS"), local_num_cpus, dashboard)
    except SystemExit as e:
        # Ray's own handler, live while ray.init runs, turns SIGTERM into sys.exit(15): under the
        # job's policy that SIGTERM is an interrupt like any other (exit 130).
        if e.code == signal.SIGTERM and previous not in (None, signal.SIG_DFL):
            raise KeyboardInterrupt("SIGTERM while Ray was starting") from None
        raise
    finally:
        if previous not in (None, signal.SIG_DFL):
            signal.signal(signal.SIGTERM, previous)


def _init(ray, address: str | None, local_num_cpus: int | None, dashboard: bool) -> None:
    global _private_local
    _private_local = not address
    if address:
        ray.init(address=address, log_to_driver=True)
    elif dashboard:
        ray.init(
            address="local",
            num_cpus=local_num_cpus,
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            log_to_driver=True,
        )
    else:
        ray.init(address="local", num_cpus=local_num_cpus, include_dashboard=False, log_to_driver=True)


# ---- resource requests that can never be met ------------------------------------------------------


class ResourcesError(InputError):
    """The job's actors can never be placed on this (fixed) cluster; the message names the keys."""


@dataclass(frozen=True)
class Demand:
    """`count` actors of one kind (`what`), each asking for `per_actor` (Ray resource names: CPU, GPU,
    memory in bytes, custom ones); `keys`: the config keys that set the count and the resources."""

    what: str
    count: int
    per_actor: Mapping[str, float] = field(default_factory=dict)
    keys: str = ""


def actor_demand(
    what: str, count: int, keys: str, *, num_cpus: float = 0, num_gpus: float = 0, memory: float | None = None
) -> Demand:
    """A Demand from Ray actor options (num_cpus, num_gpus, memory); zero amounts are dropped."""
    per = {"CPU": num_cpus, "GPU": num_gpus, "memory": memory or 0}
    return Demand(what, count, {k: float(v) for k, v in per.items() if v}, keys)


_EPS = 1e-6  # Ray counts resources in units of 1e-4


def _fmt(resource: str, amount: float) -> str:
    if resource == "memory":
        return f"{amount / 2**30:.3g} GiB memory"
    return f"{amount:g} {resource}"


def unsatisfiable(demands: Sequence[Demand], nodes: Sequence[Mapping[str, float]]) -> str | None:
    """Why `demands` can never be placed together on `nodes` (each alive node's total resources), or
    None if they might be. Checks only necessary conditions: (1) each actor fits on some node; (2) the
    kind's actors fit node by node (sum of floor(node / per_actor) per resource); (3) the total of all
    kinds fits the cluster's total."""
    where = f"{len(nodes)} alive node(s)"
    for d in demands:
        if d.count <= 0:
            continue
        for res, amount in d.per_actor.items():
            if amount <= 0:
                continue
            best = max((n.get(res, 0.0) for n in nodes), default=0.0)
            if amount > best + _EPS:
                return (
                    f"one actor of the {d.what} asks for {_fmt(res, amount)} but the largest node has "
                    f"{_fmt(res, best)} ({where}): lower {d.keys}, or use a cluster with such nodes"
                )
            room = sum(math.floor(n.get(res, 0.0) / amount + _EPS) for n in nodes)
            if d.count > room:
                return (
                    f"the {d.what} need {d.count} actors of {_fmt(res, amount)} each, but only {room} fit "
                    f"on the cluster's nodes ({where}): lower {d.keys}, or add nodes"
                )
    totals: dict[str, float] = {}
    for d in demands:
        for res, amount in d.per_actor.items():
            totals[res] = totals.get(res, 0.0) + max(d.count, 0) * amount
    for res, total in totals.items():
        have = sum(n.get(res, 0.0) for n in nodes)
        if total > have + _EPS:
            parts = ", ".join(
                f"{d.what}: {d.count} x {_fmt(res, d.per_actor[res])}"
                for d in demands
                if d.per_actor.get(res, 0) > 0 and d.count > 0
            )
            keys = "; ".join(d.keys for d in demands if d.per_actor.get(res, 0) > 0 and d.count > 0)
            return (
                f"the job's actors ask for {_fmt(res, total)} in all ({parts}) but the cluster has "
                f"{_fmt(res, have)} ({where}): lower {keys}, or add nodes"
            )
    return None


def cluster_autoscales() -> bool:
    """Whether the joined cluster may add nodes (see the module docstring for how it is decided)."""
    forced = os.environ.get("GEN_SSD_AUTOSCALING", "").strip().lower()
    if forced in ("1", "true", "yes"):
        return True
    if forced in ("0", "false", "no"):
        return False
    if _private_local:
        return False
    try:
        from ray.autoscaler.v2.utils import is_autoscaler_v2
        from ray.experimental.internal_kv import _internal_kv_get

        v2 = is_autoscaler_v2(fetch_from_server=True)
        return autoscales_from(v2, None if v2 else _internal_kv_get("__autoscaling_status"))
    except Exception as e:  # pragma: no cover - depends on the Ray version and cluster
        log.info("could not tell whether the cluster autoscales (%s); assuming it does", e)
        return True


def autoscales_from(autoscaler_v2: bool, status: bytes | str | None) -> bool:
    """The decision of `cluster_autoscales` from what Ray reports: autoscaler v2 enabled, and the v1
    monitor's status JSON (None: not written yet)."""
    if autoscaler_v2:
        return True
    if not status:
        return True  # no status (yet): do not refuse on a guess
    try:
        report = json.loads(status).get("autoscaler_report") or {}
    except (ValueError, AttributeError):
        return True
    types = set(report.get("active_nodes") or {}) | set(report.get("idle_nodes") or {})
    types |= set(report.get("pending_launches") or {})
    return any(not str(t).startswith("node_") for t in types)


def alive_nodes() -> list[dict[str, float]]:
    """The total resources of each alive node of the joined Ray."""
    import ray

    return [dict(n.get("Resources") or {}) for n in ray.nodes() if n.get("Alive")]


def check_fits(demands: Sequence[Demand], nodes: Sequence[Mapping[str, float]] | None = None) -> None:
    """Raise ResourcesError (exit 2) if `demands` can never be placed on this fixed cluster (`nodes`:
    the alive nodes' resources, default: asked from Ray). A no-op on an autoscaling cluster."""
    if nodes is None:
        if cluster_autoscales():
            log.info("the cluster autoscales: not checking the actors' resources against its nodes")
            return
        nodes = alive_nodes()
    why = unsatisfiable(demands, nodes)
    if why is not None:
        raise ResourcesError(f"the job's actors can never start on this cluster: {why}")
