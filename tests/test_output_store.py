"""The generation output's commit protocol on each kind of store (gen_ssd_ray.generate.output).

The same tests run against a local folder, fsspec's in-memory object store (`memory://`: the
object-store protocol with no server; unit tests) and a real S3 API (the moto server of
tests/s3server.py; marked integration): commit, read, resume, a second writer refused by the lease, a
log-record seq taken by another writer, orphan adoption and deletion, a kill between the snapshot PUT
and the log deletion, damaged manifest objects. Also the location checks of the job's config (an
unknown scheme, a missing slash) and problems read from an object store.
"""

from __future__ import annotations

import errno
import json
import re
import uuid

import pyarrow.parquet as pq
import pytest

from gen_ssd_ray.common.storage import Storage
from gen_ssd_ray.generate import manifest, output
from gen_ssd_ray.generate.manifest import MANIFEST_NAME, ManifestError, read_manifest, read_output
from gen_ssd_ray.generate.output import OutputLockedError, OutputWriteError, ShardWriter
from tests.test_output import make_row

FP = "fp-aaaa"  # the fingerprint make_row writes in its rows
REMOTE_SHARD = re.compile(r"^part-\d{5}-[0-9a-f]{8}\.parquet$")


@pytest.fixture(params=["memory", pytest.param("s3", marks=pytest.mark.integration)])
def remote(request, monkeypatch) -> str:
    """A fresh object-store folder: memory://... (unit) or s3://bucket/out on the moto server."""
    monkeypatch.setenv("GEN_SSD_LEASE_TTL_S", "2")
    if request.param == "memory":
        return f"memory://t-{uuid.uuid4().hex[:10]}/out"
    return request.getfixturevalue("s3_bucket") + "/out"


@pytest.fixture(params=["local", "memory", pytest.param("s3", marks=pytest.mark.integration)])
def folder(request, tmp_path, monkeypatch) -> str:
    monkeypatch.setenv("GEN_SSD_LEASE_TTL_S", "2")
    if request.param == "local":
        return str(tmp_path / "out")
    if request.param == "memory":
        return f"memory://t-{uuid.uuid4().hex[:10]}/out"
    return request.getfixturevalue("s3_bucket") + "/out"


def writer(uri: str, shard_size: int = 2, **kw) -> ShardWriter:
    return ShardWriter(uri, fingerprint=FP, config_yaml="x: 1\n", shard_size=shard_size, **kw)


def commit(uri: str, ids: list[str], shard_size: int = 2) -> None:
    with writer(uri, shard_size) as w:
        for pid in ids:
            w.add(pid, [make_row(pid, 0), make_row(pid, 1)], content_hash=f"h-{pid}")


def live_ids(uri: str) -> list[str]:
    """Problem ids of every live row, one per problem per shard (duplicates would show twice)."""
    t = read_output(uri, columns=["problem_id", "trajectory_index"])
    return sorted(pid for pid, ti in zip(*t.to_pydict().values(), strict=True) if ti == 0)


def log_objects(uri: str) -> list[str]:
    return Storage(uri).list(manifest.MANIFEST_LOG_NAME)


# -- commit, read, resume (every store) ---------------------------------------------------------------


def test_commit_read_resume(folder):
    commit(folder, ["a", "b", "c", "d", "e"])
    m = read_manifest(folder)
    assert (m["num_problems"], m["num_rows"], len(m["shards"])) == (5, 10, 3)
    assert live_ids(folder) == ["a", "b", "c", "d", "e"]
    with writer(folder) as w:  # a resume: committed ids known, new problems added after them
        assert w.committed_ids == {"a", "b", "c", "d", "e"}
        assert w.content_hashes["c"] == "h-c"
        w.add("f", [make_row("f")])
    m = read_manifest(folder)
    assert m["num_problems"] == 6 and live_ids(folder) == ["a", "b", "c", "d", "e", "f"]
    storage = Storage(folder)
    assert storage.read_text(manifest.CONFIG_NAME) == "x: 1\n"
    if storage.remote:
        names = [s["name"] for s in m["shards"]]
        assert all(REMOTE_SHARD.match(n) for n in names), names
        assert len({n.split("-")[2] for n in names}) == 2  # two writers, two lease tags
        assert not storage.exists(output.LOCK_NAME)  # the lease is released at close
        # The second writer compacted the three records of the first into the snapshot, then logged
        # its own shard as record 3.
        assert json.loads(storage.read_text(MANIFEST_NAME))["log_seq"] == 2
        assert log_objects(folder) == ["_manifest.log/000000000003.json"]


# -- object-store protocol -------------------------------------------------------------------------------


def test_objects_per_shard_and_manifest_bytes(remote):
    """Each commit is two PUTs (the shard, one log record); manifest bytes per problem stay constant."""
    with writer(remote, shard_size=4) as w:
        for i in range(16):
            w.add(f"p{i:02d}", [make_row(f"p{i:02d}")])
        per_flush = w.manifest_bytes_written / 4
    names = Storage(remote).list()
    assert len([n for n in names if n.startswith("part-")]) == 4
    assert len([n for n in names if n.startswith("_manifest.log/")]) == 4
    assert per_flush < 1000  # one record of 4 problems: a few hundred bytes, not the whole manifest


def test_second_writer_refused_by_the_lease(remote):
    first = writer(remote)
    try:
        with pytest.raises(OutputLockedError, match="in use by job generate"):
            writer(remote)
        first.add("a", [make_row("a")])
    finally:
        first.close()
    assert live_ids(remote) == ["a"]


def test_lost_lease_stops_the_writer(remote):
    w = writer(remote, shard_size=1)
    try:
        w._lock._lost = "the lease was taken over by another job (test)"
        with pytest.raises(OutputWriteError, match="taken over"):
            w.add("a", [make_row("a")])
    finally:
        w.close()
    assert read_manifest(remote)["num_problems"] == 0
    assert not [n for n in Storage(remote).list() if n.startswith("part-")]  # nothing PUT after the loss


def test_log_seq_taken_by_another_writer_is_refused_never_overwritten(remote):
    w = writer(remote, shard_size=1)
    storage = Storage(remote)
    foreign = b'{"someone": "else"}\n'
    try:
        w.add("a", [make_row("a")])
        assert storage.create_bytes(manifest.log_object(w._seq), foreign)  # another writer's record
        with pytest.raises(OutputWriteError) as info:
            w.add("b", [make_row("b")])
        assert info.value.errno == errno.EEXIST
        assert storage.uri_of(manifest.log_object(1)) in str(info.value)
        with pytest.raises(OutputWriteError):  # the writer is closed for writing
            w.add("c", [make_row("c")])
    finally:
        w.close()
    assert storage.read_bytes(manifest.log_object(1)) == foreign


def test_orphan_adopted_and_overlapping_orphan_deleted(remote, monkeypatch):
    commit(remote, ["a", "b"])
    w = writer(remote)
    storage = Storage(remote)

    def lost_put(name, data):  # the PUT of the log record never happens (a kill, a network loss)
        raise OSError(errno.EIO, "connection reset")

    monkeypatch.setattr(w.storage, "create_bytes", lost_put)
    w.add("c", [make_row("c")], content_hash="h-c")
    with pytest.raises(OutputWriteError, match="recording shard"):
        w.add("d", [make_row("d")], content_hash="h-d")
    w.close()
    monkeypatch.undo()
    assert read_manifest(remote)["num_problems"] == 2  # c, d: a shard object no record lists
    committed = next(n for n in storage.list() if n.startswith("part-00000"))
    storage.write_bytes("part-00007-0badc0de.parquet", storage.read_bytes(committed))  # a and b again
    with writer(remote) as w2:
        assert w2.committed_ids == {"a", "b", "c", "d"}
    assert not storage.exists("part-00007-0badc0de.parquet")
    assert live_ids(remote) == ["a", "b", "c", "d"]
    # The orphan's content hashes come from its own metadata.
    assert read_manifest(remote)["shards"][-1]["content_hashes"] == ["h-c", "h-d"]


def test_kill_between_snapshot_put_and_log_deletion(remote, monkeypatch):
    commit(remote, ["a", "b", "c"])  # records 0 and 1
    storage = Storage(remote)
    assert len(log_objects(remote)) == 2

    class Killed(BaseException):
        pass

    def killed(self, name):
        raise Killed()

    monkeypatch.setattr(Storage, "delete", killed)
    with pytest.raises(Killed):
        writer(remote)  # compaction: the snapshot is PUT, the kill comes before the log's deletion
    monkeypatch.undo()
    storage.delete(output.LOCK_NAME)  # the killed writer's lease (else: wait out its ttl)
    snap = json.loads(storage.read_text(MANIFEST_NAME))
    assert snap["log_seq"] == 1 and len(snap["shards"]) == 2
    assert len(log_objects(remote)) == 2  # records the snapshot already holds: read once
    m = read_manifest(remote)
    assert (m["num_problems"], len(m["shards"])) == (3, 2)
    commit(remote, ["d"])
    assert live_ids(remote) == ["a", "b", "c", "d"]
    assert log_objects(remote) == ["_manifest.log/000000000002.json"]


@pytest.mark.parametrize("damage", ["snapshot", "record"])
def test_damaged_manifest_objects_refused_by_readers_repaired_by_writers(remote, damage):
    commit(remote, ["a", "b", "c"])
    commit(remote, ["d"])  # compacted a..c, logged d as record 2
    storage = Storage(remote)
    name = MANIFEST_NAME if damage == "snapshot" else "_manifest.log/000000000002.json"
    storage.write_bytes(name, storage.read_bytes(name)[:25])  # torn
    with pytest.raises(ManifestError, match=re.escape(storage.uri_of(name))):
        read_manifest(remote)
    with writer(remote) as w:
        assert w.committed_ids == {"a", "b", "c", "d"}
    assert live_ids(remote) == ["a", "b", "c", "d"]
    kept = [n for n in storage.list() if ".corrupt-" in n]
    assert kept and all(n.startswith(("_manifest.json.corrupt-", "_manifest.log.corrupt-")) for n in kept)


def test_raw_folder_readers_see_only_shards(remote):
    """pyarrow.dataset over the folder skips _manifest.json, _manifest.log/, _config.yaml, _lock."""
    import pyarrow.dataset as pads

    commit(remote, ["a", "b", "c"])
    fs, root = Storage(remote).arrow()
    table = pads.dataset(root, filesystem=fs, format="parquet").to_table(columns=["problem_id"])
    assert sorted(table.column("problem_id").to_pylist()) == ["a", "a", "b", "b", "c", "c"]
    assert pq.read_table(root, filesystem=fs).num_rows == 6


# -- the job's locations ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, says",
    [
        ("output.dir=foo://bucket/x", "unknown storage scheme foo://"),
        ("output.dir=s3:/bucket/x", "slash missing"),
        ("data.path=s3:/bucket/problems.jsonl", "slash missing"),
        ("output.dir=http://host/x", "cannot hold a job's files"),
        ("student.model=zip://m", "cannot hold a job's files"),
    ],
)
def test_bad_locations_exit_2_before_anything_is_created(override, says, tmp_path, monkeypatch, capsys):
    from jobs.generate import main

    monkeypatch.chdir(tmp_path)
    assert main([override]) == 2
    assert says in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # no "s3:" folder, nothing else


def test_location_with_missing_library_is_refused(monkeypatch):
    from gen_ssd_ray.common.config import ConfigError, load_config
    from gen_ssd_ray.common.storage import StorageError
    from gen_ssd_ray.generate.config import GenerateConfig

    try:
        import gcsfs  # noqa: F401

        pytest.skip("gcsfs is installed here")
    except ImportError:
        pass
    with pytest.raises((StorageError, ConfigError), match=r"output.dir='gs://b/x'.*needs a library"):
        load_config(None, ["output.dir=gs://b/x"], GenerateConfig)


# -- input from an object store ---------------------------------------------------------------------------

ROWS = [
    {"question": "What is 2+3?", "answer": "#### 5", "id": 1},
    {"question": "", "answer": "#### 1", "id": 2},
    {"question": "What is 4+4?", "answer": "####", "id": 3},
    {"question": "Twice?", "answer": "#### 2", "id": 1},
    {"question": "What is 9-1?", "answer": "#### 8", "id": 5},
]


def _problems(path: str, id_field: str | None) -> list[tuple]:
    from gen_ssd_ray.common.config import DataConfig
    from gen_ssd_ray.common.data import open_problems

    stream = open_problems(DataConfig(path=path, id_field=id_field, limit=None))
    return [(p.problem_id, p.question, p.gold_answer, p.error, p.content_hash) for p in stream]


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet", "parquet-folder"])
@pytest.mark.parametrize("id_field", [None, "id"])
def test_problems_from_an_object_store_match_a_local_copy(remote, tmp_path, fmt, id_field):
    import pyarrow as pa

    local = tmp_path / "problems"
    local.mkdir()
    if fmt == "jsonl":
        name = "problems.jsonl"
        (local / name).write_text("".join(json.dumps(r) + "\n" for r in ROWS) + "not json\n")
    elif fmt == "json":
        name = "problems.json"
        (local / name).write_text(json.dumps(ROWS))
    else:
        name = "problems.parquet" if fmt == "parquet" else "problems"
        target = local / name
        if fmt == "parquet-folder":
            target.mkdir()
            pq.write_table(pa.Table.from_pylist(ROWS[:2]), target / "a.parquet")
            pq.write_table(pa.Table.from_pylist(ROWS[2:]), target / "b.parquet")
        else:
            pq.write_table(pa.Table.from_pylist(ROWS), target)
    Storage(remote).upload_dir(local, "data")
    want = _problems(str(local / name), id_field)
    got = _problems(f"{remote}/data/{name}", id_field)
    assert got == want
    assert any(e for *_, e, _ in got[1:3])  # the error rows are there, as locally


def test_missing_object_is_a_data_error(remote):
    from gen_ssd_ray.common.data import DataError

    with pytest.raises(DataError, match="no such object"):
        _problems(f"{remote}/nothing.jsonl", None)


def test_failure_ledger_on_an_object_store(remote):
    from gen_ssd_ray.generate.failures import FAILURES_NAME, FailureLedger

    ledger = FailureLedger(remote, limit=2, save_every_s=0)
    assert ledger.record("a", "engine died") == 1
    ledger.save()
    assert FailureLedger(remote, 2).count("a") == 1
    Storage(remote).write_bytes(FAILURES_NAME, b"{torn")
    assert FailureLedger(remote, 2).problems == {}
    names = Storage(remote).list()
    assert FAILURES_NAME not in names and any(n.startswith(f"{FAILURES_NAME}.corrupt-") for n in names)


def test_local_shard_names_unchanged(tmp_path):
    commit(str(tmp_path / "out"), ["a", "b", "c"])
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert [n for n in names if n.startswith("part-")] == ["part-00000.parquet", "part-00001.parquet"]
    assert (tmp_path / "out" / manifest.MANIFEST_LOG_NAME).is_file()


def test_file_uri_is_the_local_folder(tmp_path):
    commit(f"file://{tmp_path}/out", ["a", "b", "c"])
    assert (tmp_path / "out" / "part-00001.parquet").is_file()
    assert read_manifest(f"file://{tmp_path}/out")["num_problems"] == 3
    assert live_ids(str(tmp_path / "out")) == ["a", "b", "c"]
