"""A damaged output folder (gen_ssd_ray.generate.output): every way the manifest can be unreadable, a
locked folder, a missing shard, and a full disk in the middle of a write.

Each repairable damage (a truncated, empty, garbage or wrong-shape `_manifest.json`, a corrupt line in
the middle of `_manifest.log`) is checked three ways: a reader gets one clear line naming the file and
the fix (ManifestError, an InputError: exit 2); a writer repairs it without losing any committed shard
(they are re-adopted from the shard files, hashes included); the job's `prepare` does the same. What
cannot be repaired (another manifest version, a missing shard, a folder locked by another job) ends in
exit 2 with one line through `python -m jobs.generate`'s entry point. A full disk (ENOSPC) during a
shard write, its fsync, the log append or the opening compaction raises OutputWriteError naming the
folder, leaves no temporary file and loses nothing committed; the next writer continues.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from gen_ssd_ray.common.errors import InputError
from gen_ssd_ray.generate import output
from gen_ssd_ray.generate.manifest import (
    MANIFEST_LOG_NAME,
    MANIFEST_NAME,
    ManifestError,
    ManifestVersionError,
    read_manifest,
    read_output,
)
from gen_ssd_ray.generate.output import OutputLockedError, OutputWriteError, ShardWriter

FP = "fp-aaaa"


def rows(pid: str, n: int = 2) -> list[dict]:
    return [
        {"problem_id": pid, "trajectory_index": i, "status": "completed", "config_fingerprint": FP}
        for i in range(n)
    ]


def writer(out: Path, **kw) -> ShardWriter:
    kw.setdefault("shard_size", 2)
    return ShardWriter(out, fingerprint=kw.pop("fingerprint", FP), config_yaml="seed: 1\n", **kw)


def committed_folder(out: Path, compact: bool = True) -> dict[str, str]:
    """A folder with problems a..f committed in 3 shards (with content hashes); returns the hashes."""
    hashes = {pid: f"h-{pid}" for pid in "abcdef"}
    with writer(out) as w:
        for pid in "abcd":
            w.add(pid, rows(pid), hashes[pid])
    with writer(out) as w:  # compacts the log into the snapshot, then appends one more shard
        for pid in "ef":
            w.add(pid, rows(pid), hashes[pid])
    if compact:
        writer(out).close()
    return hashes


def live(out: Path) -> list[tuple[str, int]]:
    t = read_output(out)
    return sorted(
        zip(t.column("problem_id").to_pylist(), t.column("trajectory_index").to_pylist(), strict=True)
    )


def no_temp_files(out: Path) -> bool:
    return not [p for p in out.iterdir() if p.name.startswith(".tmp-")]


# ---- damaged snapshot: every variant -----------------------------------------------------------------


def _truncate(text: str) -> str:
    return text[: len(text) // 2]


def _drop(key: str):
    def f(text: str) -> str:
        m = json.loads(text)
        del m[key]
        return json.dumps(m)

    return f


def _set(path: list, value):
    def f(text: str) -> str:
        m = json.loads(text)
        node = m
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = value
        return json.dumps(m)

    return f


SNAPSHOT_DAMAGE = {
    "truncated": _truncate,
    "empty": lambda t: "",
    "whitespace": lambda t: "\n \n",
    "binary-garbage": lambda t: "\udcff\x00garbage",
    "not-an-object": lambda t: "[1, 2]",
    "no-shards-key": _drop("shards"),
    "no-fingerprint-key": _drop("fingerprint"),
    "no-history-key": _drop("fingerprint_history"),
    "no-version-key": _drop("version"),
    "shards-not-a-list": _set(["shards"], {"a": 1}),
    "shard-not-an-object": _set(["shards", 0], "part-00000.parquet"),
    "shard-key-missing": lambda t: _set(["shards", 0], {"name": "part-00000.parquet"})(t),
    "problem-ids-a-string": _set(["shards", 0, "problem_ids"], "abc"),
    "num-rows-a-string": _set(["shards", 0, "num_rows"], "4"),
    "num-problems-wrong": _set(["shards", 0, "num_problems"], 7),
    "bad-shard-name": _set(["shards", 0, "name"], "../etc/passwd"),
    "fingerprint-a-number": _set(["fingerprint"], 5),
    "hashes-not-parallel": _set(["shards", 0, "content_hashes"], ["x"]),
}


def _damage_snapshot(out: Path, how) -> None:
    path = out / MANIFEST_NAME
    text = how(path.read_text())
    path.write_bytes(text.encode("utf-8", "surrogateescape"))


@pytest.mark.parametrize("how", SNAPSHOT_DAMAGE.values(), ids=SNAPSHOT_DAMAGE.keys())
def test_damaged_snapshot_reader_one_line_writer_repairs_losing_nothing(tmp_path, how):
    out = tmp_path / "out"
    hashes = committed_folder(out)
    before = live(out)
    _damage_snapshot(out, how)

    with pytest.raises(ManifestError) as ei:  # a reader: one line naming the file and the fix
        read_manifest(out)
    msg = str(ei.value)
    assert isinstance(ei.value, InputError) and "\n" not in msg
    assert str(out / MANIFEST_NAME) in msg and "re-run the generation job" in msg

    w = writer(out)  # the writer repairs: every shard re-adopted, hashes included
    assert w.committed_ids == set("abcdef")
    assert w.content_hashes == hashes
    w.add("g", rows("g"), "h-g")
    w.close()
    assert live(out) == sorted(before + [("g", 0), ("g", 1)])
    assert read_manifest(out)["num_problems"] == 7
    assert [p.name for p in out.glob(f"{MANIFEST_NAME}.corrupt-*")]  # kept aside for inspection


LOG_DAMAGE = {
    "garbage-first-line": lambda good: b"garbage\n" + good,
    "truncated-record-then-more": lambda good: good.splitlines(keepends=True)[0][:20] + b"\n" + good,
    "record-without-keys": lambda good: b'{"shard": {"name": "part-00009.parquet"}}\n' + good,
    "record-wrong-types": lambda good: good.replace(b'"num_rows":4', b'"num_rows":"4"', 1),
}


@pytest.mark.parametrize("how", LOG_DAMAGE.values(), ids=LOG_DAMAGE.keys())
def test_damaged_log_reader_one_line_writer_repairs(tmp_path, how):
    out = tmp_path / "out"
    committed_folder(out, compact=False)  # e, f are in the log only
    log_path = out / MANIFEST_LOG_NAME
    good = log_path.read_bytes()
    assert good.count(b"\n") == 1
    log_path.write_bytes(how(good) + (b"" if how(good).endswith(b"\n") else b"\n") + good)
    with pytest.raises(ManifestError, match=str(log_path)):
        read_manifest(out)
    w = writer(out)
    assert w.committed_ids == set("abcdef")
    w.close()
    assert len(live(out)) == 12


def test_manifest_of_another_version_is_refused_not_repaired(tmp_path):
    out = tmp_path / "out"
    committed_folder(out)
    _damage_snapshot(out, _set(["version"], 2))
    for call in (lambda: read_manifest(out), lambda: writer(out)):
        with pytest.raises(ManifestVersionError, match="version 2") as ei:
            call()
        assert "\n" not in str(ei.value)
    assert json.loads((out / MANIFEST_NAME).read_text())["version"] == 2  # left as it was


def test_missing_listed_shard_is_refused_then_forgotten_with_force(tmp_path):
    out = tmp_path / "out"
    committed_folder(out)
    (out / "part-00000.parquet").unlink()
    with pytest.raises(ManifestError, match="part-00000.parquet.*restore it, or pass output.force=true"):
        writer(out)
    w = writer(out, force=True)
    assert w.committed_ids == set("cdef")  # a and b are generated again
    w.close()
    assert read_manifest(out)["num_problems"] == 4


def test_locked_folder_is_bad_input_with_one_line(tmp_path):
    out = tmp_path / "out"
    with writer(out):
        with pytest.raises(OutputLockedError) as ei:
            writer(out)
    assert isinstance(ei.value, InputError)
    msg = str(ei.value)
    assert "\n" not in msg and str(out / "_lock") in msg and "another output.dir" in msg


# ---- through the job: prepare repairs, the entry point exits 2 on what cannot be repaired ---------


def _sim_cfg(tmp_path: Path, *extra: str):
    from gen_ssd_ray.sim.harness import sim_config, write_problems

    data = write_problems(tmp_path / "p.jsonl", 6)
    return [f"data.path={data}", f"output.dir={tmp_path / 'out'}", *extra], sim_config


def _job_writer_folder(tmp_path: Path) -> tuple[list[str], set[str]]:
    """A folder committed by the job's own writer (its fingerprint), problems sim-0..sim-3."""
    from gen_ssd_ray.generate.driver import prepare

    args, sim_config = _sim_cfg(tmp_path)
    p = prepare(sim_config(args))
    ids = [q.problem_id for q in p.problems][:4]
    for pid in ids:
        p.writer.add(pid, [{**r, "config_fingerprint": p.fingerprint} for r in rows(pid)])
    p.writer.close()
    writer(tmp_path / "out", fingerprint=p.fingerprint).close()  # compacts the log into the snapshot
    return args, set(ids)


@pytest.mark.parametrize("name", ["truncated", "empty", "no-shards-key", "num-rows-a-string"])
def test_prepare_repairs_a_damaged_manifest(tmp_path, name):
    from gen_ssd_ray.generate.driver import prepare
    from gen_ssd_ray.sim.harness import sim_config

    args, ids = _job_writer_folder(tmp_path)
    _damage_snapshot(tmp_path / "out", SNAPSHOT_DAMAGE[name])
    p = prepare(sim_config(args))
    try:
        assert p.writer.committed_ids == ids
    finally:
        p.writer.close()


def _main_exit(args, monkeypatch, capsys) -> tuple[int, str]:
    from gen_ssd_ray.generate import driver
    from jobs.generate import main

    def no_run(*a, **k):  # nothing may start when prepare refuses
        raise AssertionError("run_generate was called")

    monkeypatch.setattr(driver, "run_generate", no_run)
    code = main(
        ["--config", str(output.Path(__file__).resolve().parents[1] / "conf/sim_cluster.yaml"), *args]
    )
    return code, capsys.readouterr().err


@pytest.mark.parametrize("damage", ["version", "missing-shard", "locked"])
def test_job_exits_2_with_one_line_when_the_folder_cannot_be_used(tmp_path, monkeypatch, capsys, damage):
    args, _ = _job_writer_folder(tmp_path)
    out = tmp_path / "out"
    held = None
    if damage == "version":
        _damage_snapshot(out, _set(["version"], 99))
    elif damage == "missing-shard":
        (out / "part-00000.parquet").unlink()
    else:
        held = writer(out, fingerprint="other", force=True)
    try:
        code, err = _main_exit(args, monkeypatch, capsys)
    finally:
        if held is not None:
            held.close()
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(out) in lines[0], err
    assert "Traceback" not in err


# ---- a full disk ------------------------------------------------------------------------------------


def _enospc(*a, **k):
    raise OSError(errno.ENOSPC, "No space left on device")


def _partial_then_enospc(table, where, **kw):
    where.write(b"PAR1 partial bytes")
    _enospc()


@pytest.mark.parametrize(
    "where",
    ["write_table", "fsync", "log-append", "open-compaction"],
)
def test_full_disk_names_the_folder_and_loses_nothing(tmp_path, monkeypatch, where):
    out = tmp_path / "out"
    committed_folder(out)
    before = live(out)
    if where == "open-compaction":
        (out / MANIFEST_LOG_NAME).write_bytes(b"torn")  # forces a compaction at open
        monkeypatch.setattr(output, "atomic_write_bytes", _enospc)
        with pytest.raises(OutputWriteError) as ei:
            writer(out)
        monkeypatch.undo()
    else:
        w = writer(out)
        w.add("g", rows("g"))
        if where == "write_table":
            monkeypatch.setattr(output.pq, "write_table", _partial_then_enospc)
        elif where == "fsync":
            real = os.fsync
            calls = []

            def fsync(fd):
                calls.append(fd)
                if len(calls) == 1:
                    _enospc()
                real(fd)

            monkeypatch.setattr(os, "fsync", fsync)
        else:
            monkeypatch.setattr(output, "_append", _enospc)
        with pytest.raises(OutputWriteError) as ei:
            w.add("h", rows("h"))
        monkeypatch.undo()
        with pytest.raises(OutputWriteError):  # nothing more is written by this writer
            w.add("i", rows("i"))
        w.close()  # releases the folder without raising again
    e = ei.value
    assert isinstance(e, OSError) and e.errno == errno.ENOSPC
    msg = str(e)
    assert "\n" not in msg and str(out) in msg and "re-run the same command" in msg
    assert no_temp_files(out)
    assert set(before) <= set(live(out))  # nothing committed lost
    w2 = writer(out)  # the next run continues (a renamed shard whose record failed is adopted)
    assert set("abcdef") <= w2.committed_ids
    if where == "log-append":
        assert {"g", "h"} <= w2.committed_ids
    w2.close()


def test_a_writer_that_refuses_a_damaged_folder_leaves_readers_the_same_clear_error(tmp_path):
    out = tmp_path / "out"
    committed_folder(out)
    _damage_snapshot(out, _truncate)
    with pytest.raises(output.FingerprintMismatchError):  # the shards' rows carry another fingerprint
        writer(out, fingerprint="fp-other")
    with pytest.raises(ManifestError):  # not an empty folder
        read_manifest(out)
    w = writer(out)
    assert w.committed_ids == set("abcdef")
    w.close()
