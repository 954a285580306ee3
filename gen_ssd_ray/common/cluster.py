"""Joining or starting Ray, the same way for every job."""

from __future__ import annotations

import os


def init_ray(address: str | None, local_num_cpus: int | None, dashboard: bool = False) -> None:
    """Join the cluster named by `address` or RAY_ADDRESS (set by `ray job submit`), else start a private
    local Ray with `local_num_cpus` CPUs (None: all). A no-op when Ray is already initialized (a
    pipeline runs every stage on one Ray). `dashboard` also serves the State API, which Ray Train's
    placement-group cleaner polls (without it, a warning a second)."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    elif dashboard:
        ray.init(
            num_cpus=local_num_cpus, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=True
        )
    else:
        ray.init(num_cpus=local_num_cpus, include_dashboard=False, log_to_driver=True)
