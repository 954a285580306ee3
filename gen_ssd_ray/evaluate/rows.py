"""Evaluation rows: the typed prediction row, its statuses, its Parquet schema, and the summary.

One row per problem x sample (`PredictionRow`, `PREDICTION_SCHEMA`). `status` is

- `completed`: the sample ended normally (vLLM finish_reason "stop": EOS or a stop string);
- `truncated`: it hit `sampling.max_new_tokens` or the model length (finish_reason "length");
- `failed`: generation did not end normally: any other finish reason ("abort", None, anything a
  backend invents) or a sample the engine never returned (fewer than `sampling.n`). The reason is in
  `error`. A failed sample is the model's run failing, so it counts in the accuracy denominator (as
  not correct), unlike
- `error`: the problem could not be asked (the reason in `error`: a bad data row, a prompt that does
  not fit `model.max_model_len` with the response budget, a prompt the engine rejected or could not
  be rendered). Error rows are counted apart, never as wrong.

Only completed samples get a `final_answer` and a verdict; `correct` is null ("unverified") for the
others and where no answer could be checked.

Every string reaches Parquet through `rows_table`, which escapes text that UTF-8 cannot encode (a lone
surrogate such as "\\ud800" from JSON, as the 6 characters ``\\ud800``), so no row can crash the
writer.

Pure, apart from `write_predictions`: no engine, no Ray.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypedDict

import pyarrow as pa

from gen_ssd_ray.common.data import Problem
from gen_ssd_ray.common.fsio import atomic_writer
from gen_ssd_ray.common.prompts import RenderedPrompt
from gen_ssd_ray.core.answers import extract_final_answer

COMPLETED, TRUNCATED, FAILED, ERROR = "completed", "truncated", "failed", "error"
STATUSES = (COMPLETED, TRUNCATED, FAILED, ERROR)
# vLLM finish reasons of a normal end; every other one (and None) makes the sample FAILED.
NORMAL_ENDS = {"stop": COMPLETED, "length": TRUNCATED}


class PredictionRow(TypedDict):
    problem_id: str
    sample_index: int
    question: str | None
    gold_answer: str | None
    prompt: str | None  # the rendered chat prompt
    response: str | None
    final_answer: str | None  # completed samples only
    correct: bool | None  # null: unverified
    status: str  # one of STATUSES
    error: str | None  # the reason; null unless status is FAILED or ERROR
    num_response_tokens: int
    model: str  # model.model as configured
    seed: int  # the request seed of the problem


PREDICTION_SCHEMA: pa.Schema = pa.schema(
    [
        pa.field("problem_id", pa.string(), nullable=False),
        pa.field("sample_index", pa.int32(), nullable=False),
        pa.field("question", pa.string()),
        pa.field("gold_answer", pa.string()),
        pa.field("prompt", pa.string()),  # the rendered chat prompt
        pa.field("response", pa.string()),
        pa.field("final_answer", pa.string()),  # completed samples only
        pa.field("correct", pa.bool_()),  # null: unverified
        pa.field("status", pa.string(), nullable=False),  # completed | truncated | failed | error
        pa.field("error", pa.string()),  # the reason; null unless status is "failed" or "error"
        pa.field("num_response_tokens", pa.int32()),
        pa.field("model", pa.string()),  # model.model as configured
        pa.field("seed", pa.int64()),  # the request seed of the problem
    ]
)


def problem_seed(base: int, problem_id: str) -> int:
    """The request seed of a problem: results do not depend on batching, engine count or order."""
    # surrogatepass: an id that is not valid UTF-8 (a lone surrogate) still has a seed, the same as
    # plain .encode() gives for every valid id
    h = hashlib.blake2b(f"{base}/{problem_id}".encode("utf-8", "surrogatepass"), digest_size=4).digest()
    return int.from_bytes(h, "big") & 0x7FFFFFFF


def sample_rows(
    problem: Problem,
    prompt: RenderedPrompt,
    generation: Any | None,
    *,
    n: int,
    model: str,
    seed: int,
) -> list[dict[str, Any]]:
    """The output rows of one problem (without `correct`, which the verifier fills in).

    `generation` is the engine's `Generation` (samples with token ids, text and finish reason, or an
    error); None for a problem that never reached an engine (then `prompt.error` says why). Always
    exactly `n` rows: samples the engine did not return are FAILED rows, extra ones are dropped.
    """
    base = {
        "problem_id": problem.problem_id,
        "question": problem.question,
        "gold_answer": problem.gold_answer,
        "prompt": prompt.text,
        "model": model,
        "seed": seed,
        "correct": None,
    }
    error = prompt.error or (generation.error if generation is not None else "not generated")
    if error is not None or generation is None:
        failed = {"response": None, "final_answer": None, "status": "error", "error": error}
        return [{**base, "sample_index": i, **failed, "num_response_tokens": 0} for i in range(n)]
    samples = tuple(generation.samples)
    rows = [{**base, "sample_index": i, **_sample_fields(s)} for i, s in enumerate(samples[:n])]
    missing = {
        "response": None,
        "final_answer": None,
        "status": FAILED,
        "error": f"the engine returned {len(samples)} of sampling.n={n} samples (counted as not correct)",
        "num_response_tokens": 0,
    }
    return rows + [{**base, "sample_index": i, **missing} for i in range(len(rows), n)]


def _sample_fields(sample: Any) -> dict[str, Any]:
    status = NORMAL_ENDS.get(sample.finish_reason, FAILED)
    return {
        "response": sample.text,
        "final_answer": extract_final_answer(sample.text) if status == COMPLETED else None,
        "status": status,
        "error": None
        if status != FAILED
        else f"generation ended with finish_reason={sample.finish_reason!r}, not a normal end (counted as "
        "not correct)",
        "num_response_tokens": len(sample.token_ids),
    }


def summarize(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy and counts over prediction rows.

    accuracy: mean over problems with at least one non-error sample of (correct samples / non-error
    samples); error rows are counted apart, never as wrong; failed samples (generation did not end
    normally) are in the denominator and never correct. failed: how many. unverified: non-error
    samples whose `correct` is null (truncated, failed, no answer, or math-verify could not check it).
    """
    by_problem: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_problem.setdefault(r["problem_id"], []).append(r)
    fractions = []
    for samples in by_problem.values():
        scored = [r for r in samples if r["status"] != "error"]
        if scored:
            fractions.append(sum(r.get("correct") is True for r in scored) / len(scored))
    scored_rows = [r for r in rows if r["status"] != "error"]
    tokens = sum(r["num_response_tokens"] or 0 for r in scored_rows)
    statuses = Counter(r["status"] for r in rows)
    return {
        "accuracy": round(sum(fractions) / len(fractions), 6) if fractions else None,
        "problems": len(by_problem),
        "problems_scored": len(fractions),
        "problems_error": len(by_problem) - len(fractions),
        "samples": len(rows),
        "samples_by_status": {s: statuses.get(s, 0) for s in STATUSES},
        "failed": statuses.get(FAILED, 0),
        "correct": sum(r.get("correct") is True for r in scored_rows),
        "incorrect": sum(r.get("correct") is False for r in scored_rows),
        "unverified": sum(r.get("correct") is None for r in scored_rows),
        "mean_response_tokens": round(tokens / len(scored_rows), 2) if scored_rows else None,
        "generated_tokens": tokens,
    }


def encodable(value: Any) -> Any:
    """`value`, or for a string UTF-8 cannot encode (lone surrogates), the string with those characters
    escaped as backslash sequences (\\ud800 -> the 6 characters ``\\ud800``); other values unchanged."""
    if not isinstance(value, str):
        return value
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    return value


def rows_table(rows: Sequence[dict[str, Any]], metadata: dict[str, str] | None = None) -> pa.Table:
    """The rows as a table of exactly `PREDICTION_SCHEMA`; never raises on a row's values.

    Strings are made encodable (`encodable`). A row that still does not convert (a value of the wrong
    type: a list for a question, a float for a sample index, ...) is written as an error row instead
    (`_as_error_row`: its text fields as strings, the reason in `error`), so one bad row never loses
    the others.
    """
    names = PREDICTION_SCHEMA.names
    clean = [{k: encodable(r.get(k)) for k in names} for r in rows]
    clean = [r if (why := _type_problem(r)) is None else _as_error_row(r, why) for r in clean]
    try:
        table = pa.Table.from_pylist(clean, schema=PREDICTION_SCHEMA)
    except (pa.ArrowException, TypeError, ValueError, OverflowError):
        table = pa.Table.from_pylist([_convertible(r) for r in clean], schema=PREDICTION_SCHEMA)
    return table.replace_schema_metadata(metadata) if metadata else table


def _type_problem(row: dict[str, Any]) -> str | None:
    """Why `row` does not fit `PREDICTION_SCHEMA` (a null where a value is needed, a value of the wrong
    type: Arrow would refuse it, or silently truncate a float to an integer), or None."""
    for f in PREDICTION_SCHEMA:
        v = row.get(f.name)
        if v is None:
            if not f.nullable:
                return f"{f.name} is null"
            continue
        if pa.types.is_string(f.type):
            ok = isinstance(v, str)
        elif pa.types.is_integer(f.type):
            ok = isinstance(v, int) and not isinstance(v, bool)
        else:  # correct
            ok = isinstance(v, bool)
        if not ok:
            return f"{f.name} is a {type(v).__name__}: {v!r:.60}"
    if row.get("status") not in STATUSES:
        return f"status {row.get('status')!r:.60} is not one of {STATUSES}"
    return None


def _convertible(row: dict[str, Any]) -> dict[str, Any]:
    try:
        pa.Table.from_pylist([row], schema=PREDICTION_SCHEMA)
    except (pa.ArrowException, TypeError, ValueError, OverflowError) as e:
        return _as_error_row(row, f"{type(e).__name__}: {e}")
    return row


def _as_error_row(row: dict[str, Any], why: str) -> dict[str, Any]:
    """A row that the schema refused, as an error row: text as strings, numbers that are not whole
    numbers as null (0 where the schema needs a value), `correct` null."""

    def text(v: Any) -> str | None:
        return None if v is None else encodable(v if isinstance(v, str) else repr(v))

    def whole(v: Any) -> int | None:
        return v if isinstance(v, int) and not isinstance(v, bool) and -(2**31) <= v < 2**31 else None

    return {
        **{f.name: text(row.get(f.name)) for f in PREDICTION_SCHEMA if pa.types.is_string(f.type)},
        "problem_id": text(row.get("problem_id")) or "(no problem_id)",
        "sample_index": whole(row.get("sample_index")) or 0,
        "num_response_tokens": whole(row.get("num_response_tokens")),
        "seed": whole(row.get("seed")),
        "correct": None,
        "status": ERROR,
        "error": encodable(f"the row could not be written as it was ({why})"[:1000]),
    }


def write_predictions(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """The rows as Parquet with exactly `PREDICTION_SCHEMA`, written atomically."""
    import pyarrow.parquet as pq

    table = rows_table(rows)
    with atomic_writer(path) as fh:
        pq.write_table(table, fh)
