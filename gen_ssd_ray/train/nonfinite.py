"""Non-finite training steps: which are skipped, when the run fails, and what the driver is told.

A step whose global loss (summed over every rank and micro-batch) is NaN or infinite must never
reach the weights: the worker skips its update (see `gen_ssd_ray.train.worker`) and asks
`NonFiniteGuard.observe`, which counts such steps and raises `NonFiniteLossError` once there are more
than `runtime.max_nonfinite_steps` of them. Every rank sees the same all-reduced loss, so every rank
decides the same. Before that error is raised, rank 0 records the bad steps in `_nonfinite.json` in the
output folder (`write_report`), which the driver turns into its one-line failure message
(`failure_message`): the steps, the limit, the last good checkpoint, and what to change.

`check_weights_finite(flags)` is the last line of defence before a checkpoint or the exported model is
written: if any rank holds a non-finite weight, nothing is saved (`NonFiniteWeightsError`).

Plain Python; knows nothing about torch or DeepSpeed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gen_ssd_ray.common.fsio import atomic_write_json

REPORT = "_nonfinite.json"


class NonFiniteLossError(RuntimeError):
    """More non-finite steps than runtime.max_nonfinite_steps allows."""


class NonFiniteWeightsError(RuntimeError):
    """The weights hold NaN/inf: nothing is saved or exported."""


@dataclass
class NonFiniteGuard:
    """Counts non-finite steps of one run (resumed runs start a new count)."""

    limit: int  # runtime.max_nonfinite_steps
    bad_steps: list[int] = field(default_factory=list)

    def observe(self, step: int, loss: float) -> bool:
        """True when step `step` (1-based) may be applied; False when it must be skipped. Raises
        NonFiniteLossError when this step is one non-finite step too many."""
        if math.isfinite(loss):
            return True
        self.bad_steps.append(step)
        if len(self.bad_steps) > self.limit:
            raise NonFiniteLossError(
                f"the loss was not finite at step(s) {self.bad_steps}, more than "
                f"runtime.max_nonfinite_steps={self.limit}"
            )
        return False


def write_report(out_dir: Path, guard: NonFiniteGuard, last_checkpoint: str | None) -> None:
    atomic_write_json(
        Path(out_dir) / REPORT,
        {"bad_steps": guard.bad_steps, "limit": guard.limit, "last_checkpoint": last_checkpoint},
    )


def failure_message(out_dir: Path, report: dict[str, Any] | None) -> str | None:
    """The driver's one-line message for a run stopped by non-finite losses (None if it was not)."""
    if not report:
        return None
    last = report.get("last_checkpoint")
    kept = f"the last good checkpoint is {last}" if last else "no checkpoint was saved"
    return (
        f"training stopped: the loss was not finite (NaN/inf) at step(s) {report.get('bad_steps')}, more "
        f"than runtime.max_nonfinite_steps={report.get('limit')}; no update of those steps was applied and "
        f"nothing was exported; {kept} in {Path(out_dir) / 'checkpoints'}. Lower optim.lr, check the data, "
        "or raise runtime.max_nonfinite_steps to skip such steps, then re-run the same command to resume"
    )


def check_weights_finite(all_finite: bool, step: int, what: str) -> None:
    """Raise NonFiniteWeightsError unless every rank's weights are finite (`all_finite`, all-reduced)."""
    if not all_finite:
        raise NonFiniteWeightsError(
            f"the weights hold NaN/inf at step {step}: the {what} was not written (the last good "
            "checkpoint is kept)"
        )
