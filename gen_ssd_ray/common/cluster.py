"""Joining or starting Ray, the same way for every job."""

from __future__ import annotations

import os
import signal
import threading


def init_ray(address: str | None, local_num_cpus: int | None, dashboard: bool = False) -> None:
    """Join the cluster named by `address` or RAY_ADDRESS (set by `ray job submit`), else start a private
    local Ray with `local_num_cpus` CPUs (None: all), even when a head started by `ray start` runs on
    this machine (a plain `ray.init()` would join it, and refuse `num_cpus`). A no-op when Ray is already initialized (a
    pipeline runs every stage on one Ray). `dashboard` also serves the State API, which Ray Train's
    placement-group cleaner polls (without it, a warning a second).

    `ray.init` installs its own SIGTERM handler (`sys.exit`); a handler the job had installed before
    (gen_ssd_ray.common.interrupts) is put back, so SIGTERM keeps meaning what the job's policy says."""
    import ray

    if ray.is_initialized():
        return
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main else None
    try:
        _init(ray, address or os.environ.get("RAY_ADDRESS"), local_num_cpus, dashboard)
    finally:
        if previous not in (None, signal.SIG_DFL):
            signal.signal(signal.SIGTERM, previous)


def _init(ray, address: str | None, local_num_cpus: int | None, dashboard: bool) -> None:
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
