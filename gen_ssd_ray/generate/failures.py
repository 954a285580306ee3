"""Per-problem infrastructure failures, counted across attempts and runs, kept next to the output.

Contract:

- `FailureLedger(out_dir, limit)` reads `<out_dir>/_failures.json` (`FAILURES_NAME`; its leading "_"
  hides it from Parquet readers) and counts, per problem id, the infrastructure failures of its
  attempts (a dead beam manager, engines unavailable, a missed deadline): `count` and `last_error`.
  A failure is counted against every problem it hit, so a count alone does not tell a problem that
  kills its manager from a bystander that was in flight on it: the job confirms a problem at the limit
  alone before blaming it (gen_ssd_ray.generate.solve).
- `record(problem_id, error)` adds one failure and returns the new count; `at_limit(id)` says whether
  the count reached `limit` (`runtime.max_problem_failures`; 0: never). `forget(id)` drops a problem
  once it is committed.
- The folder is a local path or an object-store URI (gen_ssd_ray.common.storage): the file is read and
  written through `Storage`, whole (locally temp file + fsync + rename, on an object store one PUT).
- Saving: `save()` writes the whole file atomically when something changed;
  `maybe_save()` at most every `save_every_s` seconds (a node loss fails thousands of problems at
  once: one write, not thousands), and at most every second while problems reach the limit. A kill
  loses at most the last `save_every_s` seconds of counts, never the file.
- A file that cannot be read or parsed is moved aside (`_failures.json.corrupt-<time>`, a copy then a
  delete on an object store) with a
  warning and counting starts again: the counts are advice for giving up, never data.

Only the generation job's writer (which holds the folder's lock) uses it: no locking here.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import time
from pathlib import Path

from gen_ssd_ray.common.fsio import atomic_write_json
from gen_ssd_ray.common.storage import Storage

log = logging.getLogger("gen_ssd_ray")

FAILURES_NAME = "_failures.json"
FAILURES_VERSION = 1
# A problem reaching the limit is saved within this many seconds (not every save_every_s).
_AT_LIMIT_SAVE_S = 1.0


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


class FailureLedger:
    def __init__(self, out_dir: str | Path, limit: int, save_every_s: float = 5.0):
        self.storage = Storage(str(out_dir), key="output.dir")
        self.path = self.storage.uri_of(FAILURES_NAME)  # for messages
        self.limit, self.save_every_s = limit, save_every_s
        self.problems: dict[str, dict] = self._load()
        self._dirty, self._saved_at = False, time.monotonic()

    def _load(self) -> dict[str, dict]:
        try:
            data = json.loads(self.storage.read_bytes(FAILURES_NAME))
            problems = data["problems"]
            if data.get("version") != FAILURES_VERSION or not isinstance(problems, dict):
                raise ValueError(f"not a version-{FAILURES_VERSION} failure ledger")
            for pid, e in problems.items():
                if not (isinstance(e, dict) and isinstance(e.get("count"), int)):
                    raise ValueError(f"bad entry for problem {pid!r}")
            return problems
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, KeyError, TypeError) as e:
            aside = f"{FAILURES_NAME}.corrupt-{_dt.datetime.now(_dt.UTC):%Y%m%dT%H%M%S}"
            log.warning(
                "%s is unreadable (%s); moved to %s, failure counts start again",
                self.path,
                e,
                self.storage.uri_of(aside),
            )
            try:
                if self.storage.remote:  # no rename on an object store
                    self.storage.write_bytes(aside, self.storage.read_bytes(FAILURES_NAME))
                    self.storage.delete(FAILURES_NAME)
                else:
                    Path(self.storage.uri_of(FAILURES_NAME)).replace(self.storage.uri_of(aside))
            except OSError:
                pass
            return {}

    def count(self, problem_id: str) -> int:
        e = self.problems.get(problem_id)
        return e["count"] if e else 0

    def at_limit(self, problem_id: str) -> bool:
        return self.limit > 0 and self.count(problem_id) >= self.limit

    def last_error(self, problem_id: str) -> str:
        e = self.problems.get(problem_id)
        return (e or {}).get("last_error") or ""

    def record(self, problem_id: str, error: str) -> int:
        e = self.problems.setdefault(problem_id, {"count": 0})
        e["count"] += 1
        e["last_error"], e["updated"] = error, _now()
        self._dirty = True
        # A problem at the limit is written soon (at most one write a second however many reach it
        # together: a lost node fails every problem it held at once); the others every save_every_s.
        self.maybe_save(min(self.save_every_s, _AT_LIMIT_SAVE_S) if self.at_limit(problem_id) else None)
        return e["count"]

    def forget(self, problem_id: str) -> None:
        if self.problems.pop(problem_id, None) is not None:
            self._dirty = True

    def maybe_save(self, every_s: float | None = None) -> None:
        every_s = self.save_every_s if every_s is None else every_s
        if self._dirty and time.monotonic() - self._saved_at >= every_s:
            self.save()

    def save(self) -> None:
        if not self._dirty:
            return
        try:
            data = {"version": FAILURES_VERSION, "problems": self.problems}
            if self.storage.remote:
                self.storage.write_json(FAILURES_NAME, data)
            else:
                atomic_write_json(self.path, data)
        except OSError as e:  # advice only: a full disk must not hide the job's own outcome
            log.warning("cannot write %s (%s); failure counts of this run may be lost", self.path, e)
            return
        self._dirty, self._saved_at = False, time.monotonic()
