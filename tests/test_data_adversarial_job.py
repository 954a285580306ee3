"""Adversarial data through the real generation job (simulated engines, real Ray, real shard writer):
rows with strings UTF-8 cannot encode, junk gold answers, junk and duplicate ids and an id column
that changes type are committed as error rows with the key named, the good rows are generated, and a
re-run of the same command skips everything (before, the writer crashed on every run).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[1]

ROWS = [
    {"question": "Tom has 3 apples and buys 4 more. How many apples?", "answer": "3+4\n#### 7", "id": 1},
    {"question": "What is 2+3?", "answer": "#### 5", "id": 2.0},  # canonical id "2"
    {"question": "Bad \ud800 question?", "answer": "#### 1", "id": 3},
    {"question": "Bad id?", "answer": "#### 1", "id": "x\udc80"},
    {"question": "Bad answer?", "answer": "#### 1\ud800", "id": 5},
    {"question": "Bare hashes?", "answer": "####", "id": 6},
    {"question": "List answer?", "answer": [1, 2], "id": 7},
    {"question": "NaN answer?", "answer": float("nan"), "id": 8},
    {"question": "List id?", "answer": "#### 2", "id": [9]},
    {"question": "Same id as row 1?", "answer": "#### 2", "id": "2"},
    {"question": "What is 4+4?", "answer": 8.0, "id": 11},
]
# problem_id -> the key its error names (None: generated)
EXPECTED = {
    "1": None,
    "2": None,
    "3": "data.question_field",
    "!adv-3": "data.id_field",
    "5": "data.answer_field",
    "6": "data.answer_field",
    "7": "data.answer_field",
    "8": "data.answer_field",
    "!adv-8": "data.id_field",
    "!adv-9": "data.id_field",
    "11": None,
}


def run_job(data: Path, out: Path) -> subprocess.CompletedProcess:
    args = [
        "--config",
        "conf/sim_cluster.yaml",
        f"data.path={data}",
        "data.id_field=id",
        f"output.dir={out}",
        "teacher.num_engines=1",
        "student.num_scorers=1",
        "runtime.num_beam_managers=1",
        "runtime.local_num_cpus=2",
        "sim.engines_per_actor=1",
        "sim.time_compression=100",
        "search.max_new_tokens=64",
        "search.chunk_tokens=16",
        "teacher.max_model_len=2048",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "jobs.generate", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.integration
def test_generation_job_commits_adversarial_rows_as_error_rows_once(tmp_path):
    data = tmp_path / "adv.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    out = tmp_path / "out"
    first = run_job(data, out)
    assert first.returncode == 0, first.stderr[-3000:]
    table = pq.read_table(out, columns=["problem_id", "status", "error", "question", "gold_answer"])
    rows = {r["problem_id"]: r for r in table.to_pylist()}
    assert set(rows) == set(EXPECTED) and table.num_rows == len(EXPECTED)  # each problem once
    for pid, key in EXPECTED.items():
        row = rows[pid]
        if key is None:
            assert row["status"] != "error", row
        else:
            assert row["status"] == "error" and key in row["error"], row
    assert rows["2"]["gold_answer"] == "5" and rows["11"]["gold_answer"] == "8"  # 8.0: canonical "8"
    again = run_job(data, out)
    assert again.returncode == 0, again.stderr[-3000:]
    summary = json.loads(again.stdout.strip().splitlines()[-1])
    assert summary["problems_skipped_already_committed"] == len(EXPECTED)
    assert summary["problems_done_this_run"] == 0
