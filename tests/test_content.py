"""A problem's identity is its content (gen_ssd_ray.generate.content, gen_ssd_ray.generate.output).

Committed problems record a content hash (sha256 of id, question and gold answer). A resume over data
whose content changed (an edited question or answer, rows inserted so that generated ids shift) is
refused before anything starts (exit 2, one line: how many, a few ids, the fix); with
`output.force=true` exactly the changed problems are generated again and their old rows stop counting:
readers see one set of rows per problem, also after a crash (orphan shard) and after the manifest is
lost (shards re-adopted). Folders written before hashes existed stay readable and resumable.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest

from gen_ssd_ray.common.errors import InputError
from gen_ssd_ray.generate.content import ContentChangedError, changed_problems, check_resume, content_hash
from gen_ssd_ray.generate.manifest import (
    MANIFEST_LOG_NAME,
    MANIFEST_NAME,
    SHARD_META_KEY,
    live_shards,
    read_manifest,
    read_output,
)
from gen_ssd_ray.generate.output import ShardWriter

FP = "fp-aaaa"


def P(pid, question="q", answer="1"):
    return SimpleNamespace(problem_id=pid, question=question, gold_answer=answer, error=None)


def rows(pid: str, tag: str = "old", n: int = 2) -> list[dict]:
    return [
        {
            "problem_id": pid,
            "trajectory_index": i,
            "status": "completed",
            "response": tag,
            "config_fingerprint": FP,
        }
        for i in range(n)
    ]


def writer(out: Path, **kw) -> ShardWriter:
    kw.setdefault("shard_size", 2)
    return ShardWriter(out, fingerprint=FP, config_yaml="seed: 1\n", **kw)


def live(out: Path) -> dict[str, list[str]]:
    t = read_output(out)
    got: dict[str, list] = {}
    for pid, i, resp in zip(
        *(t.column(c).to_pylist() for c in ("problem_id", "trajectory_index", "response")), strict=True
    ):
        got.setdefault(pid, []).append((i, resp))
    return {pid: [r for _, r in sorted(v)] for pid, v in got.items()}


def commit(out: Path, problems, tag="old", **kw):
    with writer(out, **kw) as w:
        for q in problems:
            w.add(q.problem_id, rows(q.problem_id, tag), content_hash(q))


# ---- the hash ---------------------------------------------------------------------------------------


def test_hash_is_the_canonical_sha256_and_prefers_the_problems_own():
    import hashlib

    from gen_ssd_ray.common.data import CONTENT_HASH_VERSION

    q = P("a", "Tom has 3 \udcff apples", None)  # a lone surrogate and a missing answer hash too
    text = json.dumps([CONTENT_HASH_VERSION, "a", "Tom has 3 \udcff apples", None], separators=(",", ":"))
    assert content_hash(q) == hashlib.sha256(text.encode("ascii")).hexdigest()  # the data layer's
    assert content_hash(SimpleNamespace(**vars(q), content_hash="abc")) == "abc"


CHANGES = {
    "question-edited": lambda q: P(q.problem_id, q.question + " (edited)", q.gold_answer),
    "answer-edited": lambda q: P(q.problem_id, q.question, "2"),
    "whitespace": lambda q: P(q.problem_id, q.question + " ", q.gold_answer),
    "answer-removed": lambda q: P(q.problem_id, q.question, None),
    "unicode-normal-form": lambda q: P(q.problem_id, q.question.replace("é", "e\u0301"), q.gold_answer),
}


@pytest.mark.parametrize("change", CHANGES.values(), ids=CHANGES.keys())
def test_changed_content_is_found(tmp_path, change):
    probs = [P("a", "café a"), P("b", "café b"), P("c", "café c")]
    commit(tmp_path, probs)
    w = writer(tmp_path)
    now = [probs[0], change(probs[1]), probs[2]]
    assert changed_problems(now, w.content_hashes) == ["b"]
    cfg = SimpleNamespace(
        output=SimpleNamespace(force=False, dir=str(tmp_path)), data=SimpleNamespace(path="x.jsonl")
    )
    with pytest.raises(ContentChangedError) as ei:
        check_resume(cfg, now, w)
    msg = str(ei.value)
    assert isinstance(ei.value, InputError) and "\n" not in msg
    assert "1 problems" in msg and "'b'" in msg and "output.force=true" in msg and "another output.dir" in msg
    w.close()


def test_force_redoes_exactly_the_changed_problems_and_readers_see_one_set(tmp_path):
    probs = [P(i, f"question {i}") for i in "abcd"]
    commit(tmp_path, probs)
    now = [probs[0], P("b", "question b, edited"), probs[2], P("d", "question d, edited")]
    cfg = SimpleNamespace(
        output=SimpleNamespace(force=True, dir=str(tmp_path)), data=SimpleNamespace(path="x")
    )
    w = writer(tmp_path)
    assert check_resume(cfg, now, w) == ["b", "d"]
    assert w.committed_ids == {"a", "c"}  # exactly the changed ones are generated again
    assert "b" not in w and "d" not in w and "a" in w
    for q in now:
        if q.problem_id not in w:
            w.add(q.problem_id, rows(q.problem_id, "new"), content_hash(q))
    w.close()
    assert live(tmp_path) == {"a": ["old"] * 2, "b": ["new"] * 2, "c": ["old"] * 2, "d": ["new"] * 2}
    m = read_manifest(tmp_path)
    assert m["num_problems"] == 4 and m["shards"][-1]["supersedes"] == ["b", "d"]
    assert [sorted(s) for _, s in live_shards(m)] == [["b"], ["d"], []]
    w = writer(tmp_path)  # resumes: the new content is committed, nothing changed any more
    assert w.committed_ids == set("abcd") and changed_problems(now, w.content_hashes) == []
    w.close()


def test_a_superseding_orphan_is_adopted_not_deleted(tmp_path, monkeypatch):
    from gen_ssd_ray.generate import output

    probs = [P("a"), P("b")]
    commit(tmp_path, probs)
    w = writer(tmp_path, shard_size=1)
    w.redo(["a"])

    def killed(fd, data):  # the shard is renamed, the process dies before its log record
        raise KeyboardInterrupt

    monkeypatch.setattr(output, "_append", killed)
    with pytest.raises(KeyboardInterrupt):
        w.add("a", rows("a", "new"), content_hash(P("a", "new q")))
    monkeypatch.undo()
    w._failed = True  # noqa: SLF001 - as a killed process: nothing more is written
    w.close()
    w = writer(tmp_path)
    assert w.committed_ids == {"a", "b"}
    w.close()
    assert live(tmp_path) == {"a": ["new"] * 2, "b": ["old"] * 2}


def test_a_lost_manifest_keeps_supersedes_from_the_shards_themselves(tmp_path):
    commit(tmp_path, [P("a"), P("b")])
    w = writer(tmp_path)
    w.redo(["b"])
    w.add("b", rows("b", "new"), content_hash(P("b", "new")))
    w.close()
    meta = json.loads(pq.read_schema(tmp_path / "part-00001.parquet").metadata[SHARD_META_KEY])
    assert meta["supersedes"] == ["b"] and meta["content_hashes"]["b"] == content_hash(P("b", "new"))
    (tmp_path / MANIFEST_NAME).write_text("{")  # truncated
    (tmp_path / MANIFEST_LOG_NAME).unlink(missing_ok=True)
    w = writer(tmp_path)  # re-adopts both shards; the second supersedes b
    assert w.content_hashes == {"a": content_hash(P("a")), "b": content_hash(P("b", "new"))}
    w.close()
    assert live(tmp_path) == {"a": ["old"] * 2, "b": ["new"] * 2}


def test_folders_without_hashes_stay_readable_and_resumable(tmp_path):
    with writer(tmp_path) as w:
        for pid in "ab":
            w.add(pid, rows(pid))  # no hash: as written before hashes existed
    assert "content_hashes" not in read_manifest(tmp_path)["shards"][0]
    w = writer(tmp_path)
    assert w.content_hashes == {} and changed_problems([P("a", "anything")], w.content_hashes) == []
    w.add("c", rows("c"), content_hash(P("c")))
    w.close()
    assert writer(tmp_path).content_hashes == {"c": content_hash(P("c"))}


# ---- through the job: the data file edited in place ---------------------------------------------------


def _write_jsonl(path: Path, questions: list[str], ids: bool) -> None:
    with path.open("w") as f:
        for i, q in enumerate(questions):
            row = {"question": q, "answer": f"#### {i}"}
            if ids:
                row["id"] = f"sim-{i}"
            f.write(json.dumps(row) + "\n")


def _prepare(tmp_path, data, *extra):
    from gen_ssd_ray.generate.driver import prepare
    from gen_ssd_ray.sim.harness import sim_config

    args = [f"data.path={data}", f"output.dir={tmp_path / 'out'}", *extra]
    return args, prepare(sim_config(args))


@pytest.mark.parametrize(
    "edit,ids,changed",
    [
        ("question-edited", True, ["sim-2"]),
        ("row-inserted-generated-ids-shift", False, None),
        ("row-deleted-generated-ids-shift", False, None),
    ],
)
def test_resume_over_edited_data_is_refused_then_forced(tmp_path, monkeypatch, capsys, edit, ids, changed):
    from gen_ssd_ray.generate import driver
    from gen_ssd_ray.sim.harness import PRESET
    from jobs.generate import main

    data = tmp_path / "p.jsonl"
    qs = [f"What is {i} plus {i}?" for i in range(6)]
    _write_jsonl(data, qs, ids)
    extra = ["data.id_field=id"] if ids else []  # without: ids are generated from the row index
    args, p = _prepare(tmp_path, data, *extra)
    committed = [q for q in p.problems][:4]
    for q in committed:
        p.writer.add(
            q.problem_id,
            [{**r, "config_fingerprint": p.fingerprint} for r in rows(q.problem_id)],
            content_hash(q),
        )
    p.writer.close()

    if edit == "question-edited":
        qs[2] += " Show your work."
    elif edit == "row-inserted-generated-ids-shift":
        qs.insert(0, "A new first question?")
    else:
        del qs[0]
    _write_jsonl(data, qs, ids)

    monkeypatch.setattr(driver, "run_generate", lambda *a, **k: pytest.fail("nothing may start"))
    code = main(["--config", str(PRESET), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "output.force=true" in err[0], err
    if changed:
        assert f"{len(changed)} problems" in err[0] and repr(changed[0]) in err[0]

    _, p = _prepare(tmp_path, data, *extra, "output.force=true")
    try:
        now = {q.problem_id: q for q in p.problems}
        redo = {q.problem_id for q in committed} - p.writer.committed_ids
        expect = {
            q.problem_id
            for q in committed
            if q.problem_id in now and content_hash(now[q.problem_id]) != content_hash(q)
        }
        assert expect and redo == expect  # exactly the changed ones
        if changed:
            assert redo == set(changed)
    finally:
        p.writer.close()


def test_finetune_input_reads_only_the_live_rows_after_a_forced_redo(tmp_path):
    from gen_ssd_ray.train.config import TrainDataConfig
    from gen_ssd_ray.train.data import read_filtered

    probs = [P(i, f"question {i}") for i in "abc"]
    commit(tmp_path, probs)
    w = writer(tmp_path)
    w.redo(["b"])
    w.add("b", rows("b", "new"), content_hash(P("b", "question b, edited")))
    w.close()
    cfg = TrainDataConfig(
        path=str(tmp_path), filters=[], question_field="response", response_field="response"
    )
    df, _, read = read_filtered(cfg)
    got = sorted(zip(df["problem_id"], df["response"], strict=True))
    assert got == [("a", "old"), ("a", "old"), ("b", "new"), ("b", "new"), ("c", "old"), ("c", "old")]
    assert read == 6  # the superseded rows of b are never read
    assert sorted(read_output(tmp_path, columns=["response"]).column("response").to_pylist()) == sorted(
        r for _, r in got
    )
