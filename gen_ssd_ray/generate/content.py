"""A problem's identity is its content: the hash committed with its rows, and the check on resume.

- `content_hash(problem)`: `Problem.content_hash` (gen_ssd_ray.common.data, the one definition),
  computed by the same function for a problem-like object that does not carry it.
- `changed_problems(problems, recorded)`: the ids whose content differs from the hash recorded when
  they were committed (`ShardWriter.content_hashes`; problems committed without a hash, by a version
  before hashes existed, are never reported).
- `check_resume(cfg, problems, writer)`: the generation job's check before anything starts. A resume
  over changed content is refused (`ContentChangedError`, exit 2: how many changed, a few ids, and the
  fix); with `output.force=true` exactly the changed problems are redone (`ShardWriter.redo`: their
  old rows stop counting once the new ones are committed, gen_ssd_ray.generate.output).

One pass over the data, only when the folder has recorded hashes: O(problems) time, O(committed)
memory for the recorded hashes.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

from gen_ssd_ray.common.data import content_hash as data_content_hash
from gen_ssd_ray.common.errors import InputError

log = logging.getLogger("gen_ssd_ray")


class ContentChangedError(InputError):
    """Committed problems whose data changed since they were generated."""


def content_hash(problem) -> str:
    """The problem's own `content_hash`, or gen_ssd_ray.common.data.content_hash of its id, question
    and gold answer when it carries none."""
    own = getattr(problem, "content_hash", None)
    if isinstance(own, str) and own:
        return own
    return data_content_hash(problem.problem_id, problem.question, problem.gold_answer)


def changed_problems(problems: Iterable, recorded: Mapping[str, str]) -> list[str]:
    """Ids of `problems` committed with a hash (`recorded`) that their content no longer has."""
    if not recorded:
        return []
    out = []
    for q in problems:
        h = recorded.get(q.problem_id)
        if h is not None and h != content_hash(q):
            out.append(q.problem_id)
    return out


def check_resume(cfg, problems: Iterable, writer) -> list[str]:
    """Refuse a resume over changed content, or (output.force) mark the changed problems for redoing.
    Returns the ids redone."""
    changed = changed_problems(problems, writer.content_hashes)
    if not changed:
        return []
    sample = ", ".join(repr(i) for i in changed[:3]) + (", ..." if len(changed) > 3 else "")
    if not cfg.output.force:
        raise ContentChangedError(
            f"{len(changed)} problems committed in output.dir={cfg.output.dir!r} have other content in "
            f"data.path={cfg.data.path!r} now (ids {sample}): pass output.force=true to generate exactly "
            "those again (their old rows stop counting), or use another output.dir"
        )
    log.warning(
        "%d committed problems changed content (ids %s); generating them again (output.force=true)",
        len(changed),
        sample,
    )
    writer.redo(changed)
    return changed
