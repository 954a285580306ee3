"""`ray job submit --working-dir .` against a head started with `ray start --head`, as documented."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_job_e2e import job_args, write_problems

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ray_job_submit_to_local_head(tmp_path, tiny_model, tiny_student):
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "disabled",
        "PATH": f"{BIN}:{os.environ['PATH']}",  # the job's `python` is the project's venv
        "VLLM_CPU_KVCACHE_SPACE": "1",
    }
    env.pop("RAY_ADDRESS", None)
    dash, port = free_port(), free_port()
    head = [
        str(BIN / "ray"),
        "start",
        "--head",
        "--num-cpus",
        "2",
        "--port",
        str(port),
        "--dashboard-host",
        "127.0.0.1",
        "--dashboard-port",
        str(dash),
        "--include-dashboard",
        "true",
    ]
    subprocess.run(head, env=env, check=True, capture_output=True, timeout=120)
    try:
        # With no address, a job starts its own Ray even while this head runs (a plain `ray.init()` joins
        # the head and refuses num_cpus: how a leftover head once failed every job of a test run).
        private = subprocess.run(
            [
                sys.executable,
                "-c",
                "import ray; from gen_ssd_ray.common.cluster import init_ray; init_ray(None, 1); "
                "print('GCS', ray.get_runtime_context().gcs_address); ray.shutdown()",
            ],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert private.returncode == 0, private.stderr[-3000:]
        gcs = [line for line in private.stdout.splitlines() if line.startswith("GCS ")]
        assert gcs and not gcs[0].endswith(f":{port}"), (gcs, port)
        data = write_problems(tmp_path / "p.jsonl", 2, bad=False)
        out = tmp_path / "out"
        env["RAY_ADDRESS"] = f"http://127.0.0.1:{dash}"
        for _ in range(60):  # the job server comes up shortly after the head
            if (
                subprocess.run([str(BIN / "ray"), "job", "list"], env=env, capture_output=True).returncode
                == 0
            ):
                break
            time.sleep(1)
        r = subprocess.run(
            [
                str(BIN / "ray"),
                "job",
                "submit",
                "--working-dir",
                ".",
                "--",
                "python",
                "-m",
                "jobs.generate",
                *job_args(tiny_model, tiny_student, data, out),
            ],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
        assert "succeeded" in r.stdout
        import pandas as pd

        df = pd.read_parquet(out)
        assert len(df) == 2 and set(df.status) <= {"completed", "truncated", "pruned"}
    finally:
        subprocess.run([str(BIN / "ray"), "stop", "--force"], env=env, capture_output=True, timeout=120)
