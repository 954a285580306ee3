"""Problems in: load a math dataset into `Problem`s.

`load_problems(cfg.data)` reads `data.path`, which is one of

- `embedded:gsm8k/train` or `embedded:gsm8k/test`: the GSM8K copy shipped in `data/gsm8k/`;
- `embedded:lab/train` or `embedded:lab/test`: the lab task (`gen_ssd_ray.lab.problems`, seeded arithmetic
  word problems; 2,000 train and 500 test rows, seed 0: `LAB_DATASETS`), generated on first use into
  `gen_ssd_ray.common.models.cache_root() / "data"` (atomically) and read from there afterwards;
- a JSONL file (`.jsonl`/`.ndjson`; also a `.json` file that turns out to hold JSON lines);
- a JSON file holding an array of objects, or an object whose "data" or "rows" key holds one;
- a Parquet file, or a folder of them (read in sorted path order, recursively);
- anything else is taken as a Hugging Face dataset name: `datasets.load_dataset(path, split=data.split)`
  (imported lazily; without `datasets` or without network the error says so).

Every row becomes one `Problem`; `data.offset` and `data.limit` then pick a slice. The id is the
`data.id_field` value (stringified) or `"<stem>-<row index>"`, where the row index is the row's
position in the source (its line number, 0-based, for JSONL; blank lines are skipped but counted) and
the stem is the file or folder stem ("gsm8k-train"/"gsm8k-test", "lab-train"/"lab-test" for the embedded sets,
"<name>-<split>" for a Hugging Face dataset). Ids therefore do not depend on offset or limit, and they
are unique in what `load_problems` returns.

Two kinds of failure:

- a bad *row* (malformed JSON line, not an object, missing or empty question, missing answer, a gold
  answer that cannot be extracted, a missing id, a duplicate id) becomes a `Problem` with `error` set
  and the job writes it as an error row; duplicates are judged over the whole source, the first one
  wins and the later ones get a fallback id so ids stay unique;
- a bad *source* (missing/unreadable file, unknown format, a dataset that cannot be loaded, a field
  that no row has, no rows at all) raises `DataError`, naming the config key and what to set.

`check_data_source` is the fail-before-actors check; it is `load_problems` itself with the result
dropped (a GSM8K-sized file loads in well under a second), so it catches every fatal case above.

This module does not tokenize, fill in the configured prompt or apply chat templates: a question
becomes a prompt in `gen_ssd_ray.common.prompts` (`chat_messages`, `render_prompt`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gen_ssd_ray.common.config import DataConfig
from gen_ssd_ray.common.errors import InputError
from gen_ssd_ray.core.answers import extract_gold_answer

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
EMBEDDED_PREFIX = "embedded:"
# embedded name -> (file under the repo root, id stem)
EMBEDDED_DATASETS: dict[str, tuple[str, str]] = {
    "gsm8k/train": ("data/gsm8k/train.jsonl", "gsm8k-train"),
    "gsm8k/test": ("data/gsm8k/test.jsonl", "gsm8k-test"),
}
# embedded name -> (lab split, number of problems, id stem); generated with seed LAB_SEED on first use.
LAB_DATASETS: dict[str, tuple[str, int, str]] = {
    "lab/train": ("train", 2000, "lab-train"),
    "lab/test": ("test", 500, "lab-test"),
}
LAB_SEED = 0
_JSONL_SUFFIXES = (".jsonl", ".ndjson")
_LOCAL_SUFFIXES = (*_JSONL_SUFFIXES, ".json", ".parquet", ".csv", ".tsv", ".txt", ".gz")


@dataclass(frozen=True)
class Problem:
    problem_id: str
    question: str | None
    gold_answer: str | None
    # Why the row is unusable (None: fine). Such problems become error rows; the job goes on.
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class DataError(InputError):
    """The data source cannot be used at all: the message names the config key and the fix."""


# ---- public API ----------------------------------------------------------------------------------


def load_problems(cfg: DataConfig) -> list[Problem]:
    """Read `cfg.path`, turn each row into a `Problem`, return the `offset`/`limit` slice."""
    source = _read_source(cfg)
    _check_fields(cfg, source)
    ids, id_errors = _assign_ids(cfg, source)
    end = None if cfg.limit is None else cfg.offset + cfg.limit
    picked = range(len(source.rows))[cfg.offset : end]
    problems = [_to_problem(cfg, source.rows[k], ids[k], id_errors[k]) for k in picked]
    bad = sum(1 for p in problems if p.error is not None)
    log.info(
        "data: %d problems from %s (rows %d..%d of %d; %d with errors)",
        len(problems),
        cfg.path,
        cfg.offset,
        cfg.offset + len(problems),
        len(source.rows),
        bad,
    )
    return problems


def check_data_source(cfg: DataConfig) -> None:
    """Raise `DataError` if `cfg` cannot be loaded. Implemented as a full `load_problems`."""
    load_problems(cfg)


def embedded_path(name: str) -> Path:
    """The file behind `embedded:<name>` (a lab dataset is generated first if it is not there yet)."""
    if name in LAB_DATASETS:
        return lab_dataset_path(name)
    if name not in EMBEDDED_DATASETS:
        known = ", ".join(EMBEDDED_PREFIX + k for k in (*EMBEDDED_DATASETS, *LAB_DATASETS))
        raise DataError(f"data.path={EMBEDDED_PREFIX + name!r}: unknown embedded dataset; use one of {known}")
    return REPO_ROOT / EMBEDDED_DATASETS[name][0]


def lab_dataset_path(name: str) -> Path:
    """The JSONL behind `embedded:lab/<split>`, under `cache_root()/data`, generated (deterministically,
    written atomically) if missing. The file name carries the generator version, size and seed."""
    from gen_ssd_ray.common.models import cache_root
    from gen_ssd_ray.lab.problems import GENERATOR_VERSION, generate_split, write_jsonl

    split, n, stem = LAB_DATASETS[name]
    file = cache_root() / "data" / f"{stem}-n{n}-seed{LAB_SEED}-v{GENERATOR_VERSION}.jsonl"
    if not file.is_file():
        write_jsonl(file, generate_split(split, n, LAB_SEED))
    return file


def lab_sft_path(split: str) -> Path:
    """`embedded:lab-sft/<split>` for the fine-tuning job: the same problems as `embedded:lab/<split>`,
    one row per problem and solution style (`question`, `response`, `style`; problem-major, so
    `data.limit=4*k` is the first k problems in every style, and with the filter
    ``style != 'shortcut'``, `data.limit=3*k` the first k in the three step-by-step styles), generated
    on first use like them."""
    from gen_ssd_ray.common.models import cache_root
    from gen_ssd_ray.lab.problems import GENERATOR_VERSION, write_lab_sft_jsonl

    name = f"lab/{split}"
    if name not in LAB_DATASETS:
        raise DataError(f"data.path='embedded:lab-sft/{split}': unknown split; use train or test")
    split_, n, stem = LAB_DATASETS[name]
    file = cache_root() / "data" / f"{stem}-sft-n{n}-seed{LAB_SEED}-v{GENERATOR_VERSION}.jsonl"
    if not file.is_file():
        write_lab_sft_jsonl(file, split_, n, LAB_SEED)
    return file


def _embedded_stem(name: str) -> str:
    return LAB_DATASETS[name][2] if name in LAB_DATASETS else EMBEDDED_DATASETS[name][1]


# ---- reading -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Row:
    index: int  # position in the source: the id suffix
    value: Any  # the decoded row (normally a dict)
    error: str | None = None  # set when the row could not be decoded at all


@dataclass(frozen=True)
class _Source:
    where: str  # for messages
    stem: str  # id prefix
    rows: list[_Row]
    fields: list[str]  # every field name seen, in first-seen order


def _read_source(cfg: DataConfig) -> _Source:
    path = cfg.path
    if path.startswith(EMBEDDED_PREFIX):
        name = path[len(EMBEDDED_PREFIX) :]
        file = embedded_path(name)
        if not file.is_file():
            raise DataError(f"data.path={path!r}: {file} is missing from this installation")
        return _read_jsonl(file, stem=_embedded_stem(name))
    local = Path(path).expanduser()
    if local.is_dir():
        return _read_parquet(local)
    if local.exists():
        suffix = local.suffix.lower()
        if suffix in _JSONL_SUFFIXES:
            return _read_jsonl(local, stem=local.stem)
        if suffix == ".json":
            return _read_json(local)
        if suffix == ".parquet":
            return _read_parquet(local)
        raise DataError(
            f"data.path={path!r}: unknown format {suffix or '(no suffix)'!r}; "
            "use a .jsonl, .json or .parquet file, a folder of .parquet files, or a Hugging Face dataset name"
        )
    if _looks_local(path):
        raise DataError(f"data.path={path!r}: no such file or folder")
    return _read_hf(path, cfg.split)


def _looks_local(path: str) -> bool:
    return path.startswith(("/", "./", "../", "~")) or path.lower().endswith(_LOCAL_SUFFIXES)


def _read_bytes(file: Path) -> bytes:
    try:
        return file.read_bytes()
    except OSError as e:
        raise DataError(f"data.path={str(file)!r}: cannot read it ({e.strerror or e})") from None


def _read_jsonl(file: Path, stem: str, data: bytes | None = None) -> _Source:
    raw = _read_bytes(file) if data is None else data
    rows: list[_Row] = []
    for index, line in enumerate(raw.splitlines()):  # bytes: splits on \n and \r only
        if not line.strip():
            continue
        try:
            rows.append(_Row(index, json.loads(line)))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            rows.append(_Row(index, None, f"malformed JSON on line {index + 1}: {e}"))
    if rows and all(r.error is not None for r in rows):
        raise DataError(f"data.path={str(file)!r}: no line is valid JSON (first: {rows[0].error})")
    return _Source(str(file), stem, rows, _fields_of(r.value for r in rows))


def _read_json(file: Path) -> _Source:
    raw = _read_bytes(file)
    try:
        doc = json.loads(raw)
    except UnicodeDecodeError as e:
        raise DataError(f"data.path={str(file)!r}: not UTF-8 text ({e})") from None
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # several JSON values: it is JSON lines under a .json name
            return _read_jsonl(file, stem=file.stem, data=raw)
        raise DataError(f"data.path={str(file)!r}: not valid JSON ({e})") from None
    if isinstance(doc, dict):
        for key in ("data", "rows"):
            if isinstance(doc.get(key), list):
                doc = doc[key]
                break
        else:
            raise DataError(
                f"data.path={str(file)!r}: a JSON object must hold the rows in a list under 'data' or "
                f"'rows'; its keys are {sorted(doc)[:20]}"
            )
    if not isinstance(doc, list):
        raise DataError(
            f"data.path={str(file)!r}: expected a JSON array of objects, got {type(doc).__name__}"
        )
    rows = [_Row(i, v) for i, v in enumerate(doc)]
    return _Source(str(file), file.stem, rows, _fields_of(doc))


def _read_parquet(path: Path) -> _Source:
    import pyarrow.parquet as pq

    files = sorted(path.rglob("*.parquet")) if path.is_dir() else [path]
    if not files:
        raise DataError(
            f"data.path={str(path)!r}: a folder must contain .parquet files (found none); "
            "or point data.path at a .jsonl/.json file"
        )
    rows: list[_Row] = []
    fields: list[str] = []
    for file in files:
        try:
            table = pq.read_table(file)
        except Exception as e:  # pyarrow raises several types for unreadable/corrupt files
            raise DataError(f"data.path={str(path)!r}: cannot read Parquet file {file} ({e})") from None
        fields += [n for n in table.column_names if n not in fields]
        rows += [_Row(len(rows) + i, v) for i, v in enumerate(table.to_pylist())]
    stem = path.name if path.is_dir() else path.stem
    return _Source(str(path), stem, rows, fields)


def _read_hf(name: str, split: str) -> _Source:
    hint = "offline, export it to JSONL or Parquet first and point data.path at that file"
    try:
        import datasets  # type: ignore[import-not-found]
    except ImportError:
        raise DataError(
            f"data.path={name!r}: no such local file or folder, and the `datasets` package needed to load "
            f"it as a Hugging Face dataset is not installed ({hint}, or use embedded:gsm8k/test)"
        ) from None
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:
        raise DataError(
            f"data.path={name!r}, data.split={split!r}: not a local file or folder, and loading it as a "
            f"Hugging Face dataset failed ({type(e).__name__}: {e}); {hint}"
        ) from None
    values = list(ds)
    fields = list(getattr(ds, "column_names", None) or _fields_of(values))
    stem = f"{name.rstrip('/').split('/')[-1]}-{split}"
    return _Source(f"{name} ({split})", stem, [_Row(i, v) for i, v in enumerate(values)], fields)


def _fields_of(values: Iterable[Any]) -> list[str]:
    seen: dict[str, None] = {}
    for v in values:
        if isinstance(v, dict):
            seen.update(dict.fromkeys(str(k) for k in v))
    return list(seen)


# ---- rows -> problems ----------------------------------------------------------------------------


def _check_fields(cfg: DataConfig, source: _Source) -> None:
    if not source.rows:
        raise DataError(f"data.path={cfg.path!r}: the source has no rows")
    for key, name in (
        ("data.question_field", cfg.question_field),
        ("data.answer_field", cfg.answer_field),
        ("data.id_field", cfg.id_field),
    ):
        if name is not None and name not in source.fields:
            raise DataError(
                f"{key}={name!r}: no row of {source.where} has this field; fields found: {source.fields}"
            )


def _assign_ids(cfg: DataConfig, source: _Source) -> tuple[list[str], list[str | None]]:
    """Ids for every row of the source (so they do not depend on offset/limit), unique; the error
    for rows whose id is missing or duplicated (they get `<stem>-<index>`)."""
    ids: list[str] = []
    errors: list[str | None] = []
    first_row: dict[str, int] = {}
    for row in source.rows:
        fallback = f"{source.stem}-{row.index}"
        pid, error = fallback, None
        if cfg.id_field is not None and isinstance(row.value, dict):
            value = row.value.get(cfg.id_field)
            if value is None or str(value).strip() == "":
                error = f"missing id field {cfg.id_field!r}"
            else:
                pid = str(value)
        if pid in first_row:
            error = f"duplicate problem_id {pid!r} (first at row {first_row[pid]})"
            pid = fallback
            n = 1
            while pid in first_row:  # the fallback itself is taken by an explicit id
                pid, n = f"{fallback}-dup{n}", n + 1
        first_row[pid] = row.index
        ids.append(pid)
        errors.append(error)
    return ids, errors


def _to_problem(cfg: DataConfig, row: _Row, pid: str, id_error: str | None) -> Problem:
    if row.error is not None:
        return Problem(pid, None, None, row.error)
    if not isinstance(row.value, dict):
        return Problem(pid, None, None, f"row is not an object (got {type(row.value).__name__})")
    q_raw = row.value.get(cfg.question_field)
    a_raw = row.value.get(cfg.answer_field)
    question = q_raw if isinstance(q_raw, str) else None
    gold = extract_gold_answer(a_raw)
    if id_error is not None:
        error: str | None = id_error
    elif q_raw is None:
        error = f"missing question field {cfg.question_field!r}"
    elif not isinstance(q_raw, str):
        error = f"question field {cfg.question_field!r} is not text (got {type(q_raw).__name__})"
    elif not q_raw.strip():
        error = "empty question"
    elif a_raw is None:
        error = f"missing answer field {cfg.answer_field!r}"
    elif gold is None:
        error = f"unparseable gold answer in {cfg.answer_field!r}: {str(a_raw)[:80]!r}"
    else:
        error = None
    return Problem(pid, question, gold, error)
