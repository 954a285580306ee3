"""Data loading (gen_ssd_ray.common.data): every source format, slices, ids, bad rows, fatal errors; and the
user-turn helpers of gen_ssd_ray.common.prompts."""

import json
import sys
import types
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gen_ssd_ray.common.config import DataConfig, PromptConfig
from gen_ssd_ray.common.data import DataError, Problem, check_data_source, load_problems
from gen_ssd_ray.common.errors import InputError
from gen_ssd_ray.common.prompts import chat_messages, render_user_message

ROWS = [
    {"question": "What is 1+1?", "answer": "1+1=2\n#### 2", "uid": "a"},
    {"question": "What is 2+3?", "answer": "#### 5", "uid": "b"},
    {"question": "Half of 1?", "answer": "so $\\boxed{\\frac{1}{2}}$", "uid": "c"},
    {"question": "How many?", "answer": 7, "uid": "d"},
    {"question": "Big?", "answer": "#### 1,000", "uid": "e"},
]
GOLDS = ["2", "5", "\\frac{1}{2}", "7", "1000"]


def cfg(path, **kw) -> DataConfig:
    kw.setdefault("limit", None)
    return DataConfig(path=str(path), **kw)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---- formats -------------------------------------------------------------------------------------


def test_jsonl(tmp_path):
    ps = load_problems(cfg(write_jsonl(tmp_path / "toy.jsonl", ROWS)))
    assert [p.gold_answer for p in ps] == GOLDS
    assert [p.problem_id for p in ps] == [f"toy-{i}" for i in range(5)]
    assert all(p.error is None and p.ok for p in ps)
    assert ps[0] == Problem("toy-0", "What is 1+1?", "2")


def test_json_array_and_wrapped(tmp_path):
    plain = tmp_path / "arr.json"
    plain.write_text(json.dumps(ROWS))
    assert [p.gold_answer for p in load_problems(cfg(plain))] == GOLDS
    for key in ("data", "rows"):
        wrapped = tmp_path / f"w_{key}.json"
        wrapped.write_text(json.dumps({key: ROWS, "meta": 1}))
        ps = load_problems(cfg(wrapped))
        assert [p.gold_answer for p in ps] == GOLDS
        assert ps[0].problem_id == f"w_{key}-0"


def test_json_file_holding_json_lines(tmp_path):
    ps = load_problems(cfg(write_jsonl(tmp_path / "lines.json", ROWS)))
    assert [p.gold_answer for p in ps] == GOLDS


def test_parquet_file_and_folder(tmp_path):
    table = pa.Table.from_pylist([{**r, "answer": str(r["answer"])} for r in ROWS])
    pq.write_table(table, tmp_path / "one.parquet")
    ps = load_problems(cfg(tmp_path / "one.parquet"))
    assert [p.gold_answer for p in ps] == GOLDS
    assert ps[0].problem_id == "one-0"

    folder = tmp_path / "shards"
    folder.mkdir()
    pq.write_table(table.slice(3), folder / "part-1.parquet")  # read in sorted order: part-0 first
    pq.write_table(table.slice(0, 3), folder / "part-0.parquet")
    ps = load_problems(cfg(folder))
    assert [p.gold_answer for p in ps] == GOLDS
    assert [p.problem_id for p in ps] == [f"shards-{i}" for i in range(5)]


def test_parquet_numeric_answer_column(tmp_path):
    pq.write_table(pa.table({"question": ["q1", "q2"], "answer": [3, -4]}), tmp_path / "n.parquet")
    assert [p.gold_answer for p in load_problems(cfg(tmp_path / "n.parquet"))] == ["3", "-4"]


@pytest.mark.parametrize("split, n", [("train", 7473), ("test", 1319)])
def test_embedded_gsm8k(split, n):
    ps = load_problems(DataConfig(path=f"embedded:gsm8k/{split}", limit=None))
    assert len(ps) == n
    assert all(p.ok for p in ps)
    assert ps[0].problem_id == f"gsm8k-{split}-0"
    assert all(p.gold_answer.lstrip("-").replace(".", "").isdigit() for p in ps)
    assert len({p.problem_id for p in ps}) == n


def test_embedded_default_config_and_first_train_row():
    ps = load_problems(DataConfig())  # defaults: embedded:gsm8k/test, limit 16
    assert len(ps) == 16
    first = load_problems(DataConfig(path="embedded:gsm8k/train", limit=1))[0]
    assert first.gold_answer == "72" and first.question.startswith("Natalia sold clips")


def test_field_names_and_id_field(tmp_path):
    rows = [{"problem": r["question"], "solution": r["answer"], "uid": r["uid"]} for r in ROWS]
    path = write_jsonl(tmp_path / "f.jsonl", rows)
    ps = load_problems(cfg(path, question_field="problem", answer_field="solution", id_field="uid"))
    assert [p.problem_id for p in ps] == ["a", "b", "c", "d", "e"]
    assert [p.gold_answer for p in ps] == GOLDS


def test_numeric_ids_are_stringified(tmp_path):
    path = write_jsonl(
        tmp_path / "n.jsonl", [{"question": "q", "answer": "1", "id": 10 + i} for i in range(3)]
    )
    assert [p.problem_id for p in load_problems(cfg(path, id_field="id"))] == ["10", "11", "12"]


# ---- slices and id stability ---------------------------------------------------------------------


def test_offset_and_limit_keep_ids(tmp_path):
    path = write_jsonl(tmp_path / "toy.jsonl", ROWS)
    full = load_problems(cfg(path))
    assert load_problems(cfg(path, offset=1, limit=2)) == full[1:3]
    assert load_problems(cfg(path, limit=2)) == full[:2]
    assert load_problems(cfg(path, offset=3)) == full[3:]
    assert load_problems(cfg(path, offset=4, limit=10)) == full[4:]
    assert load_problems(cfg(path, offset=99)) == []
    assert load_problems(cfg(path)) == full  # same ids on every run


def test_embedded_slice_ids():
    ps = load_problems(DataConfig(path="embedded:gsm8k/test", offset=100, limit=3))
    assert [p.problem_id for p in ps] == ["gsm8k-test-100", "gsm8k-test-101", "gsm8k-test-102"]


# ---- bad rows ------------------------------------------------------------------------------------


def test_bad_rows_become_error_problems(tmp_path):
    lines = [
        json.dumps({"question": "ok 1", "answer": "#### 1"}),  # 0
        '{"question": "broken", "answer": ',  # 1 malformed JSON
        json.dumps({"answer": "#### 2"}),  # 2 missing question
        json.dumps({"question": "   ", "answer": "#### 3"}),  # 3 empty question
        json.dumps({"question": "no answer"}),  # 4 missing answer
        json.dumps({"question": "bad gold", "answer": "a long solution\nwith no final answer"}),  # 5
        json.dumps([1, 2]),  # 6 not an object
        "",  # 7 blank: skipped, but the line still counts
        json.dumps({"question": 12, "answer": "1"}),  # 8 question not text
        json.dumps({"question": "ok 2", "answer": "#### 9"}),  # 9
    ]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    ps = {p.problem_id: p for p in load_problems(cfg(path))}
    assert list(ps) == [f"bad-{i}" for i in (0, 1, 2, 3, 4, 5, 6, 8, 9)]
    assert ps["bad-0"] == Problem("bad-0", "ok 1", "1")
    assert ps["bad-9"] == Problem("bad-9", "ok 2", "9")
    assert "malformed JSON" in ps["bad-1"].error and ps["bad-1"].question is None
    assert ps["bad-2"].error == "bad question in data.question_field='question': missing (null or absent)"
    assert ps["bad-3"].error == "bad question in data.question_field='question': empty text"
    assert ps["bad-4"].error == "bad gold answer in data.answer_field='answer': missing (null or absent)"
    assert ps["bad-4"].question == "no answer"
    assert ps["bad-5"].error.startswith("bad gold answer in data.answer_field='answer': no final answer")
    assert "not an object" in ps["bad-6"].error
    assert "not text" in ps["bad-8"].error
    assert sum(p.ok for p in ps.values()) == 2


def test_bad_rows_in_json_array(tmp_path):
    path = tmp_path / "a.json"
    path.write_text(json.dumps([{"question": "q", "answer": "1"}, "oops", {"question": "q2"}]))
    ps = load_problems(cfg(path))
    assert [p.ok for p in ps] == [True, False, False]
    assert ps[2].error == "bad gold answer in data.answer_field='answer': missing (null or absent)"


def test_duplicate_ids_later_ones_are_errors(tmp_path):
    rows = [
        {"question": "q0", "answer": "1", "id": "x"},
        {"question": "q1", "answer": "2", "id": "y"},
        {"question": "q2", "answer": "3", "id": "x"},
        {"question": "q3", "answer": "4"},
    ]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    ps = load_problems(cfg(path, id_field="id"))
    assert [p.ok for p in ps] == [True, True, False, False]
    assert ps[0].problem_id == "x"
    assert "duplicate id in data.id_field='id': 'x' (first at row 0)" == ps[2].error
    assert ps[3].error == "bad id in data.id_field='id': missing (null or absent)"
    assert len({p.problem_id for p in ps}) == 4  # ids stay unique: fallbacks for the bad ones
    assert [p.problem_id for p in ps[2:]] == ["!d-2", "!d-3"]  # in the reserved `!` namespace
    # judged over the whole source: the duplicate is an error even when the first is sliced away
    assert load_problems(cfg(path, id_field="id", offset=2, limit=1)) == [ps[2]]


# ---- fatal errors --------------------------------------------------------------------------------


def test_missing_field_everywhere_names_the_key(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", ROWS)
    for kw, key in (
        ({"question_field": "problem"}, "data.question_field"),
        ({"answer_field": "solution"}, "data.answer_field"),
        ({"id_field": "idx"}, "data.id_field"),
    ):
        with pytest.raises(DataError) as e:
            load_problems(cfg(path, **kw))
        assert key in str(e.value) and "'question'" in str(e.value) and "'answer'" in str(e.value)


def test_parquet_missing_column(tmp_path):
    pq.write_table(pa.table({"problem": ["q"], "answer": ["1"]}), tmp_path / "p.parquet")
    with pytest.raises(DataError, match=r"data.question_field='question'.*'problem'"):
        load_problems(cfg(tmp_path / "p.parquet"))


@pytest.mark.parametrize(
    "path, match",
    [
        ("/no/such/file.jsonl", "no such file"),
        ("./missing.parquet", "no such file"),
        ("embedded:gsm8k/dev", "unknown embedded dataset.*embedded:gsm8k/test"),
    ],
)
def test_fatal_sources(path, match):
    with pytest.raises(DataError, match=match):
        load_problems(cfg(path))
    with pytest.raises(DataError, match=match):
        check_data_source(cfg(path))


def test_fatal_files(tmp_path):
    (tmp_path / "t.csv").write_text("question,answer\nq,1\n")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    (tmp_path / "junk.jsonl").write_text("not json\nnor this\n")
    (tmp_path / "bad.json").write_text("{ nope")
    (tmp_path / "obj.json").write_text(json.dumps({"items": []}))
    (tmp_path / "scalar.json").write_text("5")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    (tmp_path / "emptydir").mkdir()
    cases = {
        "t.csv": "unknown format '.csv'",
        "empty.jsonl": "no rows",
        "junk.jsonl": "no line is valid JSON",
        "bad.json": "not valid JSON",
        "obj.json": "'data' or 'rows'",
        "scalar.json": "expected a JSON array",
        "broken.parquet": "cannot read Parquet",
        "emptydir": "found none",
    }
    for name, match in cases.items():
        with pytest.raises(DataError, match=match) as e:
            load_problems(cfg(tmp_path / name))
        assert "data.path=" in str(e.value), name


def test_unreadable_file(tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "locked.jsonl", ROWS)

    def denied(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", denied)  # chmod 000 does not stop root
    with pytest.raises(DataError, match=r"data.path=.*locked.jsonl.*cannot read it \(Permission denied\)"):
        check_data_source(cfg(path))


def test_check_data_source_ok(tmp_path):
    assert check_data_source(cfg(write_jsonl(tmp_path / "ok.jsonl", ROWS))) is None
    assert check_data_source(DataConfig()) is None


# ---- Hugging Face names --------------------------------------------------------------------------


def test_hf_name_without_datasets_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails as if not installed
    with pytest.raises(DataError, match=r"data.path='someone/math'.*`datasets` package"):
        load_problems(cfg("someone/math"))


def test_hf_name_load_failure_and_success(monkeypatch):
    calls = []

    class FakeDataset(list):
        column_names = ["question", "answer"]

    def load_dataset(name, split):
        calls.append((name, split))
        if name == "offline/ds":
            raise ConnectionError("no network")
        return FakeDataset([{"question": "q", "answer": "#### 4"}, {"question": "r", "answer": "5"}])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    with pytest.raises(DataError, match=r"data.path='offline/ds', data.split='test'.*ConnectionError"):
        load_problems(cfg("offline/ds"))
    ps = load_problems(cfg("openai/gsm8k", split="train", limit=1, offset=1))
    assert ps == [Problem("gsm8k-train-1", "r", "5")]
    assert calls[-1] == ("openai/gsm8k", "train")


# ---- prompts -------------------------------------------------------------------------------------


def test_data_error_is_input_error():
    assert issubclass(DataError, InputError) and issubclass(DataError, ValueError)


def test_render_and_chat_messages():
    prompt = PromptConfig(system=None, instruction="Solve: {question}\nUse \\boxed{}.")
    q = "What is {x} if x = 2?"  # braces in the question are left alone
    assert render_user_message(prompt, q) == "Solve: What is {x} if x = 2?\nUse \\boxed{}."
    assert chat_messages(prompt, q) == [{"role": "user", "content": render_user_message(prompt, q)}]
    with_system = PromptConfig(system="You are careful.", instruction="{question}")
    assert chat_messages(with_system, "1+1?") == [
        {"role": "system", "content": "You are careful."},
        {"role": "user", "content": "1+1?"},
    ]
    assert "Natalia" in render_user_message(PromptConfig(), "Natalia ...")


def test_hf_dataset_object_from_the_real_library(monkeypatch):
    """A real `datasets.Dataset` (as load_dataset returns offline from the cache) maps fields and ids."""
    datasets = pytest.importorskip("datasets")
    rows = [{"problem": "1+1?", "solution": "\\boxed{2}"}, {"problem": "2+2?", "solution": "#### 4"}]
    calls = []

    def load_dataset(name, split):
        calls.append((name, split))
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    cfg = DataConfig(
        path="org/math", split="train", question_field="problem", answer_field="solution", limit=None
    )
    problems = load_problems(cfg)
    assert calls == [("org/math", "train")]
    assert [(p.problem_id, p.gold_answer) for p in problems] == [("math-train-0", "2"), ("math-train-1", "4")]
