"""Streaming data (gen_ssd_ray.common.data.open_problems): the stream yields what `load_problems` returns in
every format (ids, duplicates, bad rows, slices), checks the source before reading rows, reads only the
question/answer/id columns, and holds a batch at a time."""

import json
import sys
import tracemalloc
import types

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import gen_ssd_ray.common.data as data
from gen_ssd_ray.common.config import DataConfig
from gen_ssd_ray.common.data import DataError, Problem, load_problems, open_problems


def cfg(path, **kw) -> DataConfig:
    kw.setdefault("limit", None)
    return DataConfig(path=str(path), **kw)


def rows_for(stem: str) -> list[dict]:
    """Ten rows with every kind of id trouble, and explicit ids that spell the positional ids `<stem>-<index>`
    (they are real ids: fallbacks live in the reserved `!` namespace, so nothing can take them)."""
    return [
        {"question": "q0", "answer": "#### 1", "id": "x"},
        {"question": "q1", "answer": "#### 2", "id": "y"},
        {"question": "q2", "answer": "#### 3", "id": "x"},  # duplicate of row 0
        {"question": "q3", "answer": "#### 4", "id": None},  # missing id
        {"question": "", "answer": "#### 5", "id": "z"},  # empty question
        {"question": "q5", "answer": None, "id": f"{stem}-3"},  # spells row 3's positional id
        {"question": "q6", "answer": "#### 7", "id": f"{stem}-7"},  # spells row 7's positional id
        {"question": "q7", "answer": "#### 8", "id": "x"},  # duplicate of row 0
        {"question": "q8", "answer": "a long solution\nwith no final answer", "id": "w"},
        {"question": "q9", "answer": "#### 10", "id": "10"},
    ]


UNPARSEABLE = (
    "bad gold answer in data.answer_field='answer': no final answer found (no '#### N' line, no \\boxed{}, "
    "and not a one-line value of at most 64 characters): 'a long solution\\nwith no final answer'"
)
EMPTY_QUESTION = "bad question in data.question_field='question': empty text"
NO_ANSWER = "bad gold answer in data.answer_field='answer': missing (null or absent)"


def expected(stem: str, id_field: str | None) -> list[Problem]:
    dup_x = "duplicate id in data.id_field='id': 'x' (first at row 0)"
    if id_field is None:
        return [
            Problem(f"{stem}-0", "q0", "1"),
            Problem(f"{stem}-1", "q1", "2"),
            Problem(f"{stem}-2", "q2", "3"),
            Problem(f"{stem}-3", "q3", "4"),
            Problem(f"{stem}-4", "", "5", EMPTY_QUESTION),
            Problem(f"{stem}-5", "q5", None, NO_ANSWER),
            Problem(f"{stem}-6", "q6", "7"),
            Problem(f"{stem}-7", "q7", "8"),
            Problem(f"{stem}-8", "q8", None, UNPARSEABLE),
            Problem(f"{stem}-9", "q9", "10"),
        ]
    return [
        Problem("x", "q0", "1"),
        Problem("y", "q1", "2"),
        Problem(f"!{stem}-2", "q2", "3", dup_x),
        Problem(f"!{stem}-3", "q3", "4", "bad id in data.id_field='id': missing (null or absent)"),
        Problem("z", "", "5", EMPTY_QUESTION),
        Problem(f"{stem}-3", "q5", None, NO_ANSWER),  # a real id, even if it spells a positional one
        Problem(f"{stem}-7", "q6", "7"),
        Problem(f"!{stem}-7", "q7", "8", dup_x),
        Problem("w", "q8", None, UNPARSEABLE),
        Problem("10", "q9", "10"),
    ]


def write_jsonl(path, rows, sep="\n"):
    path.write_bytes("".join(json.dumps(r) + sep for r in rows).encode())
    return path


def write_source(kind: str, tmp_path, monkeypatch) -> tuple[str, str]:
    """Write `rows_for(stem)` as `kind`; return (data.path, stem)."""
    if kind == "jsonl":
        return str(write_jsonl(tmp_path / "d.jsonl", rows_for("d"))), "d"
    if kind == "jsonl-line-by-line":
        monkeypatch.setattr(data, "_WHOLE_READ_BYTES", 0)
        monkeypatch.setattr(data, "_SCAN_BYTES", 7)  # blocks cut mid-line
        return str(write_jsonl(tmp_path / "d.jsonl", rows_for("d"), sep="\r\n")), "d"
    if kind == "json-lines":
        return str(write_jsonl(tmp_path / "d.json", rows_for("d"))), "d"
    if kind == "json-array":
        (tmp_path / "d.json").write_text(json.dumps({"rows": rows_for("d")}))
        return str(tmp_path / "d.json"), "d"
    if kind == "parquet":
        monkeypatch.setattr(data, "_BATCH_ROWS", 2)
        pq.write_table(pa.Table.from_pylist(rows_for("d")), tmp_path / "d.parquet", row_group_size=3)
        return str(tmp_path / "d.parquet"), "d"
    if kind == "parquet-folder":
        table = pa.Table.from_pylist(rows_for("d"))
        (tmp_path / "d" / "sub").mkdir(parents=True)
        pq.write_table(table.slice(0, 4), tmp_path / "d" / "a.parquet", row_group_size=3)
        pq.write_table(table.slice(4, 1), tmp_path / "d" / "b.parquet")
        pq.write_table(table.slice(5), tmp_path / "d" / "sub" / "c.parquet", row_group_size=2)
        return str(tmp_path / "d"), "d"
    if kind == "hf-list":

        class FakeDataset(list):
            column_names = ["question", "answer", "id"]

        ds = FakeDataset(rows_for("d-train"))
    else:  # hf-dataset: a real datasets.Dataset
        datasets = pytest.importorskip("datasets")
        monkeypatch.setattr(data, "_BATCH_ROWS", 3)
        ds = datasets.Dataset.from_list(rows_for("d-train"))
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=lambda name, split: ds))
    return "org/d", "d-train"


KINDS = [
    "jsonl",
    "jsonl-line-by-line",
    "json-lines",
    "json-array",
    "parquet",
    "parquet-folder",
    "hf-list",
    "hf-dataset",
]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("id_field", [None, "id"])
def test_every_format_streams_the_same_problems(kind, id_field, tmp_path, monkeypatch):
    path, stem = write_source(kind, tmp_path, monkeypatch)
    want = expected(stem, id_field)
    stream = open_problems(cfg(path, split="train", id_field=id_field))
    assert list(stream) == want
    assert list(stream) == want  # every pass re-reads the source
    assert stream.count == 10 and stream.source_rows == 10
    assert load_problems(cfg(path, split="train", id_field=id_field)) == want
    # every slice: same ids as in the full stream (duplicates judged over the rows before the offset)
    for offset in range(12):
        for limit in (None, 1, 2, 3, 20):
            sliced = open_problems(cfg(path, split="train", id_field=id_field, offset=offset, limit=limit))
            end = None if limit is None else offset + limit
            assert list(sliced) == want[offset:end], (offset, limit)
            assert sliced.count == len(want[offset:end])


def test_jsonl_line_numbers_bad_lines_and_separators(tmp_path, monkeypatch):
    """Blank and malformed lines, \\r\\n and lone \\r: the line-by-line reader splits the file as the whole-file
    reader does, and counts the same rows."""
    text = (
        b'{"question": "a", "answer": "1"}\r\n'  # 0
        b"\n"  # 1 blank
        b'{"question": "b", "answer": "2"}\r'  # 2 (lone \r ends a line)
        b'{"question": "c", "answer":\n'  # 3 malformed
        b"   \t\n"  # 4 blank
        b"[1]\r\n"  # 5 not an object
        b'{"question": "d", "answer": "#### 4"}'  # 6, no final newline
    )
    path = tmp_path / "m.jsonl"
    path.write_bytes(text)
    whole = list(open_problems(cfg(path)))
    assert [p.problem_id for p in whole] == ["m-0", "m-2", "m-3", "m-5", "m-6"]
    assert [p.ok for p in whole] == [True, True, False, False, True]
    assert whole[2].error.startswith("malformed JSON on line 4")
    for scan in (1, 2, 5, 1 << 20):
        monkeypatch.setattr(data, "_WHOLE_READ_BYTES", 0)
        monkeypatch.setattr(data, "_SCAN_BYTES", scan)
        stream = open_problems(cfg(path))
        assert list(stream) == whole and stream.count == 5
        assert list(open_problems(cfg(path, offset=2, limit=2))) == whole[2:4]


def test_embedded_gsm8k_streams_like_load_problems(monkeypatch):
    for split, n in (("train", 7473), ("test", 1319)):
        full = load_problems(DataConfig(path=f"embedded:gsm8k/{split}", limit=None))
        assert len(full) == n
        stream = open_problems(DataConfig(path=f"embedded:gsm8k/{split}", offset=1000, limit=200))
        assert stream.count == 200 and list(stream) == full[1000:1200]
        monkeypatch.setattr(data, "_WHOLE_READ_BYTES", 0)  # the line-by-line reader, the same problems
        assert list(open_problems(DataConfig(path=f"embedded:gsm8k/{split}", limit=None))) == full
        monkeypatch.undo()


# ---- checked up front ------------------------------------------------------------------------------


def test_open_reads_only_the_first_jsonl_line(tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "t.jsonl", [{"question": "q", "answer": "1", "id": i} for i in range(50)])
    decoded = []
    real = data._decode_line
    monkeypatch.setattr(data, "_decode_line", lambda i, line: decoded.append(i) or real(i, line))
    stream = open_problems(cfg(path, id_field="id"))
    assert decoded == [0]
    # without an id field the rows before the offset are not decoded at all
    decoded.clear()
    assert [p.problem_id for p in open_problems(cfg(path, offset=45, limit=2))] == ["t-45", "t-46"]
    assert decoded == [0, 45, 46]
    assert len(list(stream)) == 50


def test_open_scans_on_until_a_field_shows_up(tmp_path):
    rows = [{"question": "q", "answer": "1"}] * 3 + [{"question": "q", "answer": "1", "uid": "u"}]
    path = write_jsonl(tmp_path / "late.jsonl", rows)
    ps = list(open_problems(cfg(path, id_field="uid")))
    assert [p.error for p in ps] == ["bad id in data.id_field='uid': missing (null or absent)"] * 3 + [None]
    with pytest.raises(DataError, match=r"data.id_field='nope'.*\['question', 'answer', 'uid'\]"):
        open_problems(cfg(path, id_field="nope"))


def test_open_reads_no_parquet_rows(tmp_path, monkeypatch):
    pq.write_table(pa.table({"question": ["q"] * 7, "answer": ["1"] * 7}), tmp_path / "p.parquet")

    def no_reading(self, *a, **kw):
        raise AssertionError("rows read before iterating")

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", no_reading)
    stream = open_problems(cfg(tmp_path / "p.parquet", offset=2, limit=3))
    assert stream.count == 3 and stream.source_rows == 7  # from the footer
    with pytest.raises(DataError, match="data.answer_field='solution'"):
        open_problems(cfg(tmp_path / "p.parquet", answer_field="solution"))


@pytest.mark.parametrize("whole", [True, False])
def test_unreadable_jsonl(whole, tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "locked.jsonl", [{"question": "q", "answer": "1"}])
    if not whole:
        monkeypatch.setattr(data, "_WHOLE_READ_BYTES", 0)

    def denied(self, *a, **kw):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(type(path), "open", denied)
    monkeypatch.setattr(type(path), "read_bytes", denied)
    with pytest.raises(DataError, match=r"locked.jsonl.*cannot read it \(Permission denied\)"):
        open_problems(cfg(path))


def test_parquet_damaged_past_the_footer_raises_while_streaming(tmp_path, monkeypatch):
    pq.write_table(pa.table({"question": ["q"] * 5, "answer": ["1"] * 5}), tmp_path / "p.parquet")
    stream = open_problems(cfg(tmp_path / "p.parquet"))

    def damaged(self, *a, **kw):
        raise OSError("Corrupt snappy compressed data.")

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", damaged)
    with pytest.raises(DataError, match=r"cannot read Parquet file .*p.parquet \(Corrupt snappy"):
        list(stream)


# ---- memory ----------------------------------------------------------------------------------------


def test_parquet_stream_reads_only_needed_columns_in_bounded_memory(tmp_path, monkeypatch):
    """200,000 rows with a 1 KB `solution` column (200 MiB in full): the stream asks pyarrow for the
    question and answer columns only, and its Python peak stays at a few batches."""
    n, chunk = 200_000, 50_000
    wide = "s" * 1024
    schema = pa.schema([("question", pa.string()), ("answer", pa.string()), ("solution", pa.string())])
    path = tmp_path / "wide.parquet"
    with pq.ParquetWriter(path, schema) as writer:
        for lo in range(0, n, chunk):
            columns = {
                "question": [f"q{i}" for i in range(lo, lo + chunk)],
                "answer": [f"#### {i}" for i in range(lo, lo + chunk)],
                "solution": pa.repeat(pa.scalar(wide), chunk),
            }
            writer.write_table(pa.table(columns, schema=schema))
    calls = []
    real = pq.ParquetFile.iter_batches

    def spy(self, *args, **kw):
        calls.append(kw.get("columns"))
        return real(self, *args, **kw)

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)

    stream = open_problems(cfg(path))
    assert stream.count == n
    tracemalloc.start()
    try:
        seen = ok = 0
        for p in stream:
            seen += 1
            ok += p.ok
            last = p
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert seen == ok == n and last == Problem(f"wide-{n - 1}", f"q{n - 1}", str(n - 1))
    assert calls == [["question", "answer"]]  # never `solution`
    assert peak < 8 * 2**20, f"peak {peak / 2**20:.1f} MiB; the table is {n * 1024 / 2**20:.0f} MiB"


def test_parquet_row_groups_before_the_offset_are_not_read(tmp_path, monkeypatch):
    table = pa.table({"question": [f"q{i}" for i in range(10)], "answer": ["1"] * 10, "x": ["w"] * 10})
    pq.write_table(table, tmp_path / "g.parquet", row_group_size=3)  # groups: 0-2, 3-5, 6-8, 9
    calls = []
    real = pq.ParquetFile.iter_batches

    def spy(self, *args, **kw):
        calls.append((kw.get("columns"), kw.get("row_groups")))
        return real(self, *args, **kw)

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    ps = list(open_problems(cfg(tmp_path / "g.parquet", offset=7, limit=2)))
    assert [p.problem_id for p in ps] == ["g-7", "g-8"]
    assert calls == [(["question", "answer"], [2, 3])]
    calls.clear()  # with an id field every earlier id is needed: all groups, plus the id column
    ps = list(open_problems(cfg(tmp_path / "g.parquet", offset=7, limit=2, id_field="question")))
    assert [p.problem_id for p in ps] == ["q7", "q8"]
    assert calls == [(["question", "answer"], [0, 1, 2, 3])]
