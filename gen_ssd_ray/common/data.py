"""Problems in: read a math dataset as a stream of `Problem`s.

`open_problems(cfg.data)` checks the source up front and returns a `ProblemStream` that reads it lazily;
`load_problems(cfg.data)` is the same stream collected into a list. `data.path` is one of

- `embedded:gsm8k/train` or `embedded:gsm8k/test`: the GSM8K copy shipped in `data/gsm8k/`;
- `embedded:lab/train` or `embedded:lab/test`: the lab task (`gen_ssd_ray.lab.problems`, seeded arithmetic
  word problems; 2,000 train and 500 test rows, seed 0: `LAB_DATASETS`), generated on first use into
  `gen_ssd_ray.common.models.cache_root() / "data"` (atomically) and read from there afterwards;
- a JSONL file (`.jsonl`/`.ndjson`; also a `.json` file that turns out to hold JSON lines);
- a JSON file holding an array of objects, or an object whose "data" or "rows" key holds one;
- a Parquet file, or a folder of them (read in sorted path order, recursively);
- any of these files (or a Parquet folder) on an object store: `s3://bucket/problems.jsonl`,
  `gs://bucket/parquet/` (gen_ssd_ray.common.storage; credentials from the store's environment). They
  are streamed the same way (ranged reads), give the same ids (the object's name is the stem) and the
  same error rows as a local copy;
- anything else is taken as a Hugging Face dataset name: `datasets.load_dataset(path, data.subset,
  split=data.split, revision=data.revision)` (imported lazily). With network (HF_HUB_OFFLINE unset) it
  is downloaded into the node's datasets cache (`HF_DATASETS_CACHE`) on first use; offline it must be
  there already. A dataset that cannot be loaded (no `datasets` package, offline and not cached, an
  unknown subset or split) is a `DataError` naming the keys and the fix.

Every row becomes one `Problem`; `data.offset` and `data.limit` then pick a slice.

Decontamination. With `data.decontaminate.against` set (and `enabled`), `open_problems` reads the slice
once more and drops every problem whose question overlaps one of those datasets
(gen_ssd_ray.common.decontam: an exact duplicate, or more than `threshold` of an evaluation problem's
n-grams): the stream skips their ids, `ProblemStream.count` excludes them and
`ProblemStream.dropped_contaminated` counts them. The slice is picked first, so `data.limit=100` gives
at most 100 problems. Error rows are never dropped (they have no question to compare).

Ids. Without `data.id_field` the id is generated: `"<stem>-<row index>"`, where the row index is the
row's position in the source (its line number, 0-based, for JSONL; blank lines are skipped but counted)
and the stem is the file or folder stem ("gsm8k-train"/"gsm8k-test", "lab-train"/"lab-test" for the
embedded sets, "<name>-<split>" for a Hugging Face dataset, "<name>-<subset>-<split>" with a subset;
characters UTF-8 cannot encode, as in a non-UTF-8 file name, are backslash-escaped). A generated id is positional: an in-place edit of a row
keeps its id (and changes its `content_hash`); inserting or deleting rows shifts the ids after them, so
give the data an id field if it will be edited that way. With `data.id_field` the id is the field's
*canonical* value (`canonical_id`): a string verbatim; a number in one canonical spelling, integers (and
integral floats and Decimals) in plain decimal, so an id column exported as 1.0, 1 or "1" gives "1"
every time, other finite floats as their shortest repr ("2.5"). None, empty or blank text, bool, NaN,
infinities, bytes, lists, dicts, text UTF-8 cannot encode and text starting with "!" are not ids: such a
row is an error row. Duplicates are judged on canonical ids in source order over the whole source (also
the rows before `data.offset`); the first one wins. A row without a usable id (junk, missing, a
duplicate, or a row that is no object) gets the fallback `"!<stem>-<row index>"`. No real id can start
with "!" (`FALLBACK_PREFIX`: such ids are refused) and no two rows share an index, so a fallback cannot
collide with a real id or another fallback, whatever the order of the rows: by construction, not by
luck. Ids therefore do not depend on offset or limit, and they are unique in what the stream yields.

Content. `Problem.content_hash` is the hex sha256 of the compact ASCII JSON array
`["gen-ssd-problem/1", id, question, gold answer]` (`content_hash`): the gold answer as extracted, so an
edit of a solution's text that leaves its final answer alone does not change it. Gold answers are
extracted by `gen_ssd_ray.core.answers.parse_gold_answer`: text (`#### N`, the last `\\boxed{}`, or a
short one-line value) or a finite number in canonical spelling (7.0 gives "7"); junk (a bare `####`,
an empty box, NaN, bool, lists, dicts, bytes, ...) is an error row naming `data.answer_field`. Every
string a `Problem` carries can be encoded as UTF-8, so any row built from it can be written: a question,
answer or id that cannot (a lone surrogate from a JSON "\\ud800", a Parquet cell that is not UTF-8)
makes the row an error row, the value is dropped, and the message quotes it escaped.

Memory: the stream holds one batch of rows plus, when `data.id_field` is set, every id seen so far (to
judge duplicates); without an id field it holds no ids at all (`<stem>-<index>` cannot repeat) and does not
even decode the rows before `data.offset`. Parquet is read with `ParquetFile.iter_batches` over the question,
answer and id columns only (other columns are never read); JSONL line by line (a file of up to 16 MiB,
`_WHOLE_READ_BYTES`, in one read); a Hugging Face dataset (memory-mapped Arrow) through
`select_columns`. A JSON array, and a `.json` file holding JSON lines, is read whole: a `.json` document
can only be parsed whole, so use JSONL or Parquet for large sources. `ProblemStream.count` is the
number of problems after offset/limit, from Parquet metadata, the dataset length, the array length or,
for JSONL, a byte scan that counts non-blank lines without parsing them.

Two kinds of failure:

- a bad *row* (malformed JSON line, not an object, a missing, empty or non-text question, a missing or
  junk gold answer, a missing, junk or duplicate id, text that UTF-8 cannot encode) becomes a `Problem`
  with `error` set (`"bad <what> in data.<key>='<field>': <what is wrong>"`, the first of the id's, the
  question's and the answer's) and the job writes it as an error row;
- a bad *source* (missing/unreadable file, unknown format, a dataset that cannot be loaded, a field
  that no row has, no rows at all) raises `DataError`, naming the config key and what to set.

`open_problems` raises every such `DataError` before returning, reading only the Parquet footers, the
first JSONL lines (up to the first valid line that shows every configured field: normally line one),
the JSON document or the dataset's schema. `check_data_source`, the fail-before-actors check, is
`open_problems` with the result dropped. The one thing it cannot see is a file that turns unreadable or
corrupt past what was checked (a damaged Parquet page, an I/O error): iterating raises `DataError` there.

This module does not tokenize, fill in the configured prompt or apply chat templates: a question
becomes a prompt in `gen_ssd_ray.common.prompts` (`chat_messages`, `render_prompt`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import numbers
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from itertools import islice
from pathlib import Path
from typing import Any

from gen_ssd_ray.common import decontam
from gen_ssd_ray.common.config import DataConfig, DecontamConfig
from gen_ssd_ray.common.decontam import Dropped
from gen_ssd_ray.common.errors import InputError
from gen_ssd_ray.common.storage import is_remote
from gen_ssd_ray.core.answers import canonical_number, parse_gold_answer, shorten, unencodable

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
# A JSONL file up to this size is read in one call (faster, and a constant bound); larger ones line by line.
_WHOLE_READ_BYTES = 16 << 20
# Rows per Parquet / Hugging Face batch: what a stream holds decoded at a time.
_BATCH_ROWS = 4096
# Block size of the JSONL line count.
_SCAN_BYTES = 16 << 20
_NOTHING = object()  # a sentinel: an iterable's first row, when there is none
# The first element of what `content_hash` hashes: change it (and say so) if the encoding ever changes.
CONTENT_HASH_VERSION = "gen-ssd-problem/1"
# Ids that start with this are reserved for the fallback ids of rows without a usable id (module docstring).
FALLBACK_PREFIX = "!"


@dataclass(frozen=True)
class Problem:
    """One problem as loaded. `question` and `gold_answer` are None where the row had no usable value
    (then `error` says why); every string in it is valid Unicode, so any row built from it can be written.
    """

    problem_id: str
    question: str | None
    gold_answer: str | None
    # Why the row is unusable (None: fine). Such problems become error rows; the job goes on.
    error: str | None = None
    # Hex sha256 of the problem's content (`content_hash`), computed from the three fields above (not an
    # argument, so it can never disagree with them, also after `dataclasses.replace`): a resume can tell
    # an edited problem from the one it committed.
    content_hash: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "content_hash", content_hash(self.problem_id, self.question, self.gold_answer)
        )

    @property
    def ok(self) -> bool:
        return self.error is None


def content_hash(problem_id: str, question: str | None, gold_answer: str | None) -> str:
    """Hex sha256 of `CONTENT_HASH_VERSION`, the canonical id, the question and the gold answer (as
    loaded: the extracted gold, not the solution text around it), encoded as a compact ASCII JSON array
    (`json.dumps([...], ensure_ascii=True, separators=(",", ":"))`). A JSON array has no separator
    ambiguity, None stays distinct from "", and ASCII escapes make any str encodable."""
    encoding = json.dumps(
        [CONTENT_HASH_VERSION, problem_id, question, gold_answer], ensure_ascii=True, separators=(",", ":")
    )
    return hashlib.sha256(encoding.encode("ascii")).hexdigest()


class DataError(InputError):
    """The data source cannot be used at all: the message names the config key and the fix."""


# ---- public API ----------------------------------------------------------------------------------


class ProblemStream:
    """The problems of one `DataConfig`, checked on open (`open_problems`) and read lazily.

    Iterating yields exactly what `load_problems` returns (same order, ids, errors); every pass re-reads
    the source. `count` is the number of problems it yields, `source_rows` the rows in the whole source.
    Iterating raises `DataError` only for a file that turns unreadable or corrupt past what `open_problems`
    checked.
    """

    def __init__(self, cfg: DataConfig, source: _Source, decontaminated: Dropped | None = None) -> None:
        self.cfg = cfg
        self._source = source
        # What `data.decontaminate` dropped from the slice (None: no check); iterating skips those ids.
        self.decontaminated = decontaminated

    @property
    def where(self) -> str:
        return self._source.where

    @cached_property
    def source_rows(self) -> int | None:
        """Rows in the whole source, before offset/limit (for JSONL a byte scan on first use; None: unknown)."""
        if self._source.n_rows is not None:
            return self._source.n_rows
        return None if self._source.count_rows is None else self._source.count_rows()

    @property
    def count(self) -> int | None:
        """Problems this stream yields (after offset/limit); None if the source size is unknown."""
        total = self.source_rows
        if total is None:
            return None
        return len(range(total)[self.cfg.offset : self._end]) - self.dropped_contaminated

    @property
    def dropped_contaminated(self) -> int:
        """Problems of the slice that `data.decontaminate` dropped (0: none, or no check)."""
        return 0 if self.decontaminated is None else self.decontaminated.count

    @property
    def _end(self) -> int | None:
        return None if self.cfg.limit is None else self.cfg.offset + self.cfg.limit

    def __iter__(self) -> Iterator[Problem]:
        cfg, source, end = self.cfg, self._source, self._end
        if end is not None and end <= cfg.offset:
            return
        ids = _Ids(cfg.id_field, source.stem)
        # Without an id field no id can repeat, so the rows before the offset need not be decoded at all;
        # with one, every earlier id must be seen to judge duplicates.
        start = cfg.offset if cfg.id_field is None else 0
        n = bad = 0
        drop = frozenset() if self.decontaminated is None else self.decontaminated.ids
        for k, row in enumerate(source.rows(start), start):
            pid, id_error = ids.assign(row)
            if k >= cfg.offset and pid not in drop:
                problem = _to_problem(cfg, row, pid, id_error)
                n += 1
                bad += problem.error is not None
                yield problem
            if end is not None and k + 1 >= end:  # stop before reading another row
                break
        total = "" if source.n_rows is None else f" of {source.n_rows}"
        log.info(
            "data: %d problems from %s (rows %d..%d%s; %d with errors; %d dropped by data.decontaminate)",
            n,
            cfg.path,
            cfg.offset,
            cfg.offset + n + len(drop),
            total,
            bad,
            len(drop),
        )


def open_problems(cfg: DataConfig) -> ProblemStream:
    """Check `cfg.path` and return a lazy `ProblemStream` over its `offset`/`limit` slice.

    Raises:
        DataError: the source cannot be used (see the module docstring). Of the rows, only the first
            JSONL lines have been read by then (a JSON document is parsed whole).
    """
    source = _read_source(cfg)
    _check_fields(cfg, source)
    stream = ProblemStream(cfg, source)
    if not decontam.active(cfg.decontaminate):
        return stream
    # One pass over the slice finds the contaminated ids (only they are held); the stream skips them.
    index = decontam.load_index(cfg.decontaminate)
    dropped = decontam.check(((p.problem_id, p.question) for p in stream), cfg.decontaminate, index)
    return ProblemStream(cfg, source, dropped)


def load_problems(cfg: DataConfig) -> list[Problem]:
    """Read `cfg.path`, turn each row into a `Problem`, return the `offset`/`limit` slice: the whole
    `open_problems(cfg)` stream as a list."""
    return list(open_problems(cfg))


def check_data_source(cfg: DataConfig) -> None:
    """Raise `DataError` if `cfg` cannot be loaded: `open_problems` without reading the rows (and without
    the decontamination pass, which reads them all)."""
    open_problems(dataclasses.replace(cfg, decontaminate=DecontamConfig(enabled=False)))


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
    # Field names: the schema, or (JSONL) those seen up to the first line that shows every wanted one.
    fields: list[str]
    empty: bool  # no rows at all
    # A fresh pass over the rows from row `start` on (0-based among the rows; the earlier ones are skipped,
    # undecoded where the format allows: only asked for when no id field makes them matter).
    rows: Callable[[int], Iterator[_Row]]
    n_rows: int | None  # rows in the source when known without reading them
    count_rows: Callable[[], int] | None = None  # otherwise how to count them (a byte scan)


def _read_source(cfg: DataConfig) -> _Source:
    path = cfg.path
    wanted = list(dict.fromkeys(f for f in (cfg.question_field, cfg.answer_field, cfg.id_field) if f))
    if path.startswith(EMBEDDED_PREFIX):
        name = path[len(EMBEDDED_PREFIX) :]
        file = embedded_path(name)
        if not file.is_file():
            raise DataError(f"data.path={path!r}: {file} is missing from this installation")
        return _read_jsonl(file, _embedded_stem(name), wanted)
    if is_remote(path):
        return _read_object_store(path, wanted)
    local = Path(path).expanduser()
    if local.is_dir():
        return _read_parquet(local, wanted)
    if local.exists():
        suffix = local.suffix.lower()
        if suffix in _JSONL_SUFFIXES:
            return _read_jsonl(local, local.stem, wanted)
        if suffix == ".json":
            return _read_json(local, wanted)
        if suffix == ".parquet":
            return _read_parquet(local, wanted)
        raise DataError(
            f"data.path={path!r}: unknown format {suffix or '(no suffix)'!r}; "
            "use a .jsonl, .json or .parquet file, a folder of .parquet files, or a Hugging Face dataset name"
        )
    if _looks_local(path):
        raise DataError(f"data.path={path!r}: no such file or folder")
    return _read_hf(cfg, wanted)


def _read_object_store(path: str, wanted: list[str]) -> _Source:
    """A data file or Parquet folder on an object store: the local readers over `_ObjectFile`s."""
    from gen_ssd_ray.common.storage import Storage

    uri = path.rstrip("/")
    scheme_sep = uri.index("://") + 3
    parent, _, name = uri[scheme_sep:].rpartition("/")
    try:
        if parent:  # scheme://bucket/.../name: a file, or else a folder of Parquet files
            folder = Storage(uri[:scheme_sep] + parent, key="data.path")
            if folder.stat(name) is not None:
                file = _ObjectFile(folder, name)
                suffix = file.suffix.lower()
                if suffix in _JSONL_SUFFIXES:
                    return _read_jsonl(file, file.stem, wanted)  # type: ignore[arg-type]
                if suffix == ".json":
                    return _read_json(file, wanted)  # type: ignore[arg-type]
                if suffix == ".parquet":
                    return _read_parquet(file, wanted)  # type: ignore[arg-type]
                raise DataError(
                    f"data.path={path!r}: unknown format {suffix or '(no suffix)'!r}; use a .jsonl, .json or "
                    ".parquet object, or a prefix holding .parquet objects"
                )
        top = Storage(uri, key="data.path")
        if top.list():
            return _read_parquet(_ObjectFolder(top), wanted)  # type: ignore[arg-type]
    except OSError as e:
        raise DataError(f"data.path={path!r}: cannot read it ({e.strerror or e})") from None
    raise DataError(f"data.path={path!r}: no such object or prefix on the store")


class _ObjectFile:
    """One object on a store, with the few `Path` methods the readers in this module use."""

    def __init__(self, storage: Any, name: str) -> None:
        self.storage, self.key = storage, name
        self.name = name.rsplit("/", 1)[-1]
        self.stem, self.suffix = Path(self.name).stem, Path(self.name).suffix

    def __str__(self) -> str:
        return self.storage.uri_of(self.key)

    def __lt__(self, other: _ObjectFile) -> bool:
        return self.key < other.key

    def is_dir(self) -> bool:
        return False

    def stat(self) -> Any:
        st = self.storage.stat(self.key)
        if st is None:
            raise FileNotFoundError(2, "no such object", str(self))
        return st  # a storage.Stat: `.size` (see _file_size)

    def read_bytes(self) -> bytes:
        return self.storage.read_bytes(self.key)

    def open(self, mode: str = "rb") -> Any:
        return self.storage.open_input(self.key)

    def parquet(self) -> Any:
        import pyarrow.parquet as pq

        fs, root = self.storage.arrow()
        return pq.ParquetFile(f"{root}/{self.key}", filesystem=fs)


class _ObjectFolder:
    """A prefix on a store holding Parquet objects (`is_dir`, `rglob`, `name`, as a Path)."""

    def __init__(self, storage: Any) -> None:
        self.storage = storage
        self.name = storage.uri.rstrip("/").rsplit("/", 1)[-1]
        self.stem = self.name

    def __str__(self) -> str:
        return self.storage.uri

    def is_dir(self) -> bool:
        return True

    def rglob(self, pattern: str) -> list[_ObjectFile]:
        suffix = pattern.lstrip("*")
        return [_ObjectFile(self.storage, n) for n in self.storage.list() if n.endswith(suffix)]


def _parquet_file(file: Path | _ObjectFile) -> Any:
    import pyarrow.parquet as pq

    return file.parquet() if isinstance(file, _ObjectFile) else pq.ParquetFile(file)


def _file_size(file: Path | _ObjectFile) -> int:
    return file.stat().size if isinstance(file, _ObjectFile) else file.stat().st_size


def _looks_local(path: str) -> bool:
    return path.startswith(("/", "./", "../", "~")) or path.lower().endswith(_LOCAL_SUFFIXES)


def _unreadable(file: Path, e: OSError) -> DataError:
    return DataError(f"data.path={str(file)!r}: cannot read it ({e.strerror or e})")


def _read_bytes(file: Path) -> bytes:
    try:
        return file.read_bytes()
    except OSError as e:
        raise _unreadable(file, e) from None


# -- JSONL


def _read_jsonl(file: Path, stem: str, wanted: list[str], data: bytes | None = None) -> _Source:
    """JSON lines, from `data` if given (already in memory), else from `file` (whole if small, else
    line by line). Reads up front only up to the first valid line that shows every `wanted` field."""
    if data is None:
        try:
            size = _file_size(file)
        except OSError as e:
            raise _unreadable(file, e) from None
        if size <= _WHOLE_READ_BYTES:
            data = _read_bytes(file)
    lines = _jsonl_lines(file, data)

    # The up-front check: enough lines to know the source is usable (usually one).
    seen: dict[str, None] = {}
    has_rows = valid = False
    first_error: str | None = None
    head = lines()
    try:
        for index, line in head:
            has_rows = True
            value, error = _decode_line(index, line)
            if error is not None:
                first_error = first_error or error
                continue
            valid = True
            if isinstance(value, dict):
                seen.update(dict.fromkeys(str(k) for k in value))
            if all(f in seen for f in wanted):
                break
    finally:
        head.close()
    if has_rows and not valid:
        raise DataError(f"data.path={str(file)!r}: no line is valid JSON (first: {first_error})")

    def rows(start: int) -> Iterator[_Row]:
        for k, (index, line) in enumerate(lines()):
            if k < start:
                continue  # not decoded: only reached without an id field
            value, error = _decode_line(index, line)
            yield _Row(index, value, error)

    def count_rows() -> int:
        return _count_lines(file, data)

    return _Source(str(file), stem, list(seen), not has_rows, rows, None, count_rows)


def _decode_line(index: int, line: bytes) -> tuple[Any, str | None]:
    try:
        return json.loads(line), None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, f"malformed JSON on line {index + 1}: {e}"
    except RecursionError:  # `[[[[...]]]]` thousands deep: json's parser recurses
        return None, f"malformed JSON on line {index + 1}: nested too deeply to parse"


def _jsonl_lines(file: Path, data: bytes | None) -> Callable[[], Iterator[tuple[int, bytes]]]:
    """Passes over the non-blank lines with their 0-based line numbers, split as `bytes.splitlines`
    splits the whole file (on \\n, \\r\\n and \\r)."""
    if data is not None:

        def in_memory() -> Iterator[tuple[int, bytes]]:
            for index, line in enumerate(data.splitlines()):
                if line.strip():
                    yield index, line

        return in_memory

    def from_file() -> Iterator[tuple[int, bytes]]:
        index = 0
        try:
            with file.open("rb") as f:
                # Each chunk ends with \n (but the last), so no \r\n is cut in two and splitting
                # chunk by chunk gives the lines a split of the whole file gives.
                for chunk in f:
                    for line in chunk.splitlines():
                        if line.strip():
                            yield index, line
                        index += 1
        except OSError as e:
            raise _unreadable(file, e) from None

    return from_file


def _count_lines(file: Path, data: bytes | None) -> int:
    """Non-blank lines (rows), by a byte scan in blocks cut after a \\n; no JSON is parsed."""
    if data is not None:
        return _non_blank(data)
    n, tail = 0, b""
    try:
        with file.open("rb") as f:
            while block := f.read(_SCAN_BYTES):
                block = tail + block
                cut = block.rfind(b"\n") + 1
                n += _non_blank(block[:cut])
                tail = block[cut:]
    except OSError as e:
        raise _unreadable(file, e) from None
    return n + _non_blank(tail)


def _non_blank(text: bytes) -> int:
    return sum(map(bool, map(bytes.strip, text.splitlines())))


# -- JSON


def _read_json(file: Path, wanted: list[str]) -> _Source:
    """A JSON document is parsed whole and its rows stay in memory (JSON lines under a .json name too)."""
    raw = _read_bytes(file)
    try:
        doc = json.loads(raw)
    except UnicodeDecodeError as e:
        raise DataError(f"data.path={str(file)!r}: not UTF-8 text ({e})") from None
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # several JSON values: it is JSON lines under a .json name
            return _read_jsonl(file, file.stem, wanted, data=raw)
        raise DataError(f"data.path={str(file)!r}: not valid JSON ({e})") from None
    except RecursionError:
        raise DataError(
            f"data.path={str(file)!r}: JSON nested too deeply to parse; export it as JSONL (one row per "
            "line: a bad line is one error row) or Parquet"
        ) from None
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
    values: list[Any] = doc

    def rows(start: int) -> Iterator[_Row]:
        return (_Row(i, values[i]) for i in range(start, len(values)))

    return _Source(str(file), file.stem, _fields_of(values), not values, rows, len(values))


# -- Parquet


@dataclass(frozen=True)
class _Shard:
    file: Path
    columns: list[str]  # the wanted columns this file has
    groups: list[int]  # rows per row group


def _read_parquet(path: Path, wanted: list[str]) -> _Source:
    """Parquet files; up front only their footers (schema, row counts) are read."""

    files = sorted(path.rglob("*.parquet")) if path.is_dir() else [path]
    if not files:
        raise DataError(
            f"data.path={str(path)!r}: a folder must contain .parquet files (found none); "
            "or point data.path at a .jsonl/.json file"
        )
    shards: list[_Shard] = []
    fields: list[str] = []
    for file in files:
        try:
            with _parquet_file(file) as pf:
                names = pf.schema_arrow.names
                groups = [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)]
        except Exception as e:  # pyarrow raises several types for unreadable/corrupt files
            raise DataError(f"data.path={str(path)!r}: cannot read Parquet file {file} ({e})") from None
        fields += [n for n in names if n not in fields]
        shards.append(_Shard(file, [c for c in wanted if c in names], groups))
    n_rows = sum(sum(s.groups) for s in shards)

    def rows(start: int) -> Iterator[_Row]:
        base = 0  # source position of the shard's first row
        for shard in shards:
            try:
                yield from _parquet_rows(shard, base, start)
            except Exception as e:  # a corrupt page or an I/O error past the footer
                raise DataError(
                    f"data.path={str(path)!r}: cannot read Parquet file {shard.file} ({e})"
                ) from None
            base += sum(shard.groups)

    stem = path.name if path.is_dir() else path.stem
    return _Source(str(path), stem, fields, n_rows == 0, rows, n_rows)


def _parquet_rows(shard: _Shard, base: int, start: int) -> Iterator[_Row]:
    """The rows of one file from source position `start` on, reading its wanted columns only and
    skipping whole row groups before `start`."""

    first, pos = 0, base
    while first < len(shard.groups) and pos + shard.groups[first] <= start:
        pos += shard.groups[first]  # a group entirely before `start`: not read
        first += 1
    picked = list(range(first, len(shard.groups)))
    if not picked:
        return
    with _parquet_file(shard.file) as pf:
        for batch in pf.iter_batches(batch_size=_BATCH_ROWS, row_groups=picked, columns=shard.columns):
            values = _arrow_rows(batch)
            for i in range(max(0, start - pos), len(values)):
                yield _Row(pos + i, values[i])
            pos += len(values)


@dataclass(frozen=True)
class _Undecodable:
    """A Parquet string cell whose bytes are not UTF-8 (writers other than pyarrow can make these)."""

    raw: bytes

    @property
    def reason(self) -> str:
        return f"not valid UTF-8 text in the file: {shorten(self.raw)}"


def _arrow_rows(batch: Any) -> list[dict[str, Any]]:
    """An Arrow record batch or table as row dicts; a string cell that is not UTF-8 spoils only its row."""
    try:
        return batch.to_pylist()
    except UnicodeDecodeError:
        return _decode_cell_by_cell(batch)


def _decode_cell_by_cell(batch: Any) -> list[dict[str, Any]]:
    """`batch.to_pylist()` where some string cells are not UTF-8: those cells become `_Undecodable`."""
    import pyarrow as pa

    columns: dict[str, list[Any]] = {}
    for name, column in zip(batch.schema.names, batch.columns, strict=True):
        try:
            columns[name] = column.to_pylist()
            continue
        except UnicodeDecodeError:
            pass
        cells: list[Any] = []
        for i in range(len(column)):
            try:
                cells.append(column[i].as_py())
            except UnicodeDecodeError:
                raw = column.slice(i, 1).cast(
                    pa.large_binary() if pa.types.is_large_string(column.type) else pa.binary()
                )
                cells.append(_Undecodable(raw[0].as_py()))
        columns[name] = cells
    return [dict(zip(columns, values, strict=True)) for values in zip(*columns.values(), strict=True)]


# -- Hugging Face


def _read_hf(cfg: DataConfig, wanted: list[str]) -> _Source:
    """`datasets.load_dataset` (memory-mapped Arrow); rows are read a batch at a time, wanted columns only."""
    name, subset, split = cfg.path, cfg.subset, cfg.split
    hint = "export it to JSONL or Parquet where it loads and point data.path at that file"
    try:
        import datasets  # type: ignore[import-not-found]
    except ImportError:
        raise DataError(
            f"data.path={name!r}: no such local file or folder, and the `datasets` package needed to load "
            f"it as a Hugging Face dataset is not installed (pip install datasets, or {hint}, or use "
            "embedded:gsm8k/test)"
        ) from None
    keys = ", ".join(
        f"data.{k}={v!r}"
        for k, v in (("path", name), ("subset", subset), ("split", split), ("revision", cfg.revision))
        if v
    )
    try:
        # Only what is set is passed: the library's own defaults otherwise (its only subset, "main").
        args = (name, subset) if subset else (name,)
        options = {"revision": cfg.revision} if cfg.revision else {}
        ds = datasets.load_dataset(*args, split=split, **options)
    except Exception as e:
        reason = " ".join(f"{type(e).__name__}: {e}".split())[:600]
        from gen_ssd_ray.common.models import hub_offline

        if hub_offline("HF_DATASETS_OFFLINE"):
            fix = (
                "HF_HUB_OFFLINE=1 and it is not in this node's datasets cache: run once where the hub is "
                f"reachable without HF_HUB_OFFLINE (it is then cached), or {hint}"
            )
        else:
            fix = (
                "check the name, set data.subset to one of the dataset's subsets (e.g. data.subset=main for "
                f"openai/gsm8k) and data.split to one of its splits, or {hint}"
            )
        raise DataError(
            f"{keys}: not a local file or folder, and loading it as a Hugging Face dataset failed "
            f"({reason}); {fix}"
        ) from None
    fields = list(getattr(ds, "column_names", None) or _fields_of(ds))
    n_rows = len(ds) if hasattr(ds, "__len__") else None
    columns = [c for c in wanted if c in fields]

    def rows(start: int) -> Iterator[_Row]:
        if hasattr(ds, "select_columns") and hasattr(ds, "iter") and n_rows is not None:
            if start >= n_rows:
                return
            view = ds.select_columns(columns).select(range(start, n_rows))  # views, no copy
            if hasattr(view, "with_format"):  # Arrow batches: a cell that is not UTF-8 spoils only its row
                view = view.with_format("arrow")
            pos = start
            for batch in view.iter(batch_size=_BATCH_ROWS):  # `columns` has the question field at least
                if not isinstance(batch, dict):  # an Arrow table
                    for value in _arrow_rows(batch):
                        yield _Row(pos, value)
                        pos += 1
                    continue
                for values in zip(*(batch[c] for c in columns), strict=True):
                    yield _Row(pos, dict(zip(columns, values, strict=True)))
                    pos += 1
        else:  # any other iterable of rows (an IterableDataset, a list)
            for i, value in islice(enumerate(ds), start, None):
                yield _Row(i, value)

    stem = "-".join(p for p in (name.rstrip("/").split("/")[-1], subset, split) if p)
    empty = n_rows == 0 if n_rows is not None else next(iter(ds), _NOTHING) is _NOTHING
    where = f"{name} ({subset}, {split})" if subset else f"{name} ({split})"
    return _Source(where, stem, fields, empty, rows, n_rows)


def _fields_of(values: Iterable[Any]) -> list[str]:
    seen: dict[str, None] = {}
    for v in values:
        if isinstance(v, dict):
            seen.update(dict.fromkeys(str(k) for k in v))
    return list(seen)


# ---- rows -> problems ----------------------------------------------------------------------------


def _check_fields(cfg: DataConfig, source: _Source) -> None:
    if source.empty:
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


def canonical_id(value: object) -> tuple[str | None, str | None]:
    """`(id, None)` for a usable `data.id_field` value, else `(None, what is wrong)`.

    The canonical id of a str is the str itself, verbatim (no stripping, no parsing: "1.0" stays "1.0");
    of a number it is the canonical number string (`gen_ssd_ray.core.answers.canonical_number`): an
    integer, or an integral float or Decimal, in plain decimal (1, 1.0, Decimal("1.00") and "1" are all
    "1"), any other finite float its shortest repr ("2.5"). Junk: None, empty or blank text, text UTF-8
    cannot encode, text starting with `FALLBACK_PREFIX` (reserved), bool, NaN, infinities, bytes, lists,
    dicts and any other type.
    """
    if value is None:
        return None, "missing (null or absent)"
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return None, f"a boolean ({value}), not an id"
    if isinstance(value, numbers.Number):
        number = canonical_number(value)
        if number is None:
            return None, parse_gold_answer(value)[1] or "not a finite real number"
        return number, None
    if isinstance(value, (bytes, bytearray)):
        return None, "bytes, not text"
    if not isinstance(value, str):
        return None, f"a {type(value).__name__}, not text or a number: {shorten(value)}"
    if not value.strip():
        return None, f"empty text: {shorten(value)}"
    if (bad := unencodable(value)) is not None:
        return None, bad
    if value.startswith(FALLBACK_PREFIX):
        return None, (
            f"{shorten(value)} starts with {FALLBACK_PREFIX!r}, which is reserved for the ids the loader gives "
            "rows without a usable id; rename it"
        )
    return value, None


class _Ids:
    """Unique ids, assigned in source order (so they do not depend on offset/limit).

    Without an id field: `<stem>-<index>`. With one: the canonical `id_field` value; a row whose id is
    junk or a duplicate (the first one wins) gets `FALLBACK_PREFIX + <stem>-<index>` and an error. No real
    id starts with `FALLBACK_PREFIX` (`canonical_id` refuses them) and the index is unique per row, so a
    fallback can neither collide with a real id nor with another fallback, in any order of the rows.
    Remembers every real id seen (to judge duplicates); fallbacks need no memory.
    """

    def __init__(self, id_field: str | None, stem: str) -> None:
        self.id_field = id_field
        self.stem = _writable(stem)
        self.first_row: dict[str, int] = {}

    def assign(self, row: _Row) -> tuple[str, str | None]:
        if self.id_field is None:
            return f"{self.stem}-{row.index}", None
        fallback = f"{FALLBACK_PREFIX}{self.stem}-{row.index}"
        if not isinstance(row.value, dict):
            return fallback, None  # the row itself is bad; its error says so
        value = row.value.get(self.id_field)
        pid, why = (None, value.reason) if isinstance(value, _Undecodable) else canonical_id(value)
        key = f"data.id_field={self.id_field!r}"
        if pid is None:
            return fallback, f"bad id in {key}: {why}"
        if pid in self.first_row:
            return fallback, f"duplicate id in {key}: {shorten(pid)} (first at row {self.first_row[pid]})"
        self.first_row[pid] = row.index
        return pid, None


def _to_problem(cfg: DataConfig, row: _Row, pid: str, id_error: str | None) -> Problem:
    """The row's `Problem`: the first of the id's, the question's and the gold answer's errors, if any;
    a value with an error is not carried (None), so every string in the problem is writable."""
    if row.error is not None:
        return Problem(pid, None, None, _writable(row.error))
    if not isinstance(row.value, dict):
        return Problem(pid, None, None, f"row is not an object (got {type(row.value).__name__})")
    question, q_error = _question(row.value.get(cfg.question_field))
    answer = row.value.get(cfg.answer_field)
    gold, a_error = (None, answer.reason) if isinstance(answer, _Undecodable) else parse_gold_answer(answer)
    errors = [
        id_error,
        q_error and f"bad question in data.question_field={cfg.question_field!r}: {q_error}",
        a_error and f"bad gold answer in data.answer_field={cfg.answer_field!r}: {a_error}",
    ]
    error = next((e for e in errors if e), None)
    return Problem(pid, question, gold, error)


def _question(value: object) -> tuple[str | None, str | None]:
    """`(question, None)`, or `(question or None, what is wrong)`: an empty question is kept as loaded."""
    if value is None:
        return None, "missing (null or absent)"
    if isinstance(value, _Undecodable):
        return None, value.reason
    if not isinstance(value, str):
        return None, f"not text (got {type(value).__name__})"
    if (bad := unencodable(value)) is not None:
        return None, bad
    if not value.strip():
        return value, "empty text"
    return value, None


def _writable(message: str) -> str:
    """`message` (or a stem) made writable: characters UTF-8 cannot encode are backslash-escaped."""
    return message.encode("utf-8", "backslashreplace").decode("utf-8")
