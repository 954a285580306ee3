"""Adversarial data (issue 11, problem loading): junk gold answers, junk and colliding ids, strings the
Parquet writer cannot encode, and the problems' content hash; every case in every source format that
can hold it (JSONL, JSON array, Parquet, a Hugging Face dataset), and every error row writable.

Each case is one member of a class: a bad value becomes an error row naming the config key (the job goes
on), a fine value is normalized to one canonical string whatever the format's type for it.
"""

import dataclasses
import hashlib
import io
import itertools
import json
import os
import sys
import types
from decimal import Decimal

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gen_ssd_ray.common.config import DataConfig
from gen_ssd_ray.common.data import DataError, Problem, load_problems
from gen_ssd_ray.common.prompts import RenderedPrompt
from gen_ssd_ray.core.answers import extract_gold_answer
from gen_ssd_ray.evaluate.rows import PREDICTION_SCHEMA, sample_rows
from gen_ssd_ray.generate.rows import rows_to_table

try:
    import datasets as hf_datasets  # the real library, before any test replaces it in sys.modules
except ImportError:  # pragma: no cover
    hf_datasets = None

SURROGATE = "\ud800"  # json.loads accepts "\\ud800"; UTF-8 cannot encode it


def cfg(path, **kw) -> DataConfig:
    kw.setdefault("limit", None)
    return DataConfig(path=str(path), **kw)


def assert_writable(problems: list[Problem]) -> None:
    """The rows the generation and the evaluation job write for these problems (error rows included) go
    through their real output schemas and the Parquet writer."""
    rows = [
        {
            "problem_id": p.problem_id,
            "trajectory_index": 0,
            "question": p.question,
            "gold_answer": p.gold_answer,
            "status": "error" if p.error else "completed",
            "error": p.error,
        }
        for p in problems
    ]
    pq.write_table(rows_to_table(rows), io.BytesIO())
    predictions = [
        row
        for p in problems
        for row in sample_rows(
            p, RenderedPrompt(error=p.error or "not generated"), None, n=1, model="m", seed=0
        )
    ]
    pq.write_table(pa.Table.from_pylist(predictions, schema=PREDICTION_SCHEMA), io.BytesIO())


# ---- sources ---------------------------------------------------------------------------------------

FORMATS = ["jsonl", "json", "parquet", "hf", "hf-arrow"]


def representable(fmt: str, values: list) -> bool:
    """Whether a source of format `fmt` can hold these values at all."""
    flat = json.dumps(values, default=repr)
    if fmt in ("jsonl", "json"):
        try:
            json.dumps(values, allow_nan=True)
        except TypeError:
            return False  # bytes, Decimal
        return True
    if fmt == "parquet":
        if "\\ud8" in flat or "\\udc" in flat:
            return False  # pyarrow cannot even build the column
        try:
            pa.array(values)
        except (pa.ArrowException, TypeError, ValueError, OverflowError):
            return False
        return True
    if fmt == "hf-arrow":  # a real `datasets.Dataset` (Arrow): what pyarrow can hold, except Decimal
        if any(isinstance(v, Decimal) for v in values):
            return False
        return representable("parquet", values)
    return True  # hf: any Python rows (an iterable dataset)


def write_rows(fmt: str, rows: list[dict], tmp_path, monkeypatch, name: str = "src") -> str:
    """`rows` as a source of format `fmt`; returns its data.path."""
    if fmt == "jsonl":
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "json":
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(rows))
    elif fmt == "parquet":
        path = tmp_path / f"{name}.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif fmt == "hf-arrow":
        if hf_datasets is None:
            pytest.skip("datasets is not installed")
        monkeypatch.setitem(sys.modules, "datasets", hf_datasets)  # the real one while it builds
        ds = hf_datasets.Dataset.from_list(rows)
        monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=lambda n, split: ds))
        return f"org/{name}"
    else:

        class FakeDataset(list):
            column_names = list(dict.fromkeys(k for r in rows for k in r))

        ds = FakeDataset(rows)
        monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=lambda n, split: ds))
        return f"org/{name}"
    return str(path)


def cases_in_formats(cases):
    """(format, case...) for every case its format can hold."""
    out = []
    for fmt in FORMATS:
        for case in cases:
            if representable(fmt, [case[1]]):
                out.append(pytest.param(fmt, *case, id=f"{fmt}-{case[0]}"))
    return out


# ---- item 1: gold answers --------------------------------------------------------------------------

# (label, value, what the error says)
JUNK_ANSWERS = [
    ("null", None, "missing"),
    ("empty", "", "empty"),
    ("blank", "  \t ", "empty"),
    ("newlines", "\n\n", "empty"),
    ("hashes-alone", "####", "'####'"),
    ("hashes-space", "#### ", "'####'"),
    ("hashes-tab", "####\t", "'####'"),
    ("hashes-dot", "#### .", "'####'"),
    ("hashes-after-text", "so the answer is\n####", "'####'"),
    ("hashes-then-next-line", "####\n72", "'####'"),
    ("hashes-punct", "#### $", "'####'"),
    ("empty-box", "\\boxed{}", "boxed"),
    ("blank-box", "so \\boxed{  }", "boxed"),
    ("unbalanced-box", "\\boxed{12", "boxed"),
    ("punct-only", "?", "no digit or letter"),
    ("nan", float("nan"), "NaN"),
    ("inf", float("inf"), "infinite"),
    ("-inf", float("-inf"), "infinite"),
    ("true", True, "boolean"),
    ("false", False, "boolean"),
    ("list", [1, 2], "list"),
    ("empty-list", [], "list"),
    ("list-of-str", ["#### 3"], "list"),
    ("dict", {"value": 3}, "dict"),
    ("nested", {"a": [{"b": "#### 1"}]}, "dict"),
    ("bytes", b"#### 3", "bytes"),
    ("surrogate", SURROGATE, "Unicode"),
    ("surrogate-in-solution", f"steps {SURROGATE}\n#### 3", "Unicode"),
    ("surrogate-gold", f"#### 3{SURROGATE}", "Unicode"),
    ("no-final-answer", "a long solution\nwithout a marked answer", "no final answer"),
]

# (label, value, canonical gold)
FINE_ANSWERS = [
    ("int", 7, "7"),
    ("negative-int", -4, "-4"),
    ("big-int", 10**20, "100000000000000000000"),
    ("integral-float", 7.0, "7"),
    ("negative-zero", -0.0, "0"),
    ("float", 2.5, "2.5"),
    ("small-float", 0.1, "0.1"),
    ("big-float", 1e20, "100000000000000000000"),
    ("decimal", Decimal("2.50"), "2.5"),
    ("integral-decimal", Decimal("7.000"), "7"),
    ("hashes", "#### 5", "5"),
    ("solution", "1+1=2\n#### 2", "2"),
    ("padded", "  18 ", "18"),
    ("box", "so \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("unicode", "∅", "∅"),
]


@pytest.mark.parametrize("fmt, label, value, reason", cases_in_formats(JUNK_ANSWERS))
def test_junk_gold_answer_is_an_error_row_naming_the_field(fmt, label, value, reason, tmp_path, monkeypatch):
    rows = [{"q": "fine?", "sol": "#### 1"}, {"q": "junk?", "sol": value}]
    if fmt in ("parquet", "hf-arrow"):
        rows = rows[1:]  # one column type per file
    path = write_rows(fmt, rows, tmp_path, monkeypatch)
    ps = load_problems(cfg(path, split="train", question_field="q", answer_field="sol"))
    bad = ps[-1]
    assert not bad.ok and bad.gold_answer is None, (label, bad)
    assert "data.answer_field='sol'" in bad.error and reason in bad.error, bad.error
    if fmt not in ("parquet", "hf-arrow"):
        assert ps[0].ok and ps[0].gold_answer == "1"  # the job goes on
    assert_writable(ps)


@pytest.mark.parametrize("fmt, label, value, gold", cases_in_formats(FINE_ANSWERS))
def test_fine_gold_answers_are_canonical_strings(fmt, label, value, gold, tmp_path, monkeypatch):
    path = write_rows(fmt, [{"question": "q?", "answer": value}], tmp_path, monkeypatch)
    (p,) = load_problems(cfg(path, split="train"))
    assert p.ok and p.gold_answer == gold, (label, p)


@pytest.mark.parametrize("label, value, reason", [c for c in JUNK_ANSWERS if c[1] is not None])
def test_extract_gold_answer_rejects_the_same_class(label, value, reason):
    assert extract_gold_answer(value) is None, label


# ---- item 2: ids -----------------------------------------------------------------------------------

JUNK_IDS = [
    ("null", None, "missing"),
    ("empty", "", "empty"),
    ("blank", "   ", "empty"),
    ("nan", float("nan"), "NaN"),
    ("inf", float("inf"), "infinite"),
    ("-inf", float("-inf"), "infinite"),
    ("true", True, "boolean"),
    ("false", False, "boolean"),
    ("list", [1], "list"),
    ("empty-list", [], "list"),
    ("dict", {"id": 1}, "dict"),
    ("nested", [{"id": [1]}], "list"),
    ("bytes", b"id-1", "bytes"),
    ("surrogate", f"id{SURROGATE}", "Unicode"),
    ("reserved", "!src-1", "reserved"),
]


@pytest.mark.parametrize("fmt, label, value, reason", cases_in_formats(JUNK_IDS))
def test_junk_id_is_an_error_row_naming_the_field(fmt, label, value, reason, tmp_path, monkeypatch):
    rows = [{"question": "q0", "answer": "1", "uid": "a"}, {"question": "q1", "answer": "2", "uid": value}]
    if fmt in ("parquet", "hf-arrow"):
        rows = rows[1:]
    path = write_rows(fmt, rows, tmp_path, monkeypatch)
    ps = load_problems(cfg(path, split="train", id_field="uid"))
    bad = ps[-1]
    assert not bad.ok, (label, bad)
    assert "data.id_field='uid'" in bad.error and reason in bad.error, bad.error
    assert bad.problem_id.startswith("!"), bad.problem_id  # a fallback id (reserved namespace)
    if fmt not in ("parquet", "hf-arrow"):
        assert ps[0].ok and ps[0].problem_id == "a"
    assert_writable(ps)


# Every spelling of one id across exports: the same canonical id.
SAME_IDS = [
    ("1", [1, 1.0, "1", Decimal("1"), Decimal("1.00")]),
    ("-3", [-3, -3.0, "-3"]),
    ("0", [0, 0.0, -0.0, "0"]),
    ("2.5", [2.5, "2.5", Decimal("2.5"), Decimal("2.50")]),
    ("12345678901", [12345678901, 12345678901.0, "12345678901"]),
]


@pytest.mark.parametrize("canonical, spellings", SAME_IDS, ids=[c for c, _ in SAME_IDS])
def test_id_types_across_exports_give_one_canonical_id(canonical, spellings, tmp_path, monkeypatch):
    for k, value in enumerate(spellings):
        for fmt in FORMATS:
            if not representable(fmt, [value]):
                continue
            path = write_rows(
                fmt, [{"question": "q", "answer": "1", "id": value}], tmp_path, monkeypatch, f"s{k}"
            )
            (p,) = load_problems(cfg(path, split="train", id_field="id"))
            assert p.ok and p.problem_id == canonical, (fmt, value, p)


def test_parquet_folder_whose_shards_type_the_id_column_differently(tmp_path):
    """Shards exported at different times: float ids in one, int ids in another, strings in a third."""
    (tmp_path / "dir").mkdir()
    for name, ids in (("a", [1.0, 2.0]), ("b", [3, 2]), ("c", ["4", "1"])):
        table = pa.table({"question": [f"q{i}" for i in ids], "answer": ["1"] * 2, "id": ids})
        pq.write_table(table, tmp_path / "dir" / f"{name}.parquet")
    ps = load_problems(cfg(tmp_path / "dir", id_field="id"))
    assert [p.problem_id for p in ps] == ["1", "2", "3", "!dir-3", "4", "!dir-5"]
    assert [p.ok for p in ps] == [True, True, True, False, True, False]


def test_ids_of_different_types_are_duplicates(tmp_path):
    rows = [{"question": f"q{i}", "answer": "1", "id": v} for i, v in enumerate([1, "1", 1.0, 2])]
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ps = load_problems(cfg(path, id_field="id"))
    assert [p.problem_id for p in ps] == ["1", "!t-1", "!t-2", "2"]
    assert [p.ok for p in ps] == [True, False, False, True]
    assert "duplicate" in ps[1].error and "data.id_field='id'" in ps[1].error


def test_duplicate_fallbacks_never_collide_with_real_ids_in_any_order(tmp_path):
    """Real ids that spell every fallback the loader could make, in every order of the rows: each real
    id that is first of its value keeps it, and every id is unique."""
    rows = [
        {"question": "q", "answer": "1", "id": "x"},
        {"question": "q", "answer": "1", "id": "x"},  # a duplicate
        {"question": "q", "answer": "1"},  # a missing id
        {"question": "q", "answer": "1", "id": "p-1"},  # spells a positional fallback
        {"question": "q", "answer": "1", "id": "p-2"},
        {"question": "q", "answer": "1", "id": "p-1-dup1"},
        {"question": "q", "answer": "1", "id": "p-0-dup1"},
    ]
    for k, order in enumerate(itertools.permutations(range(len(rows)))):
        path = tmp_path / "p.jsonl"
        path.write_text("".join(json.dumps(rows[i]) + "\n" for i in order))
        ps = load_problems(cfg(path, id_field="id"))
        ids = [p.problem_id for p in ps]
        assert len(set(ids)) == len(ids), (order, ids)
        real = [rows[i].get("id") for i in order]
        for pos, (value, p) in enumerate(zip(real, ps, strict=True)):
            first = value is not None and real.index(value) == pos
            assert (p.problem_id == value) == first, (order, pos, p)
        if k > 2000:
            break


def test_generated_ids_are_positional_and_survive_an_in_place_edit(tmp_path):
    path = tmp_path / "g.jsonl"
    rows = [{"question": f"q{i}", "answer": str(i)} for i in range(4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    before = load_problems(cfg(path))
    rows[2]["question"] = "edited"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    after = load_problems(cfg(path))
    assert [p.problem_id for p in after] == [p.problem_id for p in before] == [f"g-{i}" for i in range(4)]
    changed = [a.problem_id for a, b in zip(after, before, strict=True) if a.content_hash != b.content_hash]
    assert changed == ["g-2"]  # the edit shows in the content hash of exactly that problem


# ---- item 3: strings the writer cannot encode -------------------------------------------------------

UNENCODABLE_ROWS = [
    (
        "question",
        {"question": f"what {SURROGATE}?", "answer": "1", "id": "a"},
        "data.question_field='question'",
    ),
    ("question-only-surrogate", {"question": SURROGATE, "answer": "1", "id": "a"}, "data.question_field"),
    ("low-surrogate", {"question": "q\udc80", "answer": "1", "id": "a"}, "data.question_field"),
    ("answer", {"question": "q", "answer": f"#### 1{SURROGATE}", "id": "a"}, "data.answer_field='answer'"),
    ("id", {"question": "q", "answer": "1", "id": f"a{SURROGATE}"}, "data.id_field='id'"),
    ("all", {"question": SURROGATE, "answer": SURROGATE, "id": SURROGATE}, "data.id_field='id'"),
]


@pytest.mark.parametrize("fmt", ["jsonl", "json", "hf"])
@pytest.mark.parametrize("label, bad, key", UNENCODABLE_ROWS, ids=[c[0] for c in UNENCODABLE_ROWS])
def test_unencodable_strings_become_writable_error_rows(fmt, label, bad, key, tmp_path, monkeypatch):
    rows = [{"question": "q0", "answer": "1", "id": "z"}, bad, {"question": "q2", "answer": "2", "id": "y"}]
    path = write_rows(fmt, rows, tmp_path, monkeypatch)
    ps = load_problems(cfg(path, split="train", id_field="id"))
    assert [p.ok for p in ps] == [True, False, True]  # the job goes on
    assert key in ps[1].error and "Unicode" in ps[1].error, ps[1].error
    assert "\\ud8" in ps[1].error or "\\udc" in ps[1].error  # the bad string escaped, not raw
    for p in ps:
        for text in (p.problem_id, p.question, p.gold_answer, p.error, p.content_hash):
            if text is not None:
                text.encode("utf-8")
    assert_writable(ps)


def test_a_non_utf8_file_name_gives_writable_ids(tmp_path):
    """A file name that is not UTF-8 (Linux allows any bytes) reaches Python with surrogate escapes; the
    generated ids carry its stem, escaped."""
    name = os.fsencode(tmp_path) + b"/caf\xe9.jsonl"
    with open(name, "wb") as f:
        f.write(b'{"question": "q", "answer": "1"}\n')
    ps = load_problems(cfg(os.fsdecode(name)))
    assert [p.problem_id for p in ps] == ["caf\\udce9-0"] and ps[0].ok
    assert_writable(ps)
    assert load_problems(cfg(os.fsdecode(name), id_field="question"))[0].problem_id == "q"


def invalid_utf8_table(column: str) -> pa.Table:
    """A table whose `column` holds bytes that are not UTF-8 in row 1 (other writers produce these)."""
    good = pa.array(["q0", "q1", "q2"])
    offsets = pa.py_buffer(b"".join(n.to_bytes(4, "little") for n in (0, 2, 5, 7)))
    bad = pa.Array.from_buffers(pa.string(), 3, [None, offsets, pa.py_buffer(b"q0q\xff\xfeq2")])
    columns = {"question": good, "answer": pa.array(["1", "2", "3"]), "id": pa.array(["a", "b", "c"])}
    columns[column] = bad
    return pa.table(columns)


def invalid_utf8_parquet(path, column: str) -> None:
    pq.write_table(invalid_utf8_table(column), path)


@pytest.mark.parametrize(
    "column, key",
    [("question", "data.question_field"), ("answer", "data.answer_field"), ("id", "data.id_field")],
)
def test_parquet_invalid_utf8_is_one_error_row_not_a_failed_job(column, key, tmp_path):
    invalid_utf8_parquet(tmp_path / "u.parquet", column)
    ps = load_problems(cfg(tmp_path / "u.parquet", id_field="id"))
    assert [p.ok for p in ps] == [True, False, True]
    assert key in ps[1].error and "UTF-8" in ps[1].error, ps[1].error
    assert_writable(ps)


@pytest.mark.skipif(hf_datasets is None, reason="datasets is not installed")
@pytest.mark.parametrize("column", ["question", "answer", "id"])
def test_hf_dataset_invalid_utf8_is_one_error_row(column, monkeypatch):
    ds = hf_datasets.Dataset(invalid_utf8_table(column))
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=lambda n, split: ds))
    ps = load_problems(cfg("org/u", split="train", id_field="id"))
    assert [p.ok for p in ps] == [True, False, True]
    assert f"data.{column}_field" in ps[1].error and "UTF-8" in ps[1].error, ps[1].error
    assert_writable(ps)


def test_error_messages_never_embed_a_bad_string_raw(tmp_path):
    """Every error a row can get, with surrogates in every value the message could quote."""
    rows = [
        {"question": 12, "answer": SURROGATE, "id": "a"},
        {"question": "q", "answer": [SURROGATE], "id": "b"},
        {"question": "q", "answer": {"x": SURROGATE}, "id": "c"},
        {"question": "q", "answer": f"long\n{SURROGATE}", "id": "d"},
        {"question": "q", "answer": "1", "id": [SURROGATE]},
        {"question": "q", "answer": "1", "id": "e"},
        {"question": "q", "answer": "1", "id": "e"},
    ]
    path = tmp_path / "e.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"question": "\\ud800", "answer": \n')
    ps = load_problems(cfg(path, id_field="id"))
    assert sum(p.ok for p in ps) == 1
    for p in ps:
        if p.error:
            p.error.encode("utf-8")
    assert_writable(ps)


def test_json_nested_too_deeply_is_a_bad_row_or_a_clear_error(tmp_path):
    """json's parser recurses: a line nested thousands deep is one error row (JSONL), or a DataError
    naming data.path (a .json document, parsed whole); never a RecursionError traceback."""
    deep = "[" * 100_000 + "]" * 100_000
    path = tmp_path / "deep.jsonl"
    path.write_text(f'{{"question": "q", "answer": "1"}}\n{{"question": "q", "answer": {deep}}}\n')
    ps = load_problems(cfg(path))
    assert [p.ok for p in ps] == [True, False] and "nested too deeply" in ps[1].error
    (tmp_path / "deep.json").write_text(f'[{{"question": "q", "answer": {deep}}}]')
    with pytest.raises(DataError, match=r"data.path=.*deep.json.*nested too deeply"):
        load_problems(cfg(tmp_path / "deep.json"))


def test_a_deeply_nested_python_value_is_described_not_crashed_on(tmp_path, monkeypatch):
    nested: list = []
    for _ in range(100_000):
        nested = [nested]
    path = write_rows("hf", [{"question": "q", "answer": nested, "id": nested}], tmp_path, monkeypatch)
    (p,) = load_problems(cfg(path, split="train", id_field="id"))
    assert not p.ok and "data.id_field='id'" in p.error and "nested too deeply" in p.error


# ---- item 4: content hash --------------------------------------------------------------------------


def test_content_hash_is_sha256_of_the_canonical_encoding():
    p = Problem("a-0", "1+1?", "2")
    encoding = json.dumps(["gen-ssd-problem/1", "a-0", "1+1?", "2"], ensure_ascii=True, separators=(",", ":"))
    assert p.content_hash == hashlib.sha256(encoding.encode("ascii")).hexdigest()
    assert len(p.content_hash) == 64 and int(p.content_hash, 16) >= 0
    assert Problem("a-0", "1+1?", "2") == p  # constructor calls without a hash keep working
    assert Problem("a-0", None, None, "empty").content_hash  # error rows have one too


def test_content_hash_changes_with_id_question_or_gold_only():
    base = Problem("a", "q", "1")
    assert dataclasses.replace(base, question="q2").content_hash == Problem("a", "q2", "1").content_hash
    assert (
        len(
            {
                base.content_hash,
                *(
                    p.content_hash
                    for p in (
                        Problem("b", "q", "1"),
                        Problem("a", "q ", "1"),
                        Problem("a", "q", "2"),
                        Problem("a", "q", None),
                        Problem("a", None, "1"),
                    )
                ),
            }
        )
        == 6
    )
    # no separator ambiguity: the fields are JSON-encoded, not joined
    assert Problem("a", "b\x00c", "d").content_hash != Problem("a\x00b", "c", "d").content_hash


@pytest.mark.parametrize("fmt", FORMATS)
def test_content_hash_is_the_same_in_every_format(fmt, tmp_path, monkeypatch):
    rows = [{"question": "What is 2+3?", "answer": "so\n#### 5", "id": 7.0}]
    if fmt not in ("parquet", "hf-arrow"):
        rows[0]["id"] = 7
    path = write_rows(fmt, rows, tmp_path, monkeypatch)
    (p,) = load_problems(cfg(path, split="train", id_field="id"))
    assert p.content_hash == Problem("7", "What is 2+3?", "5").content_hash


def test_content_hash_of_embedded_data_is_stable():
    (p,) = load_problems(DataConfig(path="embedded:gsm8k/test", limit=1))
    assert p.content_hash == Problem(p.problem_id, p.question, p.gold_answer).content_hash
    assert (
        p.content_hash == "1a91336d45f5a0cb0097aebb5300a4717922f8dee7d79bae7d2ab4d6d652c090"
    )  # the encoding never changes silently: outputs record it
