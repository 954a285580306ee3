"""The journal of accepted chunks: in-flight trajectories survive a preemption, losing at most a chunk.

A problem is committed only when all its trajectories finish; without a journal a kill throws away
every trajectory in flight. Here each completed search step (gen_ssd_ray.core.search.StepLog: the
step's scored candidates, the kept children's token ids and scores, the cost counters after it) is
appended to the output folder's `_journal/` (through gen_ssd_ray.common.storage: a local folder or an
object store), and a resubmitted job replays each journaled trajectory to its last step and continues
it. Per-request seeds are a pure function of (run seed, problem, trajectory, step, beam), so a restored
trajectory samples what it would have sampled uninterrupted.

What it knows:
- Segments. `_journal/` holds gzip'd JSON-lines objects, each line one trajectory's new steps
  (`{"fp": fingerprint, "p": problem id, "h": content hash, "t": trajectory index, "r": attempt,
  "b": its first step, "steps": [...]}`).
  Object stores have no append: every write is a new object (`seg-<ns>-<rand>.jsonl.gz`), never
  rewritten. Names under `_` keep Parquet readers away; unfinished local temp files (`.tmp-*`) are
  ignored.
- `JournalWriter` (one per beam manager and output folder): `record(...)` buffers steps in memory,
  `flush()` writes them as one segment. The manager flushes every `runtime.journal_interval_s` and when
  the driver stops (SIGTERM: `BeamManager.flush_journal`), so a kill loses at most the steps of one
  interval, plus each trajectory's step in progress.
- `Journal` (the driver's): `open(...)` reads every segment, keeps the latest state of trajectories of
  uncommitted problems written under this run's config fingerprint, writes them back as one compacted
  segment and deletes the segments it read (in that order: a kill in between leaves duplicates, which
  merge). `take(problem)` hands a problem's journaled trajectories to its first dispatch, unless the
  problem's content hash changed; the counters `resume/trajectories_restored` and
  `resume/teacher_tokens_restored` go into the run's summary. `maybe_compact(...)` is the same
  compaction during the run in a background thread (committed problems' steps are dropped), only when
  more than 64 segments piled up and at most once per 64 intervals (it reads the whole journal);
  `finish(committed)` compacts at the end of a run (a finished run leaves an empty journal).
- Attempts and merging: each line also names its attempt (`"r"`: when the manager's `solve` call
  started, then a random tag, so attempts sort by start) and the step that attempt started from
  (`"b"`: 0, or the journaled steps it restored). A trajectory's state is its attempts replayed oldest
  first, each dropping the steps at and after its start and adding its own: a retry's steps never mix
  with a failed attempt's later ones (real engines are not batch-invariant, so the two can differ),
  and a late write of an old attempt cannot override a newer one. A compacted line is its
  trajectory's resolved steps under its newest attempt, from step 0. A restore takes the steps 0..k
  that are all present.

What it does not know: how a step changes the search state (gen_ssd_ray.core.search), Ray, Parquet.
"""

from __future__ import annotations

import gzip
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from gen_ssd_ray.common.storage import Storage

log = logging.getLogger("gen_ssd_ray")

JOURNAL_DIR = "_journal"
_SUFFIX = ".jsonl.gz"


@dataclass(frozen=True)
class JournalTarget:
    """Where and how a manager journals one run's trajectories (sent with each problem)."""

    uri: str  # the output folder
    fingerprint: str
    interval_s: float


def encode_segment(lines: Iterable[dict]) -> bytes:
    body = "".join(json.dumps(line, separators=(",", ":")) + "\n" for line in lines)
    return gzip.compress(body.encode(), compresslevel=1)


def decode_segment(data: bytes) -> list[dict]:
    return [json.loads(line) for line in gzip.decompress(data).decode().splitlines() if line.strip()]


def segment_names(storage: Storage) -> list[str]:
    """The journal's complete segments, oldest first (temp files of an interrupted local write are
    not segments)."""
    names = [
        n
        for n in storage.list(JOURNAL_DIR)
        if n.endswith(_SUFFIX) and not n.rsplit("/", 1)[-1].startswith(".")
    ]
    return sorted(names, key=lambda n: n.rsplit("/", 1)[-1].split("-", 1)[-1])


def _new_name(kind: str) -> str:
    return f"{JOURNAL_DIR}/{kind}-{time.time_ns():020d}-{uuid.uuid4().hex[:12]}{_SUFFIX}"


def _write(storage: Storage, name: str, data: bytes) -> None:
    if not storage.remote:
        storage.local_path.joinpath(JOURNAL_DIR).mkdir(parents=True, exist_ok=True)
    storage.write_bytes(name, data)


class JournalWriter:
    """Buffers a manager's completed steps and writes them as new segments (see the module doc).

    Thread-safe: `record` runs on the manager's event loop, `flush` in a worker thread."""

    def __init__(self, target: JournalTarget):
        self.target = target
        self.storage = Storage(target.uri)
        self._lock = threading.Lock()
        self._pending: dict[tuple[str, int, str], dict] = {}
        self.last_flush = time.monotonic()
        self.bytes_written = 0
        self.segments_written = 0
        self.steps_written = 0

    def record(
        self,
        problem_id: str,
        content_hash: str,
        index: int,
        steps: list[dict],
        attempt: str = "",
        base: int = 0,
    ) -> None:
        """Buffer completed steps of trajectory `index` of a problem, from the attempt `attempt` that
        started at step `base` (see the module doc)."""
        if not steps:
            return
        with self._lock:
            key = (problem_id, index, attempt)
            line = self._pending.get(key)
            if line is None:
                line = self._pending[key] = {
                    "fp": self.target.fingerprint,
                    "p": problem_id,
                    "h": content_hash,
                    "t": index,
                    "r": attempt,
                    "b": base,
                    "steps": [],
                }
            line["steps"].extend(steps)

    def due(self) -> bool:
        return time.monotonic() - self.last_flush >= self.target.interval_s

    @property
    def pending(self) -> int:
        return len(self._pending)

    def flush(self) -> int:
        """Write the buffered steps as one new segment; returns its size (0: nothing to write). A failed
        write keeps them buffered for the next flush (and raises)."""
        with self._lock:
            lines, self._pending = self._pending, {}
            self.last_flush = time.monotonic()
        if not lines:
            return 0
        data = encode_segment(lines.values())
        try:
            _write(self.storage, _new_name("seg"), data)
        except BaseException:
            with self._lock:  # put them back in front of anything recorded meanwhile
                for key, line in lines.items():
                    newer = self._pending.get(key)
                    if newer is not None:
                        line["steps"].extend(newer["steps"])
                    self._pending[key] = line
            raise
        self.bytes_written += len(data)
        self.segments_written += 1
        self.steps_written += sum(len(line["steps"]) for line in lines.values())
        return len(data)

    def stats(self) -> dict[str, int]:
        return {
            "bytes": self.bytes_written,
            "segments": self.segments_written,
            "steps": self.steps_written,
        }


@dataclass
class _Entry:
    """One journaled trajectory: its problem's content hash and, per attempt, the step it started
    from and its steps by number."""

    content_hash: str
    attempts: dict[str, tuple[int, dict[int, dict]]] = field(default_factory=dict)

    def add(self, attempt: str, base: int, steps: list[dict]) -> None:
        first, own = self.attempts.get(attempt, (base, {}))
        for step in steps:
            own[int(step["step"])] = step
        self.attempts[attempt] = (min(first, base), own)

    @property
    def newest(self) -> str:
        return max(self.attempts)

    def consecutive(self) -> list[dict]:
        """Steps 0..k of the attempts replayed oldest first (each replaces the steps from its start)."""
        steps: dict[int, dict] = {}
        for attempt in sorted(self.attempts):
            base, own = self.attempts[attempt]
            steps = {i: s for i, s in steps.items() if i < base}
            steps.update((i, s) for i, s in own.items() if i >= base)
        out, i = [], 0
        while i in steps:
            out.append(steps[i])
            i += 1
        return out


def _merge(storage: Storage, names: list[str], fingerprint: str, keep: Callable[[str], bool]):
    """Segments `names` merged: {problem id: {trajectory index: _Entry}}, only this fingerprint's
    trajectories of problems `keep` accepts; and how many lines were dropped."""
    merged: dict[str, dict[int, _Entry]] = {}
    dropped = 0
    for name in names:
        try:
            lines = decode_segment(storage.read_bytes(name))
        except FileNotFoundError:  # deleted by a compaction meanwhile: its content is in a newer one
            continue
        except (OSError, ValueError, EOFError) as e:  # a damaged segment: its steps are redone
            log.warning("journal segment %s is unreadable (%s); its steps will be regenerated", name, e)
            continue
        for line in lines:
            if line.get("fp") != fingerprint or not keep(line["p"]):
                dropped += 1
                continue
            traj = merged.setdefault(line["p"], {})
            entry = traj.get(int(line["t"]))
            if entry is None or entry.content_hash != line["h"]:
                entry = traj[int(line["t"])] = _Entry(line["h"])
            entry.add(str(line.get("r", "")), int(line.get("b", 0)), line["steps"])
    return merged, dropped


def _compacted_lines(merged: dict[str, dict[int, _Entry]], fingerprint: str) -> list[dict]:
    """One line per trajectory with steps: its resolved steps from 0, under its newest attempt."""
    return [
        {
            "fp": fingerprint,
            "p": pid,
            "h": e.content_hash,
            "t": t,
            "r": e.newest,
            "b": 0,
            "steps": e.consecutive(),
        }
        for pid, trajs in merged.items()
        for t, e in sorted(trajs.items())
        if e.consecutive()
    ]


class Journal:
    """The driver's view of the journal: restore states at open, counters, compaction."""

    def __init__(self, storage: Storage, fingerprint: str, interval_s: float, max_segments: int = 64):
        self.storage = storage
        self.fingerprint = fingerprint
        self.interval_s = interval_s
        self.max_segments = max_segments
        self._restore: dict[str, dict[int, _Entry]] = {}
        self._counted: set[str] = set()
        self.trajectories_restored = 0
        self.teacher_tokens_restored = 0
        self.compactions = 0
        self._last_compaction = time.monotonic()
        self._compacting: threading.Thread | None = None

    @property
    def target(self) -> JournalTarget:
        return JournalTarget(self.storage.uri, self.fingerprint, self.interval_s)

    @classmethod
    def open(cls, uri: str, fingerprint: str, committed: Callable[[str], bool], interval_s: float) -> Journal:
        """Load the journal of a resumed run (nothing for a new one) and compact it (module doc)."""
        j = cls(Storage(uri), fingerprint, interval_s)
        j._restore = j._compact(lambda pid: not committed(pid))
        if j._restore:
            log.info(
                "journal: %d in-flight trajectories of %d problems to restore",
                sum(len(t) for t in j._restore.values()),
                len(j._restore),
            )
        return j

    def _compact(self, keep: Callable[[str], bool]) -> dict[str, dict[int, _Entry]]:
        """Merge every segment, write the kept trajectories as one segment, delete the ones read."""
        names = segment_names(self.storage)
        if not names:
            return {}
        merged, dropped = _merge(self.storage, names, self.fingerprint, keep)
        lines = _compacted_lines(merged, self.fingerprint)
        if lines:
            _write(self.storage, _new_name("compact"), encode_segment(lines))
        for name in names:
            self.storage.delete(name)
        self.compactions += 1
        if dropped:
            log.info("journal: compacted away %d entries (committed problems or another config)", dropped)
        return merged

    def take(self, problem) -> dict[int, list[dict]] | None:
        """The journaled steps of `problem`'s trajectories ({index: steps}) if its content is the
        journaled one (None if there are none); kept for a retry until `done`, counted once."""
        from gen_ssd_ray.generate.content import content_hash

        pid = problem.problem_id
        trajs = self._restore.get(pid)
        if not trajs:
            return None
        h = content_hash(problem)
        out = {t: e.consecutive() for t, e in trajs.items() if e.content_hash == h and e.consecutive()}
        if not out:
            self._restore.pop(pid, None)
            return None
        if pid not in self._counted:
            self._counted.add(pid)
            self.trajectories_restored += len(out)
            self.teacher_tokens_restored += sum(int(steps[-1]["counters"][0]) for steps in out.values())
        return out

    def done(self, problem_id: str) -> None:
        """The problem finished: its restore state is no longer needed in memory."""
        self._restore.pop(problem_id, None)

    def maybe_compact(self, committed_ids: Callable[[], set[str]]) -> bool:
        """Start a compaction in a background thread if segments piled up (more than `max_segments`),
        at most once per `max_segments` intervals (it reads the whole journal). Returns whether one
        started."""
        if self._compacting is not None and self._compacting.is_alive():
            return False
        # a compaction reads the whole journal: at most once per `max_segments` intervals
        if time.monotonic() - self._last_compaction < max(self.interval_s * self.max_segments, 1.0):
            return False
        self._last_compaction = time.monotonic()
        try:
            if len(segment_names(self.storage)) <= self.max_segments:
                return False
        except OSError as e:
            log.warning("journal: cannot list %s (%s)", self.storage.uri, e)
            return False
        done = committed_ids()

        def run() -> None:
            try:
                self._compact(lambda pid: pid not in done)
            except Exception as e:  # the journal is an optimisation: the run goes on without it
                log.warning("journal: compaction failed (%s: %s)", type(e).__name__, e)

        self._compacting = threading.Thread(target=run, name="journal-compaction", daemon=True)
        self._compacting.start()
        return True

    def finish(self, committed_ids: set[str]) -> None:
        """At the end of a run (after the managers flushed and the last shard was committed): drop
        committed problems' steps, keep the rest for the next run."""
        if self._compacting is not None:
            self._compacting.join(timeout=60)
        try:
            self._compact(lambda pid: pid not in committed_ids)
        except Exception as e:
            log.warning("journal: final compaction failed (%s: %s)", type(e).__name__, e)

    def counters(self) -> dict[str, Any]:
        return {
            "resume/trajectories_restored": self.trajectories_restored,
            "resume/teacher_tokens_restored": self.teacher_tokens_restored,
        }


__all__ = [
    "JOURNAL_DIR",
    "Journal",
    "JournalTarget",
    "JournalWriter",
    "decode_segment",
    "encode_segment",
    "segment_names",
]
