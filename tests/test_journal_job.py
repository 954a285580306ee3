"""Mid-trajectory resume end to end: `python -m jobs.generate` SIGKILLed (the whole process group) at
random instants and resubmitted, with the journal of accepted chunks (gen_ssd_ray.generate.journal).

- Simulated engines (deterministic): after two kills at random instants and a resubmission, the rows
  equal an uninterrupted run's (except the two cache-dependent cost columns: a restarted engine's
  prefix cache and the scorer's cache are cold), every problem is committed exactly once, the final
  run restored trajectories (`resume/*` > 0), and every trajectory journaled at a kill has a final
  response that begins with its journaled tokens.
- A real vLLM tiny-model run killed once: invariants only (vLLM is not batch-invariant).
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gen_ssd_ray.generate.journal import JOURNAL_DIR, decode_segment
from gen_ssd_ray.generate.manifest import read_output
from gen_ssd_ray.sim.harness import output_ids, write_problems

ROOT = Path(__file__).resolve().parents[1]
CACHE_DEPENDENT = {"student_tokens_processed", "teacher_cached_prompt_tokens"}


def journaled_prefixes(out: Path) -> dict[tuple[str, int], tuple[int, ...]]:
    """(problem id, trajectory) -> the accepted tokens of its consecutive journaled steps (beam 1)."""
    steps: dict[tuple[str, int], dict[int, dict]] = {}
    folder = out / JOURNAL_DIR
    for seg in sorted(folder.glob("*.jsonl.gz")) if folder.is_dir() else []:
        try:
            lines = decode_segment(seg.read_bytes())
        except FileNotFoundError:
            continue
        for line in lines:
            for s in line["steps"]:
                steps.setdefault((line["p"], line["t"]), {})[s["step"]] = s
    out_prefixes = {}
    for key, by_step in steps.items():
        ids: list[int] = []
        i = 0
        while i in by_step:
            for kept in by_step[i]["kept"][:1]:
                ids += kept[2]
            i += 1
        out_prefixes[key] = tuple(ids)
    return out_prefixes


def summary_of(stdout: str) -> dict:
    return json.loads(next(x for x in stdout.splitlines()[::-1] if x.startswith('{"output_dir"')))


def rows_by_key(out: Path) -> dict:
    return {(r["problem_id"], r["trajectory_index"]): r for r in read_output(out).to_pylist()}


def kill_at_random(cmd, env, out: Path, rng: random.Random, window_s: float, timeout_s: float = 300) -> bool:
    """Start the job, wait until its journal has a segment, then SIGKILL its process group after a
    random delay in [0, window_s). False if the job finished first."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True, stdout=subprocess.DEVNULL)
    deadline = time.time() + timeout_s
    try:
        while proc.poll() is None and time.time() < deadline:
            if any((out / JOURNAL_DIR).glob("seg-*.jsonl.gz")):
                break
            time.sleep(0.05)
        time.sleep(rng.uniform(0, window_s))
        if proc.poll() is not None:
            return False
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return True
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def sim_args(problems: Path, out: Path) -> list[str]:
    return [
        "--config",
        "conf/sim_cluster.yaml",
        f"data.path={problems}",
        f"output.dir={out}",
        "teacher.num_engines=2",
        "student.num_scorers=1",
        "sim.engines_per_actor=2",
        "runtime.num_beam_managers=1",
        "sim.model_load=false",
        "sim.time_compression=2",
        "teacher.max_inflight_problems=4",
        "output.shard_size=4",
        # 4 simulated seconds (2 wall-clock seconds): several journal writes per run
        "runtime.journal_interval_s=4",
        "search.max_new_tokens=2048",
        "search.chunk_tokens=256",
        "runtime.verify_workers=1",
    ]


@pytest.mark.integration
def test_sim_job_killed_at_random_instants_resumes_to_the_uninterrupted_rows(tmp_path):
    problems = write_problems(tmp_path / "p.jsonl", 16)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    job = [sys.executable, "-m", "jobs.generate"]

    ref = tmp_path / "ref"
    r = subprocess.run([*job, *sim_args(problems, ref)], cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert summary_of(r.stdout)["resume/trajectories_restored"] == 0
    assert not list((ref / JOURNAL_DIR).glob("*")), "a finished run compacts its journal away"

    out = tmp_path / "out"
    rng = random.Random(12)
    prefixes: dict = {}
    kills = 0
    for _ in range(2):
        if kill_at_random([*job, *sim_args(problems, out)], env, out, rng, window_s=3.0):
            kills += 1
            prefixes.update(journaled_prefixes(out))
    assert kills >= 1 and prefixes, "no kill landed while trajectories were journaled"

    r = subprocess.run([*job, *sim_args(problems, out)], cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = summary_of(r.stdout)
    assert summary["resume/trajectories_restored"] > 0, summary
    assert summary["resume/teacher_tokens_restored"] > 0, summary

    ids = output_ids(out)
    assert len(ids) == 16 and set(ids.values()) == {1}  # none lost, none duplicated
    want, got = rows_by_key(ref), rows_by_key(out)
    assert sorted(got) == sorted(want)
    for key, row in got.items():
        for col, value in want[key].items():
            if col in CACHE_DEPENDENT:
                continue
            assert row[col] == value, (key, col)
    for key, prefix in prefixes.items():
        response = tuple(got[key]["response_token_ids"] or ())
        assert response[: len(prefix)] == prefix, key


@pytest.mark.integration
def test_vllm_job_killed_once_resumes_with_journaled_prefixes(tmp_path, tiny_model, tiny_student):
    """Real vLLM on CPU (tiny models): one SIGKILL after the journal's first segment, then the same
    command: exactly once, the final run restored trajectories, responses begin with the journaled
    tokens (equality with an uninterrupted run is not expected: vLLM is not batch-invariant)."""
    from tests.test_job_e2e import job_args
    from tests.test_job_e2e import write_problems as write_e2e_problems

    data = write_e2e_problems(tmp_path / "p.jsonl", 6, bad=False)
    out = tmp_path / "out"
    args = job_args(
        tiny_model,
        tiny_student,
        data,
        out,
        "output.shard_size=2",
        "search.max_new_tokens=96",
        "search.chunk_tokens=8",
        "teacher.max_inflight_problems=3",
        "runtime.journal_interval_s=0.5",
    )
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "jobs.generate", *args]
    assert kill_at_random(cmd, env, out, random.Random(3), window_s=1.0, timeout_s=400)
    prefixes = journaled_prefixes(out)
    assert prefixes
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = summary_of(r.stdout)
    ids = output_ids(out)
    assert len(ids) == 6 and set(ids.values()) == {1}
    got = rows_by_key(out)
    uncommitted_at_kill = [k for k in prefixes if k in got]
    assert summary["resume/trajectories_restored"] > 0, summary
    for key in uncommitted_at_kill:
        response = tuple(got[key]["response_token_ids"] or ())
        assert response[: len(prefixes[key])] == prefixes[key], key
