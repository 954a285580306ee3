"""One row of the generation job's output: its typed definition, its status values, its Parquet schema.

- `TrajectoryRow` is the typed row (one per trajectory) that the beam managers and the driver build;
  `COMPLETED`, `PRUNED`, `TRUNCATED`, `ERROR` are its statuses (`STATUSES`).
- The conversation, in the form TRL's trainers (and OpenRLHF, verl, LLaMA-Factory) take as is:
  `messages` (the system message if any, the user question, the assistant response), `prompt` (the
  system and user messages) and `completion` (the assistant message), each a list of
  ``{"role", "content"}`` (`MESSAGES_TYPE`); `conversation(prompt_messages, response)` builds the three.
  The teacher's chat template rendered as text is `prompt_text`.
- Folders written before the conversation columns (row layout 1: `prompt` was the rendered text, no
  `messages` / `completion` / `prompt_text`): `is_legacy(schema)` tells such a shard, and
  `upgrade_legacy(table)` reads it as `OUTPUT_SCHEMA` (its text moves to `prompt_text`; the conversation
  columns are null, since the rows do not hold the prompt config that made them).
- `OUTPUT_SCHEMA` is the one definition of the Parquet columns; `rows_to_table` turns rows into a table
  of exactly that schema (a missing key is null; an unknown key, a value of the wrong type, a null
  `problem_id` / `trajectory_index` / `status`, an unknown status or an `error` that does not match
  the status is a `ValueError`).

Knows pyarrow; nothing about files (gen_ssd_ray.generate.output) or engines.
"""

from __future__ import annotations

from typing import Any, TypedDict

import pyarrow as pa

COMPLETED, PRUNED, TRUNCATED, ERROR = "completed", "pruned", "truncated", "error"
STATUSES = (COMPLETED, PRUNED, TRUNCATED, ERROR)


class CandidateRecord(TypedDict):
    text: str
    num_tokens: int
    finish_reason: str
    ppl: float


class MessageRecord(TypedDict):
    role: str  # system | user | assistant
    content: str


class ChunkRow(TypedDict):
    candidates: list[CandidateRecord]
    chosen: int  # -1: no candidate kept (pruned here)


class TrajectoryRow(TypedDict, total=False):
    """One output row; every key is a column of `OUTPUT_SCHEMA` (missing keys are null)."""

    problem_id: str
    trajectory_index: int
    question: str | None
    gold_answer: str | None
    messages: list[MessageRecord] | None  # prompt + completion; null without a response
    prompt: list[MessageRecord] | None  # system (if any) and user messages
    completion: list[MessageRecord] | None  # the assistant message; null without a response
    prompt_text: str | None  # the teacher prompt rendered in its chat template
    response: str | None
    response_token_ids: list[int]  # teacher token ids
    chunks: list[ChunkRow]
    status: str  # one of STATUSES
    error: str | None  # the reason; null unless status == ERROR
    final_answer: str | None
    correct: bool | None  # null: unverified
    student_ppl: float | None
    num_response_tokens: int
    teacher_tokens_generated: int
    student_tokens_processed: int
    student_tokens_scored: int
    teacher_prompt_tokens: int
    teacher_cached_prompt_tokens: int
    teacher_model: str
    student_model: str
    sampling: dict[str, Any]
    seed: int
    config_fingerprint: str
    method: str
    selected: bool  # the method's pick for fine-tuning (gen_ssd_ray.core.methods)


MESSAGE_TYPE = pa.struct([("role", pa.string()), ("content", pa.string())])
MESSAGES_TYPE = pa.list_(MESSAGE_TYPE)  # TRL's conversational form: [{"role": ..., "content": ...}]

CANDIDATE_TYPE = pa.struct(
    [
        ("text", pa.string()),
        ("num_tokens", pa.int32()),
        ("finish_reason", pa.string()),
        ("ppl", pa.float64()),
    ]
)
CHUNK_TYPE = pa.struct([("candidates", pa.list_(CANDIDATE_TYPE)), ("chosen", pa.int32())])
SAMPLING_TYPE = pa.struct(
    [
        ("temperature", pa.float64()),
        ("top_p", pa.float64()),
        ("chunk_tokens", pa.int32()),
        ("num_candidates", pa.int32()),
        ("beam_width", pa.int32()),
        ("max_new_tokens", pa.int32()),
        ("prune_ppl", pa.float64()),
    ]
)

OUTPUT_SCHEMA: pa.Schema = pa.schema(
    [
        pa.field("problem_id", pa.string(), nullable=False),
        pa.field("trajectory_index", pa.int32(), nullable=False),
        pa.field("question", pa.string()),
        pa.field("gold_answer", pa.string()),
        pa.field("messages", MESSAGES_TYPE),  # prompt + completion; null without a response
        pa.field("prompt", MESSAGES_TYPE),  # system (if any) and user messages
        pa.field("completion", MESSAGES_TYPE),  # [assistant response]; null without a response
        pa.field("prompt_text", pa.string()),  # the teacher prompt rendered in its chat template
        pa.field("response", pa.string()),
        pa.field("response_token_ids", pa.list_(pa.int32())),  # teacher token ids
        pa.field("chunks", pa.list_(CHUNK_TYPE)),
        pa.field("status", pa.string(), nullable=False),  # completed | pruned | truncated | error
        pa.field("error", pa.string()),  # the reason; null unless status == "error"
        pa.field("final_answer", pa.string()),
        pa.field("correct", pa.bool_()),  # null: unverified
        pa.field("student_ppl", pa.float64()),
        pa.field("num_response_tokens", pa.int32()),
        pa.field("teacher_tokens_generated", pa.int64()),
        pa.field("student_tokens_processed", pa.int64()),
        pa.field("student_tokens_scored", pa.int64()),
        pa.field("teacher_prompt_tokens", pa.int64()),
        pa.field("teacher_cached_prompt_tokens", pa.int64()),
        pa.field("teacher_model", pa.string()),
        pa.field("student_model", pa.string()),
        pa.field("sampling", SAMPLING_TYPE),
        pa.field("seed", pa.int64()),
        pa.field("config_fingerprint", pa.string()),
        pa.field("method", pa.string()),  # gen_ssd | standard_kd | posthoc_ppl
        pa.field("selected", pa.bool_()),  # the method's pick for fine-tuning (gen_ssd_ray.core.methods)
    ]
)


def conversation(prompt_messages: list[dict[str, str]] | None, response: str | None) -> dict[str, Any]:
    """The row's `messages`, `prompt` and `completion` from the prompt's messages (system if any, user:
    gen_ssd_ray.common.prompts.chat_messages) and the response; `messages` and `completion` are null
    without a response, all three without prompt messages."""
    if not prompt_messages:
        return {"messages": None, "prompt": None, "completion": None}
    prompt = [{"role": m["role"], "content": m["content"]} for m in prompt_messages]
    if response is None:
        return {"messages": None, "prompt": prompt, "completion": None}
    completion = [{"role": "assistant", "content": response}]
    return {"messages": prompt + completion, "prompt": prompt, "completion": completion}


def is_legacy(schema: pa.Schema) -> bool:
    """Whether a shard's schema is row layout 1 (written before the conversation columns): its `prompt`
    is the rendered text."""
    i = schema.get_field_index("prompt")
    return i >= 0 and (
        pa.types.is_string(schema.field(i).type) or pa.types.is_large_string(schema.field(i).type)
    )


def upgrade_legacy(table: pa.Table) -> pa.Table:
    """A layout-1 table (see `is_legacy`; any subset of its columns) as `OUTPUT_SCHEMA`: `prompt` moves to
    `prompt_text`, columns it lacks (the conversation among them) are null, the rest are cast."""
    if is_legacy(table.schema):
        table = table.rename_columns(["prompt_text" if n == "prompt" else n for n in table.column_names])
    arrays = [
        table.column(f.name).cast(f.type) if f.name in table.column_names else pa.nulls(len(table), f.type)
        for f in OUTPUT_SCHEMA
    ]
    return pa.Table.from_arrays(arrays, schema=OUTPUT_SCHEMA)


def empty_table() -> pa.Table:
    """A table with `OUTPUT_SCHEMA` and no rows."""
    return OUTPUT_SCHEMA.empty_table()


def _unknown_keys(value: Any, typ: pa.DataType, path: str) -> str | None:
    """The first dict key (as a dotted path) that `typ` has no field for, else None."""
    if value is None:
        return None
    if pa.types.is_struct(typ) and isinstance(value, dict):
        names = {typ.field(i).name: typ.field(i).type for i in range(typ.num_fields)}
        for k, v in value.items():
            if k not in names:
                return f"{path}.{k}"
            bad = _unknown_keys(v, names[k], f"{path}.{k}")
            if bad:
                return bad
    elif pa.types.is_list(typ) and isinstance(value, list | tuple):
        for i, v in enumerate(value):
            bad = _unknown_keys(v, typ.value_type, f"{path}[{i}]")
            if bad:
                return bad
    return None


def rows_to_table(rows: list[dict]) -> pa.Table:
    """Build a table of exactly `OUTPUT_SCHEMA` from row dicts; a missing key is null.

    Raises ValueError naming the row and column for an unknown key (nested struct keys included),
    a value that does not convert to the column type, a null in a non-nullable column, a status not
    in `STATUSES`, or an `error` that is set without status "error" (or missing with it).
    """
    names = set(OUTPUT_SCHEMA.names)
    for i, row in enumerate(rows):
        extra = set(row) - names
        if extra:
            raise ValueError(
                f"row {i}: unknown column(s) {sorted(extra)}; OUTPUT_SCHEMA has {OUTPUT_SCHEMA.names}"
            )
        for f in OUTPUT_SCHEMA:
            if pa.types.is_nested(f.type):
                bad = _unknown_keys(row.get(f.name), f.type, f.name)
                if bad:
                    raise ValueError(f"row {i}: unknown key {bad!r} (type {f.type})")
        status = row.get("status")
        if status is not None and status not in STATUSES:
            raise ValueError(f"row {i}: status {status!r} is not one of {STATUSES}")
        error = row.get("error")
        if status == "error" and not error:
            raise ValueError(f"row {i}: status 'error' needs a reason in column 'error'")
        if status != "error" and error is not None:
            raise ValueError(
                f"row {i}: column 'error' must be null unless status is 'error' (status {status!r})"
            )
    arrays = []
    for f in OUTPUT_SCHEMA:
        values = [row.get(f.name) for row in rows]
        try:
            arr = pa.array(values, type=f.type)
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError, OverflowError) as e:
            raise ValueError(f"column {f.name!r} ({f.type}): {e}") from e
        if not f.nullable and arr.null_count:
            first = next(i for i, v in enumerate(values) if v is None)
            raise ValueError(f"row {first}: column {f.name!r} must not be null")
        arrays.append(arr)
    return pa.Table.from_arrays(arrays, schema=OUTPUT_SCHEMA)
