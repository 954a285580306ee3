"""Experiment tracking: where a job's metrics go besides its own files (TensorBoard, MLflow, W&B).

- `LoggingConfig` is the `logging` section of every job's config: which backends (`backends`, none by
  default), the local folder for their files (`dir`, default `<output.dir>/tracking`; for an object-store
  output.dir the job's local staging folder, never uploaded), the project and run name, and how W&B
  and MLflow connect (offline W&B and a local MLflow file store unless configured).
- `open_tracker(cfg, job, output_dir, config=...)` returns a `Tracker`: `log(metrics, step)`,
  `log_params(params)` (the job's config, once, at the start) and `close()`. With no backend it is a
  no-op that imports nothing.

Layout under `dir`: `tensorboard/<run_name>/` (event files), `mlruns/` (the MLflow file store, unless
`mlflow_tracking_uri` points elsewhere), `wandb/` (W&B run folders; `wandb sync` uploads offline ones).
A run is identified by its job and output folder (`run_key`): re-running the same command continues
the same MLflow run and W&B run id, and TensorBoard drops the points a resumed job replays
(`start_step`).

Who logs: the driver of generation and evaluation, rank 0 of fine-tuning. Metric names are namespaced
(`train/loss`, `teacher/tokens_per_s`, `search/pruned_frac`, `eval/accuracy`); None, NaN and non-numbers
are left out of a step. Tracking never fails a job once it runs: a backend that raises is warned about
once and dropped; what can be checked before anything starts (names, installed packages, a local
`dir`) is checked by `LoggingConfig.validate` (ConfigError naming the key and the fix).

Knows nothing about the jobs' metrics themselves; torch (TensorBoard's writer), mlflow and wandb are
imported only when their backend is opened.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import logging
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("gen_ssd_ray")

# Backend name -> the module it needs (all from the `tracking` extra).
BACKENDS = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}
EXTRA = "pip install -e '.[tracking]'"
WANDB_MODES = ("offline", "online", "disabled")
# MLflow's limit on a parameter value (longer ones are cut).
_MLFLOW_PARAM_CHARS = 6000


@dataclass(frozen=True)
class LoggingConfig:
    # Experiment trackers to log metrics to: any of tensorboard, mlflow, wandb ([]: none). They need the
    # `tracking` extra (pip install -e '.[tracking]').
    backends: list[str] = field(default_factory=list)
    # Local folder for the trackers' files: tensorboard/<run_name>/, mlruns/, wandb/ (null:
    # <output.dir>/tracking; with an object-store output.dir, under the job's local staging folder).
    dir: str | None = None
    # Project: the MLflow experiment and the W&B project.
    project: str = "gen-ssd-ray"
    # Run name (null: <job>-<output folder name>, e.g. finetune-gen_ssd).
    run_name: str | None = None
    # W&B mode: offline (files under dir; upload later with `wandb sync`), online or disabled (null:
    # WANDB_MODE if set, else online when WANDB_API_KEY is set, else offline).
    wandb_mode: str | None = None
    # MLflow tracking URI, e.g. http://host:5000 for a server (null: MLFLOW_TRACKING_URI if
    # set, else a local file store in <dir>/mlruns).
    mlflow_tracking_uri: str | None = None

    def validate(self, key: str = "logging") -> None:
        from gen_ssd_ray.common.config import require
        from gen_ssd_ray.common.storage import is_remote

        names = list(self.backends)
        unknown = [b for b in names if b not in BACKENDS]
        require(
            not unknown,
            f"{key}.backends",
            f"unknown backend(s) {unknown}; choose from {', '.join(sorted(BACKENDS))} (e.g. [tensorboard])",
        )
        require(len(set(names)) == len(names), f"{key}.backends", f"lists a backend twice: {names}")
        missing = [b for b in names if importlib.util.find_spec(BACKENDS[b]) is None]
        require(
            not missing,
            f"{key}.backends",
            f"{', '.join(missing)} not installed: install the tracking extra ({EXTRA}) or remove "
            f"{', '.join(missing)} from {key}.backends",
        )
        require(
            self.dir is None or (bool(self.dir) and not is_remote(self.dir)),
            f"{key}.dir",
            f"must be a local folder (or null for <output.dir>/tracking), got {self.dir!r}",
        )
        require(bool(self.project), f"{key}.project", "must not be empty")
        require(
            self.run_name is None or (bool(self.run_name) and "/" not in self.run_name),
            f"{key}.run_name",
            f"must be a non-empty name without '/' (or null), got {self.run_name!r}",
        )
        require(
            self.wandb_mode is None or self.wandb_mode in WANDB_MODES,
            f"{key}.wandb_mode",
            f"must be one of {', '.join(WANDB_MODES)} or null, got {self.wandb_mode!r}",
        )


# ---- where and what -----------------------------------------------------------------------------------


def tracking_dir(cfg: LoggingConfig, output_dir: str, job: str) -> Path:
    """The local folder for the trackers' files: `cfg.dir`, else `<output_dir>/tracking`, else (an
    object-store output_dir) the job's local staging folder's `tracking/`. Absolute."""
    from gen_ssd_ray.common.storage import is_remote

    if cfg.dir:
        return Path(cfg.dir).expanduser().resolve()
    if is_remote(output_dir):
        from gen_ssd_ray.common.models import staging_dir

        return staging_dir(output_dir, job) / "tracking"
    return Path(output_dir).expanduser().resolve() / "tracking"


def run_key(job: str, output_dir: str) -> str:
    """A run's identity across re-runs: its job and output folder (a local folder resolved)."""
    from gen_ssd_ray.common.storage import is_remote

    where = output_dir if is_remote(output_dir) else str(Path(output_dir).expanduser().resolve())
    return hashlib.sha256(f"{job}:{where}".encode()).hexdigest()[:16]


def default_run_name(job: str, output_dir: str) -> str:
    return f"{job}-{output_dir.rstrip('/').rsplit('/', 1)[-1] or job}"


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """A config (dataclass or nested dict) as {dotted key: value}; lists stay values."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = dataclasses.asdict(obj)
    if not isinstance(obj, Mapping):
        return {prefix: obj}
    flat: dict[str, Any] = {}
    for k, v in obj.items():
        flat.update(flatten(v, f"{prefix}{k}."))
    return {k.rstrip("."): v for k, v in flat.items()}


def numbers(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The finite numbers of `metrics` as floats (None, NaN, bools and anything else left out)."""
    out = {}
    for k, v in metrics.items():
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
            out[k] = float(v)
    return out


def format_duration(seconds: float | None) -> str:
    """`3m12s`, `1h04m`, `45s`; `?` when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


# ---- the facade -------------------------------------------------------------------------------------


class Tracker:
    """Fans `log` / `log_params` out to the open backends. A backend that raises is dropped with one
    warning: tracking never fails the job."""

    def __init__(self, sinks: list[Any] | None = None):
        self.sinks = list(sinks or [])

    @property
    def enabled(self) -> bool:
        return bool(self.sinks)

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        """Log the finite numbers of `metrics` at `step`."""
        if not self.sinks:
            return
        values = numbers(metrics)
        if values:
            self._each("log", values, int(step))

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log the run's parameters (a flat {key: value}; see `flatten`) once."""
        if self.sinks:
            self._each("log_params", dict(params))

    def close(self) -> None:
        self._each("close")
        self.sinks = []

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _each(self, method: str, *args: Any) -> None:
        for sink in list(self.sinks):
            try:
                getattr(sink, method)(*args)
            except Exception as e:
                log.warning(
                    "tracking: %s failed in %s (%s); it is not logged to any more", sink.name, method, e
                )
                self.sinks.remove(sink)
                try:
                    sink.close()
                except Exception:
                    pass


def open_tracker(
    cfg: LoggingConfig,
    job: str,
    output_dir: str,
    *,
    config: Any = None,
    start_step: int | None = None,
    root: str | Path | None = None,
) -> Tracker:
    """Open `cfg.backends` for a run of `job` writing to `output_dir` and log `config` (a dataclass or
    dict, flattened) as its parameters. `start_step`: the first step this process logs (a resumed
    job's; TensorBoard drops older points from there on). `root`: the tracking folder if already
    resolved (else `tracking_dir`). A backend that cannot open is warned about and skipped."""
    if not cfg.backends:
        return Tracker()
    folder = Path(root) if root is not None else tracking_dir(cfg, output_dir, job)
    name = cfg.run_name or default_run_name(job, output_dir)
    key = run_key(job, output_dir)
    openers = {"tensorboard": _TensorBoard, "mlflow": _MLflow, "wandb": _WandB}
    sinks = []
    for backend in cfg.backends:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            sinks.append(openers[backend](cfg, folder, name, key, start_step))
        except Exception as e:
            log.warning(
                "tracking: cannot open %s in %s (%s); the run is not logged there", backend, folder, e
            )
    tracker = Tracker(sinks)
    if tracker.enabled:
        log.info("tracking %s run %r with %s in %s", job, name, ", ".join(s.name for s in sinks), folder)
    if config is not None:
        tracker.log_params(flatten(config))
    return tracker


# ---- backends ---------------------------------------------------------------------------------------


class _TensorBoard:
    name = "tensorboard"

    def __init__(self, cfg: LoggingConfig, folder: Path, run_name: str, key: str, start_step: int | None):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(
            str(folder / "tensorboard" / run_name), purge_step=start_step, flush_secs=30
        )

    def log(self, metrics: dict[str, float], step: int) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()  # a crashed job keeps what it logged

    def log_params(self, params: dict[str, Any]) -> None:
        text = "\n".join(f"    {k} = {v}" for k, v in params.items())  # a Markdown code block
        self.writer.add_text("config", text)

    def close(self) -> None:
        self.writer.close()


class _MLflow:
    name = "mlflow"
    KEY_TAG = "gen_ssd_ray_run_key"

    def __init__(self, cfg: LoggingConfig, folder: Path, run_name: str, key: str, start_step: int | None):
        from mlflow.tracking import MlflowClient

        uri = cfg.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or (folder / "mlruns").as_uri()
        if uri.startswith("file:"):
            # MLflow 3 keeps its file store for local use only on request; it is what needs no server.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = client = MlflowClient(tracking_uri=uri)
        exp = client.get_experiment_by_name(cfg.project)
        exp_id = exp.experiment_id if exp is not None else client.create_experiment(cfg.project)
        found = client.search_runs([exp_id], filter_string=f"tags.{self.KEY_TAG} = '{key}'", max_results=1)
        if found:  # the same job and output folder: continue its run
            self.run_id = found[0].info.run_id
            client.update_run(self.run_id, status="RUNNING")
        else:
            self.run_id = client.create_run(exp_id, run_name=run_name, tags={self.KEY_TAG: key}).info.run_id

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        known = self.client.get_run(self.run_id).data.params  # a continued run: params are immutable
        items = [Param(k, str(v)[:_MLFLOW_PARAM_CHARS]) for k, v in params.items() if k not in known]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class _WandB:
    name = "wandb"

    def __init__(self, cfg: LoggingConfig, folder: Path, run_name: str, key: str, start_step: int | None):
        import wandb

        mode = cfg.wandb_mode
        if mode is None and not os.environ.get("WANDB_MODE"):
            mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
        self.run = wandb.init(
            project=cfg.project,
            name=run_name,
            id=key,
            resume=None if mode == "offline" else "allow",  # (offline runs cannot resume: W&B warns)
            dir=str(folder),
            mode=mode,
            reinit="create_new",  # the pipeline opens one run per stage in one process
            settings=wandb.Settings(console="off", silent=True),
        )

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def log_params(self, params: dict[str, Any]) -> None:
        self.run.config.update(params, allow_val_change=True)

    def close(self) -> None:
        self.run.finish()
