"""Output schema and exactly-once shard writing (gen_ssd_ray.generate.output)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from unittest.mock import ANY

import pandas as pd
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from gen_ssd_ray.generate.manifest import MANIFEST_LOG_NAME, MANIFEST_NAME, read_manifest, read_output
from gen_ssd_ray.generate.output import FingerprintMismatchError, OutputLockedError, ShardWriter
from gen_ssd_ray.generate.rows import OUTPUT_SCHEMA, empty_table, rows_to_table

REPO = Path(__file__).resolve().parents[1]
FP = "fp-aaaa"


def make_row(problem_id: str, trajectory_index: int = 0, **over) -> dict:
    row = {
        "problem_id": problem_id,
        "trajectory_index": trajectory_index,
        "question": "Tom has 3 apples and buys 4 more. How many apples?",
        "gold_answer": "7",
        "messages": [
            {"role": "user", "content": "Tom has 3 apples and buys 4 more. How many apples?"},
            {"role": "assistant", "content": "3 + 4 = 7. The answer is 7."},
        ],
        "prompt": [{"role": "user", "content": "Tom has 3 apples and buys 4 more. How many apples?"}],
        "completion": [{"role": "assistant", "content": "3 + 4 = 7. The answer is 7."}],
        "prompt_text": "<|im_start|>user\nTom has 3 apples...<|im_end|>\n<|im_start|>assistant\n",
        "response": "3 + 4 = 7. The answer is 7.",
        "response_token_ids": [18, 1232, 36, 2, 7, 30],
        "chunks": [
            {
                "candidates": [
                    {"text": "3 + 4 = 7.", "num_tokens": 4, "finish_reason": "length", "ppl": 1.8},
                    {"text": "3 * 4 = 12.", "num_tokens": 4, "finish_reason": "length", "ppl": 5.25},
                ],
                "chosen": 0,
            },
            {
                "candidates": [
                    {"text": " The answer is 7.", "num_tokens": 2, "finish_reason": "stop", "ppl": 1.1},
                ],
                "chosen": 0,
            },
        ],
        "status": "completed",
        "error": None,
        "final_answer": "7",
        "correct": None,  # unverified
        "student_ppl": 1.5,
        "num_response_tokens": 6,
        "teacher_tokens_generated": 10,
        "student_tokens_processed": 14,
        "student_tokens_scored": 10,
        "teacher_prompt_tokens": 40,
        "teacher_cached_prompt_tokens": 32,
        "teacher_model": "embedded:teacher",
        "student_model": "embedded:student",
        "sampling": {
            "temperature": 0.7,
            "top_p": 0.95,
            "chunk_tokens": 4,
            "num_candidates": 2,
            "beam_width": 1,
            "max_new_tokens": 64,
            "prune_ppl": 20.0,
        },
        "seed": 1234,
        "config_fingerprint": FP,
        "method": "gen_ssd",
        "selected": None,
    }
    row.update(over)
    return row


def rows_for(pid: str, n: int = 2) -> list[dict]:
    return [make_row(pid, t) for t in range(n)]


def writer(out: Path, shard_size: int = 2, fingerprint: str = FP, **kw) -> ShardWriter:
    return ShardWriter(out, fingerprint=fingerprint, config_yaml="seed: 1\n", shard_size=shard_size, **kw)


def part_files(out: Path) -> list[str]:
    return sorted(p.name for p in out.glob("part-*.parquet"))


def log_lines(out: Path) -> list[dict]:
    """The manifest log's records (every line must be complete)."""
    path = out / MANIFEST_LOG_NAME
    if not path.exists():
        return []
    data = path.read_bytes()
    assert not data or data.endswith(b"\n")
    return [json.loads(line) for line in data.splitlines()]


# ------------------------------------------------------------------------------------------------
# Schema


def test_schema_round_trip(tmp_path):
    rows = [make_row("p1", 0), make_row("p1", 1, status="error", error="teacher timeout", correct=False)]
    rows[1].pop("chunks")  # missing key -> null
    table = rows_to_table(rows)
    assert table.schema == OUTPUT_SCHEMA
    pq.write_table(table, tmp_path / "x.parquet")
    back = pq.read_table(tmp_path / "x.parquet")
    assert back.schema == OUTPUT_SCHEMA
    got = back.to_pylist()
    assert got[0] == make_row("p1", 0)
    assert got[0]["correct"] is None
    assert got[0]["chunks"][0]["candidates"][1]["ppl"] == 5.25
    assert got[1]["chunks"] is None and got[1]["error"] == "teacher timeout" and got[1]["correct"] is False
    assert empty_table().schema == OUTPUT_SCHEMA and empty_table().num_rows == 0


@pytest.mark.parametrize(
    "over, match",
    [
        ({"bogus": 1}, "unknown column"),
        ({"sampling": {"temperature": 1.0, "topp": 0.9}}, "sampling.topp"),
        (
            {"chunks": [{"candidates": [{"text": "a", "pll": 1.0}], "chosen": 0}]},
            r"chunks\[0\].candidates\[0\].pll",
        ),
        ({"trajectory_index": "zero"}, "trajectory_index"),
        ({"status": "done"}, "status"),
        ({"status": None}, "status"),
        ({"error": "oops"}, "error"),
        ({"status": "error"}, "needs a reason"),
        ({"problem_id": None}, "problem_id"),
    ],
)
def test_rows_to_table_rejects(over, match):
    with pytest.raises(ValueError, match=match):
        rows_to_table([{**make_row("p1"), **over}])


# ------------------------------------------------------------------------------------------------
# ShardWriter


def test_batching_and_readers(tmp_path):
    out = tmp_path / "out"
    w = writer(out, shard_size=2)
    assert w.add("a", rows_for("a")) is None
    assert w.add("b", rows_for("b")) == "part-00000.parquet"
    assert w.add("c", rows_for("c")) is None
    assert w.add("d", rows_for("d")) == "part-00001.parquet"
    assert w.add("e", rows_for("e")) is None
    assert w.num_buffered == 1 and "e" in w and "a" in w and "z" not in w
    assert w.close() == "part-00002.parquet"
    assert part_files(out) == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]

    m = read_manifest(out)
    assert m["version"] == 1 and m["fingerprint"] == FP
    assert [s["problem_ids"] for s in m["shards"]] == [["a", "b"], ["c", "d"], ["e"]]
    assert [s["num_rows"] for s in m["shards"]] == [4, 4, 2]
    assert m["num_problems"] == 5 and m["num_rows"] == 10
    assert (out / "_config.yaml").read_text() == "seed: 1\n"

    # A half-written temp file must be invisible to folder readers.
    (out / ".tmp-part-00003.parquet").write_bytes(b"PAR1 garbage")
    table = read_output(out)
    assert table.schema == OUTPUT_SCHEMA and table.num_rows == 10
    df = pd.read_parquet(out)
    assert len(df) == 10 and not df.duplicated(["problem_id", "trajectory_index"]).any()
    assert pads.dataset(out, format="parquet").to_table().num_rows == 10
    assert read_output(tmp_path / "nothing").num_rows == 0


def test_resume_sees_committed_ids(tmp_path):
    out = tmp_path / "out"
    with writer(out, shard_size=2) as w:
        for pid in "abc":
            w.add(pid, rows_for(pid))
    w2 = writer(out, shard_size=2)
    assert w2.committed_ids == {"a", "b", "c"}
    with pytest.raises(ValueError, match="already committed"):
        w2.add("b", rows_for("b"))
    w2.add("d", rows_for("d"))
    assert w2.close() == "part-00002.parquet"
    assert set(read_output(out).column("problem_id").to_pylist()) == set("abcd")


def test_duplicate_and_bad_adds_refused(tmp_path):
    w = writer(tmp_path, shard_size=10)
    w.add("a", rows_for("a"))
    with pytest.raises(ValueError, match="already added"):
        w.add("a", rows_for("a"))
    with pytest.raises(ValueError, match="no rows"):
        w.add("b", [])
    with pytest.raises(ValueError, match="row of problem"):
        w.add("b", rows_for("c"))
    with pytest.raises(ValueError, match="problem 'b'.*unknown column"):
        w.add("b", [make_row("b", bogus=1)])
    assert "b" not in w
    w.close()
    with pytest.raises(RuntimeError, match="closed"):
        w.add("z", rows_for("z"))


@pytest.mark.parametrize("written", ["nothing", "half", "all"])
def test_interrupted_log_append_is_retried(tmp_path, monkeypatch, written):
    """An interrupt (SIGTERM -> KeyboardInterrupt) in a shard's log append: close() records it, once."""
    import gen_ssd_ray.generate.output as output

    w = writer(tmp_path, shard_size=1)

    def interrupted(fd: int, data: bytes) -> int:
        os.write(fd, data[: {"nothing": 0, "half": len(data) // 2, "all": len(data)}[written]])
        raise KeyboardInterrupt

    monkeypatch.setattr(output, "_append", interrupted)
    with pytest.raises(KeyboardInterrupt):
        w.add("a", rows_for("a"))
    monkeypatch.undo()
    assert w.committed_ids == {"a"}
    # A torn line is not a record; a whole one is, even before the writer knows it landed.
    assert [s["problem_ids"] for s in read_manifest(tmp_path)["shards"]] == (
        [["a"]] if written == "all" else []
    )
    assert w.close() is None
    assert [s["problem_ids"] for s in read_manifest(tmp_path)["shards"]] == [["a"]]
    assert len(log_lines(tmp_path)) == 1  # the remains were cut off before the line was written again
    assert part_files(tmp_path) == ["part-00000.parquet"]


def test_one_writer_per_folder(tmp_path):
    w = writer(tmp_path)
    with pytest.raises(OutputLockedError):
        writer(tmp_path)
    w.close()
    writer(tmp_path).close()


def test_orphan_adoption_and_stale_tmp(tmp_path):
    out = tmp_path / "out"
    with writer(out, shard_size=1) as w:
        w.add("a", rows_for("a"))
    # Crash between the shard rename and the manifest update: a complete shard not in the manifest.
    pq.write_table(rows_to_table(rows_for("b") + rows_for("c")), out / "part-00001.parquet")
    # An orphan whose ids are already committed (must be deleted, not adopted).
    pq.write_table(rows_to_table(rows_for("a")), out / "part-00002.parquet")
    (out / ".tmp-part-00003.parquet").write_bytes(b"half written")
    (out / ".tmp-manifest.json").write_text("{")

    w = writer(out, shard_size=1)
    assert w.committed_ids == {"a", "b", "c"}
    assert not list(out.glob(".tmp-*"))
    assert part_files(out) == ["part-00000.parquet", "part-00001.parquet"]
    m = read_manifest(out)
    assert [s["problem_ids"] for s in m["shards"]] == [["a"], ["b", "c"]]
    assert m["num_problems"] == 3 and m["num_rows"] == 6
    # The next shard gets an index never used before.
    assert w.add("d", rows_for("d")) == "part-00003.parquet"
    w.close()
    assert sorted(pd.read_parquet(out)["problem_id"].unique()) == ["a", "b", "c", "d"]


def test_orphans_without_manifest_are_adopted(tmp_path):
    pq.write_table(rows_to_table(rows_for("a")), tmp_path / "part-00000.parquet")
    w = writer(tmp_path)
    assert w.committed_ids == {"a"}
    w.close()
    # ...but not when their rows were written with another config.
    other = tmp_path / "other"
    other.mkdir()
    pq.write_table(rows_to_table([make_row("a", config_fingerprint="fp-old")]), other / "part-00000.parquet")
    with pytest.raises(FingerprintMismatchError, match="fp-old"):
        writer(other)
    assert part_files(other) == ["part-00000.parquet"]


def test_fingerprint_mismatch_and_force(tmp_path):
    with writer(tmp_path) as w:
        w.add("a", rows_for("a"))
    (tmp_path / ".tmp-part-00001.parquet").write_bytes(b"x")
    with pytest.raises(FingerprintMismatchError) as ei:
        writer(tmp_path, fingerprint="fp-bbbb")
    msg = str(ei.value)
    for part in (FP, "fp-bbbb", str(tmp_path), "output.dir", "output.force=true"):
        assert part in msg
    assert isinstance(ei.value, ValueError)
    # A refused open changes nothing.
    assert (tmp_path / ".tmp-part-00001.parquet").exists()
    assert read_manifest(tmp_path)["fingerprint"] == FP

    w = writer(tmp_path, fingerprint="fp-bbbb", force=True)
    assert w.committed_ids == {"a"}
    w.close()
    m = read_manifest(tmp_path)
    assert m["fingerprint"] == "fp-bbbb"
    assert [(h["fingerprint"], h["forced"]) for h in m["fingerprint_history"]] == [
        (FP, False),
        ("fp-bbbb", True),
    ]
    writer(tmp_path, fingerprint="fp-bbbb").close()  # same fingerprint now: no force needed


# ------------------------------------------------------------------------------------------------
# The manifest: snapshot + append-only log


def test_flushes_append_to_the_log_and_never_rewrite_the_snapshot(tmp_path, monkeypatch):
    import gen_ssd_ray.generate.output as output

    out = tmp_path / "out"
    w = writer(out, shard_size=1)
    snapshot = out / MANIFEST_NAME
    before, inode = snapshot.read_bytes(), snapshot.stat().st_ino
    assert w.manifest_bytes_written == len(before) and log_lines(out) == []

    def no_rewrite(path, data):
        raise AssertionError(f"flush rewrote {path}")

    monkeypatch.setattr(output, "atomic_write_bytes", no_rewrite)
    for i, pid in enumerate("abc"):
        w.add(pid, rows_for(pid))
        assert len(log_lines(out)) == i + 1  # one line per shard
    assert w.close() is None
    monkeypatch.undo()
    assert snapshot.read_bytes() == before and snapshot.stat().st_ino == inode
    assert [r["shard"]["problem_ids"] for r in log_lines(out)] == [["a"], ["b"], ["c"]]
    assert w.manifest_bytes_written == len(before) + (out / MANIFEST_LOG_NAME).stat().st_size
    m = read_manifest(out)
    assert [s["name"] for s in m["shards"]] == part_files(out)
    assert m["num_problems"] == 3 and m["num_rows"] == 6 and m["fingerprint"] == FP
    assert m["updated"] == m["shards"][-1]["created"]

    # The next open compacts: the snapshot holds everything, the log is empty, reads are unchanged.
    w2 = writer(out, shard_size=1)
    assert log_lines(out) == [] and json.loads(snapshot.read_text()) == m | {"updated": ANY}
    assert read_manifest(out) == json.loads(snapshot.read_text())
    w2.add("d", rows_for("d"))
    w2.close()
    assert read_manifest(out)["num_problems"] == 4 and len(log_lines(out)) == 1


def test_torn_last_log_line_is_ignored_then_compacted_away(tmp_path):
    out = tmp_path / "out"
    with writer(out, shard_size=1) as w:
        for pid in "ab":
            w.add(pid, rows_for(pid))
    # A kill in the append of shard 2's record: its shard is complete, its line is cut short.
    pq.write_table(rows_to_table(rows_for("c")), out / "part-00002.parquet")
    with open(out / MANIFEST_LOG_NAME, "ab") as f:
        f.write(b'{"shard":{"name":"part-00002.parquet","problem_ids":["c"],"num_ro')
    m = read_manifest(out)
    assert [s["problem_ids"] for s in m["shards"]] == [["a"], ["b"]] and m["num_problems"] == 2

    w = writer(out, shard_size=1)  # adopts the orphan, compacts the torn tail away
    assert w.committed_ids == {"a", "b", "c"} and log_lines(out) == []
    w.add("d", rows_for("d"))
    w.close()
    assert [r["shard"]["problem_ids"] for r in log_lines(out)] == [["d"]]
    assert [s["problem_ids"] for s in read_manifest(out)["shards"]] == [["a"], ["b"], ["c"], ["d"]]
    assert check_folder(out, rows_per_problem=2) == set("abcd")


def test_unparsable_last_log_line_is_ignored_but_corruption_before_it_is_an_error(tmp_path):
    out = tmp_path / "out"
    with writer(out, shard_size=1) as w:
        w.add("a", rows_for("a"))
    log_path = out / MANIFEST_LOG_NAME
    good = log_path.read_bytes()
    log_path.write_bytes(good + b"\0\0\0\n")
    assert read_manifest(out)["num_problems"] == 1
    log_path.write_bytes(b"garbage\n" + good)
    with pytest.raises(ValueError, match="line 1 is not a manifest record"):
        read_manifest(out)


def test_crash_between_snapshot_write_and_log_removal_counts_nothing_twice(tmp_path):
    out = tmp_path / "out"
    with writer(out, shard_size=1) as w:
        for pid in "abc":
            w.add(pid, rows_for(pid))
    stale_log = (out / MANIFEST_LOG_NAME).read_bytes()
    writer(out).close()  # compacts
    (out / MANIFEST_LOG_NAME).write_bytes(stale_log)  # as if killed before the log was removed
    m = read_manifest(out)
    assert [s["problem_ids"] for s in m["shards"]] == [["a"], ["b"], ["c"]]
    assert m["num_problems"] == 3 and m["num_rows"] == 6
    w = writer(out, shard_size=1)
    assert w.committed_ids == {"a", "b", "c"} and log_lines(out) == []
    assert w.add("d", rows_for("d")) == "part-00003.parquet"
    w.close()
    assert check_folder(out, rows_per_problem=2) == set("abcd")


def test_folder_of_the_previous_format_opens_and_continues(tmp_path):
    """A folder written before the log existed: only `_manifest.json`, with indent=1 and totals."""
    out = tmp_path / "out"
    out.mkdir()
    pq.write_table(rows_to_table(rows_for("a") + rows_for("b")), out / "part-00000.parquet")
    old = {
        "version": 1,
        "fingerprint": FP,
        "fingerprint_history": [
            {"fingerprint": FP, "recorded": "2025-01-01T00:00:00+00:00", "forced": False}
        ],
        "shards": [
            {
                "name": "part-00000.parquet",
                "problem_ids": ["a", "b"],
                "num_rows": 4,
                "num_problems": 2,
                "created": "2025-01-01T00:00:00+00:00",
            }
        ],
        "num_problems": 2,
        "num_rows": 4,
        "updated": "2025-01-01T00:00:00+00:00",
    }
    (out / MANIFEST_NAME).write_text(json.dumps(old, indent=1))
    assert read_manifest(out) == old
    w = writer(out, shard_size=2)
    assert w.committed_ids == {"a", "b"} and w.manifest_bytes_written == 0  # nothing to compact
    for pid in "cd":
        w.add(pid, rows_for(pid))
    w.close()
    assert json.loads((out / MANIFEST_NAME).read_text()) == old
    m = read_manifest(out)
    assert [s["problem_ids"] for s in m["shards"]] == [["a", "b"], ["c", "d"]]
    assert m["num_problems"] == 4 and m["num_rows"] == 8
    assert check_folder(out, rows_per_problem=2) == set("abcd")


def manifest_bytes_per_problem(out: Path, n: int) -> float:
    row = {"trajectory_index": 0, "status": "completed"}
    with writer(out, shard_size=10) as w:
        for i in range(n):
            w.add(f"p{i:07d}", [row])
    assert read_manifest(out)["num_problems"] == n
    return w.manifest_bytes_written / n


def test_manifest_bytes_per_committed_problem_stay_flat(tmp_path, monkeypatch):
    """The old full rewrite per shard grew linearly with the run (10x here); the log stays flat."""
    # Durability is not what this measures: skip the fsyncs to keep 1,100 shard commits fast.
    monkeypatch.setattr(os, "fsync", lambda fd: None)
    small = manifest_bytes_per_problem(tmp_path / "small", 1_000)
    large = manifest_bytes_per_problem(tmp_path / "large", 10_000)
    assert large < 1.5 * small and small < 1.5 * large, (small, large)


CHILD = textwrap.dedent(
    """
    import sys
    from gen_ssd_ray.generate.output import ShardWriter
    from gen_ssd_ray.generate.rows import rows_to_table

    out, shard_size = sys.argv[1], int(sys.argv[2])
    rows_to_table([])  # warm up (pyarrow imports pandas on first use) so that kills land in the I/O
    print("ready", flush=True)
    w = ShardWriter(out, fingerprint="fp-aaaa", config_yaml="seed: 1\\n", shard_size=shard_size)
    done = w.committed_ids
    base = {"status": "completed", "response": "x" * 200, "config_fingerprint": "fp-aaaa",
            "chunks": [{"candidates": [{"text": "y" * 50, "num_tokens": 8, "finish_reason": "length",
                                        "ppl": 1.5}] * 4, "chosen": 1}] * 4}
    for i in range(1_000_000):
        pid = f"p{i:07d}"
        if pid not in done:
            w.add(pid, [{**base, "problem_id": pid, "trajectory_index": t} for t in range(3)])
    """
)


def check_folder(out: Path, rows_per_problem: int = 3) -> set[str]:
    """The exactly-once invariants; returns the committed ids."""
    m = read_manifest(out)
    seen: dict[str, str] = {}
    for s in m["shards"]:
        t = pq.read_table(out / s["name"])
        assert t.schema == OUTPUT_SCHEMA
        ids = t.column("problem_id").to_pylist()
        assert sorted(set(ids)) == sorted(s["problem_ids"])
        assert len(ids) == s["num_rows"] == rows_per_problem * len(s["problem_ids"])
        for pid in s["problem_ids"]:
            assert pid not in seen, f"{pid} in {seen.get(pid)} and {s['name']}"
            seen[pid] = s["name"]
    assert part_files(out) == sorted(s["name"] for s in m["shards"])
    df = pd.read_parquet(out, columns=["problem_id", "trajectory_index"])
    assert not df.duplicated().any()
    assert set(df["problem_id"]) == set(seen) and len(df) == rows_per_problem * len(seen)
    return set(seen)


def test_crash_kill_resume_exactly_once(tmp_path):
    out = tmp_path / "out"
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    rng = random.Random(1234)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    orphans_seen = torn_seen = 0
    for _ in range(20):
        proc = subprocess.Popen(
            [sys.executable, str(script), str(out), str(rng.choice([1, 2, 3]))],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            cwd=REPO,
        )
        assert proc.stdout.readline().strip() == b"ready", proc.stderr.read().decode()
        time.sleep(rng.uniform(0.0, 0.2))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()
        m = read_manifest(out)  # snapshot + log; a torn last log line is ignored
        if m is not None:
            listed = {s["name"] for s in m["shards"]}
            orphans_seen += bool(set(part_files(out)) - listed)
            log_path = out / MANIFEST_LOG_NAME
            tail = log_path.read_bytes()[-1:] if log_path.exists() else b""
            torn_seen += tail not in (b"", b"\n")
    writer(out, shard_size=2).close()  # reopen: adopts an orphan, removes temp files, compacts the log
    assert not list(out.glob(".tmp-*"))
    assert log_lines(out) == []
    committed = check_folder(out)
    assert committed, "no shard was committed in 20 runs"
    # Lost buffered problems are redone, so what is committed is always a prefix of the id sequence.
    assert committed == {f"p{i:07d}" for i in range(len(committed))}
    print(
        f"committed {len(committed)} problems; kills that left an orphan: {orphans_seen}, a torn log: {torn_seen}"
    )


@pytest.mark.integration
def test_ray_data_reads_only_complete_shards(tmp_path):
    ray = pytest.importorskip("ray")
    out = tmp_path / "out"
    with writer(out, shard_size=2) as w:
        for pid in "abc":
            w.add(pid, rows_for(pid))
    (out / ".tmp-part-00002.parquet").write_bytes(b"half written")
    ray.init(address="local", num_cpus=1, include_dashboard=False)
    try:
        ds = ray.data.read_parquet(str(out))
        rows = ds.take_all()
    finally:
        ray.shutdown()
    assert len(rows) == 6
    assert sorted({r["problem_id"] for r in rows}) == ["a", "b", "c"]
