"""Decontamination (gen_ssd_ray.common.decontam): normalization, n-gram overlap with the closest
evaluation problem, the threshold, exact duplicates; the config; the generation hook (open_problems,
prepare, the summary) and the fine-tuning hook (train/data.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gen_ssd_ray.common import decontam
from gen_ssd_ray.common.config import ConfigError, DatasetRef, DecontamConfig, load_config
from gen_ssd_ray.common.decontam import EvalIndex, ngrams, words

# A real pair of the shipped data: GSM8K train 1314 and test 602, the same problem with other numbers.
TRAIN_PARAPHRASE = (
    "A train travels 360 miles in 3 hours. At the same rate, how many additional hours would it take to "
    "travel an additional 240 miles?"
)
TEST_PROBLEM = (
    "A plane travels 1200 miles in 3 hours. At the same rate, how many additional hours would it take to "
    "travel an additional 2000 miles?"
)
OTHER_TEST = "Janet's ducks lay 16 eggs per day. She eats three for breakfast every morning."


def write_jsonl(path: Path, questions: list[str]) -> Path:
    path.write_text(
        "".join(json.dumps({"question": q, "answer": f"#### {i}"}) + "\n" for i, q in enumerate(questions))
    )
    return path


def index(*texts: str, n: int = 8) -> EvalIndex:
    return EvalIndex(((f"e{i}", t) for i, t in enumerate(texts)), n)


# ---- the core ------------------------------------------------------------------------------------


def test_words_lowercase_drop_punctuation_keep_numbers():
    assert words("Janet’s  ducks\tlay 16 eggs, at $2.50 <<16-3=13>>!") == [
        "janet",
        "s",
        "ducks",
        "lay",
        "16",
        "eggs",
        "at",
        "2",
        "50",
        "16",
        "3",
        "13",
    ]
    assert words("ＡＢＣ １２") == ["abc", "12"]  # NFKC: full-width letters and digits
    assert words("  ...  ") == []


def test_ngrams_count_short_texts_and_empty():
    ws = [f"w{i}" for i in range(10)]
    assert len(ngrams(ws, 8)) == 3
    assert len(ngrams(ws, 3)) == 8
    assert ngrams(ws[:5], 8) == {hash(" ".join(ws[:5]))}  # shorter than n: the text is one n-gram
    assert ngrams([], 8) == set()


def test_overlap_is_the_fraction_of_the_eval_problems_ngrams():
    ev = " ".join(f"w{i}" for i in range(10))  # 3 8-grams
    idx = index(ev, OTHER_TEST)
    m = idx.match(" ".join(f"w{i}" for i in range(9)) + " other words here")  # 2 of its 3 8-grams
    assert (m.overlap, m.eval_id, m.exact) == (pytest.approx(2 / 3), "e0", False)
    # threshold boundary: dropped only when the overlap exceeds it
    assert not m.contaminated(2 / 3)
    assert m.contaminated(0.66)
    assert idx.match("nothing in common with any of them at all here").overlap == 0.0


def test_exact_duplicate_with_other_case_whitespace_punctuation_is_dropped_at_any_threshold():
    idx = index(TEST_PROBLEM, OTHER_TEST)
    m = idx.match(
        "  a PLANE travels 1200 miles in 3 hours -- at the same rate, how many additional hours\n"
        "would it take to travel an additional 2000 miles"
    )
    assert m.exact and m.eval_id == "e0" and m.overlap == 1.0
    assert m.contaminated(1.0)  # exact duplicates go whatever the threshold
    short = index("What is 2 plus 3?")
    assert short.match("what is 2 PLUS 3").exact  # shorter than n words: still matched exactly


def test_paraphrase_with_changed_numbers_kept_or_dropped_per_threshold():
    m = index(TEST_PROBLEM, OTHER_TEST).match(TRAIN_PARAPHRASE)
    assert not m.exact and m.eval_id == "e0"
    assert m.overlap == pytest.approx(2 / 3)  # 14 of the test problem's 21 8-grams avoid its numbers
    assert m.contaminated(0.5)
    assert not m.contaminated(0.8)


def test_overlap_counts_per_eval_problem_not_against_their_union():
    """Half of one evaluation problem glued to half of another shares most of the union's n-grams but
    less than half of either problem's: template phrasing spread over many problems is no match."""
    a = " ".join(f"a{i}" for i in range(20))
    b = " ".join(f"b{i}" for i in range(20))
    idx = index(a, b)
    glued = " ".join(f"a{i}" for i in range(10)) + " " + " ".join(f"b{i}" for i in range(10))
    m = idx.match(glued)
    assert m.overlap == pytest.approx(3 / 13)
    assert not m.contaminated(0.5)


def test_check_returns_dropped_ids_and_examples():
    idx = index(TEST_PROBLEM, OTHER_TEST)
    cfg = DecontamConfig(against=[DatasetRef(path="x.jsonl")])
    items = [
        ("t0", TRAIN_PARAPHRASE),
        ("t1", "How many legs do 3 spiders have?"),
        ("t2", None),
        ("t3", OTHER_TEST),
    ]
    d = decontam.check(items, cfg, idx)
    assert (d.checked, d.count, d.ids) == (4, 2, frozenset({"t0", "t3"}))
    assert [i for i, _ in d.examples] == ["t0", "t3"] and d.examples[1][1].exact


# ---- config --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("data.decontaminate.threshold=1.5", "data.decontaminate.threshold"),
        ("data.decontaminate.ngram=0", "data.decontaminate.ngram"),
        ("data.decontaminate.against=[{split: test}]", r"data.decontaminate.against\[0\].path"),
        ("data.decontaminate.ngrams=8", "data.decontaminate.ngrams"),
    ],
)
def test_bad_decontamination_config_names_the_key(override, key):
    from gen_ssd_ray.generate.config import GenerateConfig

    with pytest.raises(ConfigError, match=key):
        load_config(None, [override], GenerateConfig)


def test_finetune_config_checks_it_too_and_keeps_its_pinned_fingerprint():
    from gen_ssd_ray.train.config import FinetuneConfig, train_fingerprint

    with pytest.raises(ConfigError, match="data.decontaminate.threshold"):
        load_config(None, ["data.decontaminate.threshold=-0.1"], FinetuneConfig)
    plain = load_config(None, [], FinetuneConfig)
    on = load_config(None, ["data.decontaminate.against=[{path: embedded:gsm8k/test}]"], FinetuneConfig)
    # what it drops changes the data signature; the setting itself does not change the fingerprint
    assert train_fingerprint(plain, "rev-m", "rows-sig") == train_fingerprint(on, "rev-m", "rows-sig")
    assert train_fingerprint(plain, "rev-m", "rows-sig") == "cb697050bfae9ab8"  # tests/test_fingerprints.py


# ---- generation: open_problems, prepare, summary -------------------------------------------------


@pytest.fixture
def sources(tmp_path):
    ev = write_jsonl(tmp_path / "eval.jsonl", [TEST_PROBLEM, OTHER_TEST])
    train = write_jsonl(
        tmp_path / "train.jsonl",
        [
            "How many legs do 3 spiders have?",
            TRAIN_PARAPHRASE,
            "Tom has 3 apples and buys 4 more. How many apples does he have?",
            OTHER_TEST.upper(),
            "A farmer has 12 cows and sells 5. How many cows are left?",
        ],
    )
    return train, ev


def test_open_problems_drops_and_counts_contaminated_problems(sources):
    from gen_ssd_ray.common.config import DataConfig
    from gen_ssd_ray.common.data import load_problems, open_problems

    train, ev = sources
    against = DecontamConfig(against=[DatasetRef(path=str(ev))])
    stream = open_problems(DataConfig(path=str(train), limit=None, decontaminate=against))
    assert (stream.count, stream.dropped_contaminated) == (3, 2)
    assert [p.problem_id for p in stream] == ["train-0", "train-2", "train-4"]
    # the slice is picked first: rows 1..3 hold both contaminated problems
    sliced = load_problems(DataConfig(path=str(train), offset=1, limit=3, decontaminate=against))
    assert [p.problem_id for p in sliced] == ["train-2"]
    off = DecontamConfig(enabled=False, against=[DatasetRef(path=str(ev))])
    assert open_problems(DataConfig(path=str(train), limit=None, decontaminate=off)).count == 5
    with pytest.raises(Exception, match=r"data.decontaminate.against\[0\]"):
        missing = DecontamConfig(against=[DatasetRef(path=str(ev) + ".missing")])
        open_problems(DataConfig(path=str(train), limit=None, decontaminate=missing))


def test_generation_prepare_feeds_only_clean_problems_and_counts_them(
    sources, tmp_path, tiny_model, tiny_student
):
    """What `prepare` hands the run (the problems the driver feeds to the beam managers, through the
    driver's own `_uncommitted`) holds no contaminated problem; the summary counts them and
    `format_summary` says so."""
    from gen_ssd_ray.generate.config import GenerateConfig
    from gen_ssd_ray.generate.driver import (
        RunStats,
        _uncommitted,
        format_summary,
        prepare,
    )

    train, ev = sources
    cfg = load_config(
        None,
        [
            f"teacher.model={tiny_model}",
            f"student.model={tiny_student}",
            f"data.path={train}",
            "data.limit=null",
            f"data.decontaminate.against=[{{path: '{ev}'}}]",
            f"output.dir={tmp_path / 'out'}",
            "teacher.max_model_len=512",
            "search.max_new_tokens=24",
        ],
        GenerateConfig,
    )
    p = prepare(cfg)
    try:
        stats = RunStats(total=p.problems.count)
        fed = [q.problem_id for q in _uncommitted(p.problems, p.writer, stats)]
        assert fed == ["train-0", "train-2", "train-4"] and stats.total == 3
        summary = {**stats.summary(cfg.output.dir), **p.counts()}  # what run_generate returns
    finally:
        p.writer.close()
    assert summary["problems_dropped_contaminated"] == 2 and summary["problems_total"] == 3
    assert "2 dropped before generation as overlapping the evaluation set" in format_summary(summary)


# ---- fine-tuning: train/data.py ------------------------------------------------------------------


def test_finetune_rows_overlapping_the_eval_set_are_dropped_and_counted(sources, tmp_path):
    from gen_ssd_ray.train.config import FinetuneConfig
    from gen_ssd_ray.train.data import read_filtered

    _, ev = sources
    rows = tmp_path / "sft.jsonl"
    questions = [TRAIN_PARAPHRASE, TRAIN_PARAPHRASE, "How many legs do 3 spiders have?", OTHER_TEST]
    rows.write_text(
        "".join(json.dumps({"question": q, "answer": f"so #### {i}"}) + "\n" for i, q in enumerate(questions))
    )
    cfg = load_config(
        None,
        [
            f"data.path={rows}",
            "data.response_field=answer",
            "data.filters=[]",
            f"data.decontaminate.against=[{{path: '{ev}'}}]",
        ],
        FinetuneConfig,
    )
    df, steps, read = read_filtered(cfg.data)
    assert read == 4 and list(df["question"]) == ["How many legs do 3 spiders have?"]
    step = steps[-1]
    assert step.expr.startswith(decontam.STEP_PREFIX) and (step.before, step.after) == (4, 1)
    assert str(ev) in step.expr and "8-gram overlap > 0.5" in step.expr
    # every row contaminated: the empty-set error names the step
    only = tmp_path / "only.jsonl"
    only.write_text(json.dumps({"question": OTHER_TEST, "answer": "#### 1"}) + "\n")
    from gen_ssd_ray.common.config import derive
    from gen_ssd_ray.train.data import EmptyTrainingSetError

    with pytest.raises(EmptyTrainingSetError, match="decontaminate"):
        read_filtered(derive(cfg, {"data.path": str(only)}).data)
