"""The simulated cluster end to end: `make bench-scale ARGS="--profile short"` (a few minutes).

The real driver, beam managers, dispatcher, actors and shard writer run against simulated engines at
1 and 8 engines, then on a Ray cluster of fake-GPU nodes through the short fault schedule (a teacher
engine core dies, a node is removed and another joins, a beam manager is killed, the driver is
SIGKILLed mid-shard and the command resubmitted). Checked: every problem is committed exactly once in
every scenario, admission and peak in-flight counts are what the config asks for, and the figures the
full benchmark reports are present. Speed figures are printed by the benchmark, never asserted here.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.integration
def test_bench_scale_short_profile():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "scripts.bench_scale", "--profile", "short"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for run in result["runs"]:
        assert run["error"] is None
        assert run["committed"] == run["problems"]
        assert run["peak_inflight"] == min(run["problems"], run["engines"] * 16)
        assert run["sim_tokens_per_s"] > 0 and 0 < run["engine_busy"] <= 1.0
    assert result["scaling_efficiency_8"] > 0
    sizes = result["manifest_bytes_per_problem"]
    assert sizes["20000"] < 2 * sizes["10000"]  # bytes, not time: the manifest is append-only
    faults = result["faults"]
    assert set(faults) == {
        "clean",
        "teacher_dead",
        "node_removed_readded",
        "manager_killed",
        "driver_sigkill_resubmit",
    }
    for name, f in faults.items():
        assert (f["committed"], f["lost"], f["duplicated"]) == (f["total"], 0, 0), (name, f)
        assert f["error"] is None, (name, f)
    assert (
        0
        < faults["driver_sigkill_resubmit"]["committed_before_kill"]
        < faults["driver_sigkill_resubmit"]["total"]
    )
