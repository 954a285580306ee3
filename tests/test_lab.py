"""The lab task (gen_ssd_ray.lab): problem generator, splits, SFT rows, tokenizer, models, embedded data."""

from __future__ import annotations

import json
import random
import re

import pytest

from gen_ssd_ray.common.config import DataConfig, PromptConfig
from gen_ssd_ray.common.data import load_problems
from gen_ssd_ray.common.prompts import chat_messages
from gen_ssd_ray.core.answers import extract_final_answer, extract_gold_answer
from gen_ssd_ray.lab.problems import (
    STYLES,
    Difficulty,
    classify_style,
    generate_split,
    lab_sft_rows,
    make_problem,
    split_of,
    write_jsonl,
    write_lab_sft_jsonl,
)

_EQUATION = re.compile(r"^(?:check: |not needed: )?(\d+) ([-+x/]) (\d+) = (\d+)$")
_MERGED = re.compile(r"^\( (\d+) ([-+x/]) (\d+) \) ([-+x/]) (\d+) = (\d+)$")
_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "x": lambda a, b: a * b, "/": lambda a, b: a / b}
_TEXT_FIELDS = ("question", "answer", *(f"solution_{s}" for s in STYLES))


@pytest.fixture(scope="module")
def train():
    return generate_split("train", 400, seed=0)


@pytest.fixture(scope="module")
def test_rows():
    return generate_split("test", 100, seed=0)


@pytest.fixture(scope="module")
def lab_tokenizer(tmp_path_factory):
    from gen_ssd_ray.lab.tokenizer import save_lab_tokenizer

    return save_lab_tokenizer(tmp_path_factory.mktemp("lab") / "tokenizer")


def _check_arithmetic(solution: str) -> list[tuple[int, str, int, int]]:
    """Every line but the last is a correct equation; returns them."""
    *lines, final = solution.split("\n")
    equations = []
    for line in lines:
        if m := _EQUATION.match(line):
            a, op, b, c = int(m[1]), m[2], int(m[3]), int(m[4])
            assert _OPS[op](a, b) == c, f"wrong arithmetic: {line!r}"
            equations.append((a, op, b, c))
        elif m := _MERGED.match(line):  # shortcut style: ( a op b ) op2 d = c
            a, op, b, op2, d, c = int(m[1]), m[2], int(m[3]), m[4], int(m[5]), int(m[6])
            middle = _OPS[op](a, b)
            assert middle == int(middle) and _OPS[op2](int(middle), d) == c, f"wrong arithmetic: {line!r}"
            equations.append((int(middle), op2, d, c))
        else:
            assert line.startswith(("check: ", "not needed: ")) or not re.search(r"\d+ [-+x/] \d+ =", line), (
                line
            )
    assert re.fullmatch(r"#### \d+", final), final
    return equations


# ---- generator -----------------------------------------------------------------------------------


def test_rows_have_fields_and_ids(train):
    row = train[0]
    assert set(row) == {"id", "question", "answer", "gold", *(f"solution_{s}" for s in STYLES)}
    assert [r["id"] for r in train[:3]] == ["lab-train-0", "lab-train-1", "lab-train-2"]
    assert all(r["answer"] == r["solution_concise"] for r in train)


def test_deterministic_and_prefix_stable(train):
    assert generate_split("train", 400, seed=0) == train
    assert generate_split("train", 50, seed=0) == train[:50]
    assert generate_split("train", 50, seed=1) != train[:50]


def test_splits_disjoint_and_unique(train, test_rows):
    train_q = [r["question"] for r in train]
    test_q = [r["question"] for r in test_rows]
    assert len(set(train_q)) == len(train_q) and len(set(test_q)) == len(test_q)
    assert not set(train_q) & set(test_q)
    assert not set(train_q) & {r["question"] for r in generate_split("test", 100, seed=7)}
    assert {split_of(q) for q in train_q} == {"train"} and {split_of(q) for q in test_q} == {"test"}


def test_solutions_correct_and_answers_match(train, test_rows):
    d = Difficulty()
    for row in [*train, *test_rows]:
        gold = row["gold"]
        for style in STYLES:
            solution = row[f"solution_{style}"]
            equations = _check_arithmetic(solution)
            assert equations, solution
            assert solution.endswith(f"\n#### {gold}")
            assert extract_gold_answer(solution) == gold
            assert extract_final_answer(solution) == gold
            for a, op, b, c in equations:
                assert 0 <= c <= d.max_result and 0 <= a <= d.max_result
                if op == "+" or op == "-":
                    assert b <= d.max_operand
        concise = _check_arithmetic(row["solution_concise"])
        assert concise[-1][3] == int(gold)
        assert all(concise[i][3] == concise[i + 1][0] for i in range(len(concise) - 1))  # chained
        assert d.min_steps <= len(concise) <= d.max_steps
        assert extract_gold_answer(row["answer"]) == gold


def test_question_numbers_are_small(train):
    d = Difficulty()
    for row in train:
        assert all(1 <= int(n) <= d.max_operand for n in re.findall(r"\d+", row["question"]))


def test_styles_differ(train):
    for row in train:
        assert len({row[f"solution_{s}"] for s in STYLES}) == len(STYLES)
    details = [row["solution_detour"] for row in train]
    assert any("check: " in s for s in details) and any("not needed: " in s for s in details)
    assert all(len(r["solution_verbose"]) > len(r["solution_concise"]) for r in train)
    # the shortcut writes one line fewer than concise and never the first intermediate result
    for r in train:
        concise, shortcut = r["solution_concise"].split("\n"), r["solution_shortcut"].split("\n")
        assert len(shortcut) == len(concise) - 1 and shortcut[0].startswith("( ")
        assert shortcut[1:] == concise[2:]


def test_classify_style_recovers_every_gold_style(train):
    for row in train:
        assert {s: classify_style(row[f"solution_{s}"]) for s in STYLES} == {s: s for s in STYLES}


def test_difficulty_bounds_and_validation():
    d = Difficulty(min_steps=2, max_steps=2, max_operand=9, max_factor=3, max_result=99, ops=("+", "-", "x"))
    rng = random.Random(0)
    for _ in range(300):
        p = make_problem(rng, d)
        assert len(p.steps) == 2
        assert all(s.op in d.ops and 1 <= s.result <= 99 for s in p.steps)
    with pytest.raises(ValueError, match="min_steps"):
        Difficulty(min_steps=3, max_steps=2)
    with pytest.raises(ValueError, match="unknown ops"):
        Difficulty(ops=("+", "^"))
    with pytest.raises(ValueError, match="unknown split"):
        generate_split("dev", 1, 0)


def test_sft_rows_and_jsonl(tmp_path):
    rows = list(lab_sft_rows("train", 3, 0, ("concise", "detour")))
    problems = generate_split("train", 3, 0)
    assert [r["style"] for r in rows] == ["concise", "detour"] * 3
    assert rows[1] == {
        "question": problems[0]["question"],
        "response": problems[0]["solution_detour"],
        "style": "detour",
    }
    path = write_lab_sft_jsonl(tmp_path / "sft" / "lab.jsonl", "train", 3, 0, STYLES)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(lines) == 3 * len(STYLES) and lines[0]["style"] == "concise"
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".tmp")]
    with pytest.raises(ValueError, match="styles"):
        list(lab_sft_rows("train", 1, 0, ("fancy",)))
    write_jsonl(tmp_path / "x.jsonl", problems)
    assert json.loads((tmp_path / "x.jsonl").read_text().splitlines()[2]) == problems[2]


# ---- embedded datasets ---------------------------------------------------------------------------


def test_embedded_lab_datasets(tmp_path, monkeypatch):
    monkeypatch.setenv("GEN_SSD_CACHE", str(tmp_path))
    ps = load_problems(DataConfig(path="embedded:lab/test", limit=None))
    assert len(ps) == 500 and all(p.ok for p in ps)
    assert [p.problem_id for p in ps[:2]] == ["lab-test-0", "lab-test-1"]
    expected = generate_split("test", 500, 0)
    assert [p.question for p in ps] == [r["question"] for r in expected]
    assert [p.gold_answer for p in ps] == [r["gold"] for r in expected]
    files = list((tmp_path / "data").iterdir())
    assert len(files) == 1 and files[0].name.startswith("lab-test-n500-seed0")
    # second use reads the file; a slice keeps its ids
    assert load_problems(DataConfig(path="embedded:lab/test", offset=5, limit=2)) == ps[5:7]
    train = load_problems(DataConfig(path="embedded:lab/train", limit=3))
    assert [p.problem_id for p in train] == ["lab-train-0", "lab-train-1", "lab-train-2"]
    assert not {p.question for p in ps} & {r["question"] for r in generate_split("train", 2000, 0)}


# ---- tokenizer -----------------------------------------------------------------------------------


def test_vocabulary_is_small():
    from gen_ssd_ray.lab.tokenizer import SPECIAL_TOKENS, vocabulary

    vocab = vocabulary()
    assert 100 < len(vocab) < 400
    assert vocab[: len(SPECIAL_TOKENS)] == list(SPECIAL_TOKENS)
    assert len(set(vocab)) == len(vocab)


def test_tokenizer_round_trip_and_autotokenizer_agree(lab_tokenizer, train, test_rows):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(lab_tokenizer)
    raw = Tokenizer.from_file(str(lab_tokenizer / "tokenizer.json"))
    unk = hf.unk_token_id
    for row in [*train, *test_rows]:
        for field in _TEXT_FIELDS:
            text = row[field]
            ids = hf(text)["input_ids"]
            assert ids == raw.encode(text).ids
            assert unk not in ids, text
            assert hf.decode(ids) == text
            assert raw.decode(ids) == text
    digits = hf.convert_ids_to_tokens(hf("123 + 45 = 168")["input_ids"])
    assert digits == [
        "1",
        "2",
        "3",
        " +",
        " 4",
        "5",
        " =",
        " 1",
        "6",
        "8",
    ]  # numbers are written digit by digit


def test_chat_template_renders_and_round_trips(lab_tokenizer, train):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(lab_tokenizer)
    question = train[0]["question"]
    prompt = PromptConfig()
    for system in (None, "Solve the problem step by step."):
        messages = chat_messages(PromptConfig(system=system, instruction=prompt.instruction), question)
        text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert text.startswith("<|im_start|>system\n" if system else "<|im_start|>user\nSolve")
        assert text.endswith(f"{question}<|im_end|>\n<|im_start|>assistant\n")
        ids = hf(text)["input_ids"]
        assert hf.unk_token_id not in ids
        assert hf.decode(ids) == text
        assert ids[-3:] == hf.convert_tokens_to_ids(["<|im_start|>", "assistant", "\n"])
        assert hf.convert_tokens_to_ids("<|im_end|>") in ids
    full = hf.apply_chat_template(
        [*messages, {"role": "assistant", "content": train[0]["solution_verbose"]}], tokenize=False
    )
    assert full.endswith(train[0]["solution_verbose"] + "<|im_end|>\n")
    assert hf.decode(hf(full)["input_ids"]) == full
    no_prompt = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert not no_prompt.endswith("assistant\n")


def test_special_tokens_and_unknown_text(lab_tokenizer):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(lab_tokenizer)
    assert hf.eos_token == "<|im_end|>" and hf.pad_token == hf.bos_token == "<|endoftext|>"
    assert hf.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]) == [0, 1, 2, 3]
    assert hf("5 apples")["input_ids"] == hf("5 apples", add_special_tokens=True)["input_ids"]  # no bos
    ids = hf("Zebra café costs €5,\ttoday!")["input_ids"]  # outside the vocabulary: unk, no crash
    assert hf.unk_token_id in ids
    assert isinstance(hf.decode(ids), str)
    assert json.loads((lab_tokenizer / "tokenizer_config.json").read_text())["eos_token"] == "<|im_end|>"


def test_materialize_tokenizer_is_cached(tmp_path):
    from gen_ssd_ray.lab.tokenizer import materialize_lab_tokenizer

    folder = materialize_lab_tokenizer(tmp_path)
    assert folder == tmp_path / "models" / "lab-tokenizer"
    assert (folder / "tokenizer.json").is_file() and (folder / ".complete").is_file()
    mtime = (folder / "tokenizer.json").stat().st_mtime_ns
    assert materialize_lab_tokenizer(tmp_path) == folder
    assert (folder / "tokenizer.json").stat().st_mtime_ns == mtime


# ---- models --------------------------------------------------------------------------------------


def test_build_lab_model(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gen_ssd_ray.lab.models import LAB_MODEL_SIZES, build_lab_model

    folder = build_lab_model(tmp_path / "student", size="student", seed=0, tokenizer_root=tmp_path)
    config = json.loads((folder / "config.json").read_text())
    size = LAB_MODEL_SIZES["student"]
    assert config["num_hidden_layers"] == size.num_layers and config["hidden_size"] == size.hidden_size
    assert config["head_dim"] >= 32 and config["max_position_embeddings"] == 512
    assert all(s.hidden_size // s.num_heads >= 32 for s in LAB_MODEL_SIZES.values())
    tok = AutoTokenizer.from_pretrained(folder)
    assert config["vocab_size"] == len(tok) and config["eos_token_id"] == tok.eos_token_id
    model = AutoModelForCausalLM.from_pretrained(folder)
    ids = torch.tensor([tok("3 + 4 = 7")["input_ids"]])
    assert model(input_ids=ids).logits.shape == (1, ids.shape[1], len(tok))
    again = build_lab_model(tmp_path / "again", size="student", seed=0, tokenizer_root=tmp_path)
    assert (again / "model.safetensors").read_bytes() == (folder / "model.safetensors").read_bytes()
    with pytest.raises(ValueError, match="unknown lab model size"):
        build_lab_model(tmp_path / "x", size="huge", seed=0)
