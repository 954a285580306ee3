"""The journal of accepted chunks (gen_ssd_ray.generate.journal) and the search's replay, with fake engines.

Checked: a search interrupted after any step, journaled through real segment bytes and replayed into a
fresh search, finishes with exactly the trajectory of an uninterrupted run (same chunks, scores,
tokens, costs) and asks the teacher only for the steps it had not done; its response begins with the
journaled tokens. The journal's segments merge, compact away committed problems and other configs'
entries, refuse a problem whose content changed, and a failed write keeps its steps.
"""

import json
from types import SimpleNamespace

import pytest

from gen_ssd_ray.core import ProblemSearch, SearchParams
from gen_ssd_ray.core.search import StepLog
from gen_ssd_ray.engines.fake import FakeScorer, FakeTeacher, InProcessActor, run_search
from gen_ssd_ray.generate.content import content_hash
from gen_ssd_ray.generate.journal import (
    Journal,
    JournalTarget,
    JournalWriter,
    decode_segment,
    encode_segment,
    segment_names,
)

GRID = [
    dict(chunk_tokens=4, num_candidates=3, max_new_tokens=12),
    dict(chunk_tokens=3, num_candidates=4, beam_width=2, max_new_tokens=14),
    dict(chunk_tokens=5, num_candidates=2, max_new_tokens=20, prune_ppl=4.0),
    dict(chunk_tokens=2, num_candidates=4, beam_width=3, max_new_tokens=9, prune_ppl=3.0),
]


def _search(knobs, seed):
    return ProblemSearch(SearchParams(**knobs), (101, 102, 103), (7, 8), group="p/t0", seed=seed)


def _steps(search, teacher, scorer, k):
    """Run `k` steps (or to the end) of `search`."""
    for _ in range(k):
        if search.done:
            break
        search.update_scored(scorer.score(search.update_expanded(teacher.expand(search.expand_requests()))))


def _through_bytes(logs):
    """Step logs as a segment's bytes and back (what a restore reads)."""
    line = {"steps": [s.to_dict() for s in logs]}
    (back,) = decode_segment(encode_segment([line]))
    return [StepLog.from_dict(d) for d in back["steps"]]


@pytest.mark.parametrize("knobs", GRID)
@pytest.mark.parametrize("eos_prob", [0.0, 0.08])
def test_replay_after_any_step_gives_the_uninterrupted_trajectory(knobs, eos_prob):
    for seed in (1, 7):
        whole_teacher = FakeTeacher(eos_prob=eos_prob)
        whole = run_search(_search(knobs, seed), whole_teacher, FakeScorer())
        total_steps = len({r.key.split("/")[2] for r in whole_teacher.calls})
        for k in range(total_steps + 1):
            first = _search(knobs, seed)
            _steps(first, FakeTeacher(eos_prob=eos_prob), FakeScorer(), k)
            logs = first.take_log()
            assert [s.step for s in logs] == list(range(len(logs)))
            assert first.take_log() == []  # taken once

            restored = _search(knobs, seed)
            restored.replay(_through_bytes(logs))
            assert restored.step == first.step and restored.teacher_tokens == first.teacher_tokens
            teacher = FakeTeacher(eos_prob=eos_prob)
            traj = run_search(restored, teacher, FakeScorer())
            assert traj == whole, (knobs, seed, k)
            # the teacher was asked only for the steps the journal did not hold
            assert {r.key.split("/")[2] for r in teacher.calls} == {
                f"s{i}" for i in range(len(logs), total_steps)
            }
            if knobs.get("beam_width", 1) == 1 and logs:
                journaled = sum((kept.token_ids for s in logs for kept in s.kept), ())
                assert traj.response_token_ids[: len(journaled)] == journaled


def test_replay_refuses_steps_that_do_not_follow():
    knobs = GRID[0]
    first = _search(knobs, 1)
    _steps(first, FakeTeacher(), FakeScorer(), 3)
    logs = first.take_log()
    with pytest.raises(ValueError, match="does not follow"):
        _search(knobs, 1).replay(logs[1:])
    other_width = _search(GRID[1], 1)
    with pytest.raises(ValueError):
        other_width.replay(logs + logs[:1])


def _problem(pid, question="q"):
    return SimpleNamespace(problem_id=pid, question=question, gold_answer="1")


def _logs(pid, k, seed=3):
    search = ProblemSearch(SearchParams(**GRID[0]), (1, 2), (3,), group=f"{pid}/t0", seed=seed)
    _steps(search, FakeTeacher(), FakeScorer(), k)
    return [s.to_dict() for s in search.take_log()]


def test_writer_segments_merge_compact_and_restore(tmp_path):
    out = str(tmp_path / "out")
    target = JournalTarget(out, "fp1", 30.0)
    w = JournalWriter(target)
    a, b, c = _problem("a"), _problem("b"), _problem("c")
    steps_a, steps_b = _logs("a", 3), _logs("b", 2)
    # two flushes: a's steps 0-1 then 2 (append-only: two segment objects)
    w.record("a", content_hash(a), 0, steps_a[:2])
    w.record("b", content_hash(b), 0, steps_b)
    assert w.flush() > 0
    w.record("a", content_hash(a), 0, steps_a[2:])
    w.record("c", content_hash(c), 1, _logs("c", 1))
    w.flush()
    assert w.flush() == 0  # nothing new: no empty segment
    assert w.stats()["segments"] == 2 and w.stats()["steps"] == 6
    # another config's entry: never restored
    other = JournalWriter(JournalTarget(out, "fp0", 30.0))
    other.record("a", content_hash(a), 1, _logs("a", 2))
    other.flush()
    assert len(segment_names(w.storage)) == 3

    j = Journal.open(out, "fp1", committed=lambda pid: pid == "c", interval_s=30.0)
    names = segment_names(w.storage)
    assert len(names) == 1 and "/compact-" in names[0]  # one compacted segment, the old ones deleted
    lines = decode_segment(w.storage.read_bytes(names[0]))
    assert sorted((x["p"], x["t"], len(x["steps"])) for x in lines) == [("a", 0, 3), ("b", 0, 2)]

    got = j.take(a)
    assert list(got) == [0] and got[0] == json.loads(json.dumps(steps_a))
    assert j.take(a) == got  # kept for a retry, counted once
    assert j.take(_problem("b", question="changed")) is None  # content changed: not restored
    assert j.take(c) is None
    assert j.counters() == {
        "resume/trajectories_restored": 1,
        "resume/teacher_tokens_restored": steps_a[-1]["counters"][0],
    }
    j.done("a")
    assert j.take(a) is None

    # the end of a run: committed problems' steps are compacted away
    j.finish({"a", "b"})
    assert segment_names(w.storage) == []


def test_restore_takes_only_consecutive_steps(tmp_path):
    out = str(tmp_path / "out")
    w = JournalWriter(JournalTarget(out, "fp", 1.0))
    a = _problem("a")
    steps = _logs("a", 3)
    w.record("a", content_hash(a), 0, [steps[0], steps[2]])  # step 1 missing
    w.flush()
    j = Journal.open(out, "fp", committed=lambda pid: False, interval_s=1.0)
    assert [s["step"] for s in j.take(a)[0]] == [0]


def test_failed_write_keeps_steps_and_temp_files_are_not_segments(tmp_path, monkeypatch):
    out = tmp_path / "out"
    w = JournalWriter(JournalTarget(str(out), "fp", 1.0))
    a = _problem("a")
    steps = _logs("a", 2)
    w.record("a", content_hash(a), 0, steps[:1])

    def broken(name, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(w.storage, "write_bytes", broken)
    with pytest.raises(OSError):
        w.flush()
    monkeypatch.undo()
    w.record("a", content_hash(a), 0, steps[1:])
    w.flush()
    (out / "_journal" / ".tmp-seg-1.jsonl.gz").write_bytes(b"partial")
    j = Journal.open(str(out), "fp", committed=lambda pid: False, interval_s=1.0)
    assert [s["step"] for s in j.take(a)[0]] == [0, 1]


def test_unreadable_segment_is_skipped(tmp_path):
    out = tmp_path / "out"
    w = JournalWriter(JournalTarget(str(out), "fp", 1.0))
    a = _problem("a")
    w.record("a", content_hash(a), 0, _logs("a", 1))
    w.flush()
    (out / "_journal" / "seg-00000000000000000001-bad.jsonl.gz").write_bytes(b"not gzip")
    j = Journal.open(str(out), "fp", committed=lambda pid: False, interval_s=1.0)
    assert len(j.take(a)[0]) == 1


# ---- the beam manager: journaling and restoring through its real code, with fake engine actors ------


def _manager(teacher, scorer):
    from gen_ssd_ray.common.config import PromptConfig
    from gen_ssd_ray.common.models import resolve_model
    from gen_ssd_ray.generate.manager import BeamManager, ManagerSpec

    path = resolve_model("embedded:teacher")
    spec = ManagerSpec(
        teacher_path=path,
        student_path=path,
        teacher_name="t",
        student_name="s",
        params=SearchParams(chunk_tokens=4, num_candidates=3, max_new_tokens=24),
        prompt=PromptConfig(),
        trajectories=2,
        seed=5,
        teacher_max_len=4096,
        call_timeout_s=30.0,
        fingerprint="fp",
    )
    return BeamManager(spec, [InProcessActor(teacher)], [InProcessActor(scorer)])


def test_manager_restores_journaled_steps_to_the_uninterrupted_rows(tmp_path):
    import asyncio

    from gen_ssd_ray.common.data import Problem

    problem = Problem("p1", "What is 2 + 3?", "5")
    target = JournalTarget(str(tmp_path / "out"), "fp", 3600.0)

    whole_teacher = FakeTeacher()
    whole = asyncio.run(_manager(whole_teacher, FakeScorer()).solve(problem, 0))

    # a run that journals, then "dies" after a flush mid-way: simulated by journaling a run whose
    # teacher stops answering after 7 expansions (the search state stays at its last step)
    class Dying(FakeTeacher):
        def expand(self, requests):
            if len(self.calls) >= 7:
                raise RuntimeError("killed")
            return super().expand(requests)

    dying = _manager(Dying(), FakeScorer())

    async def run_and_flush():
        try:
            await dying.solve(problem, 0, None, target)
        except Exception:
            pass
        return await dying.flush_journal()

    assert asyncio.run(run_and_flush()) > 0

    journal = Journal.open(target.uri, "fp", committed=lambda pid: False, interval_s=3600.0)
    restore = journal.take(problem)
    assert sorted(restore) == [0, 1] and sum(len(s) for s in restore.values()) > 0
    resumed_teacher = FakeTeacher()
    rows = asyncio.run(_manager(resumed_teacher, FakeScorer()).solve(problem, 0, restore, target))
    assert rows == whole
    assert len(resumed_teacher.calls) == len(whole_teacher.calls) - sum(len(s) for s in restore.values())
    assert journal.counters()["resume/teacher_tokens_restored"] == sum(
        s[-1]["counters"][0] for s in restore.values()
    )


def test_journal_interval_config():
    from gen_ssd_ray.common.config import ConfigError, load_config
    from gen_ssd_ray.generate.config import GenerateConfig

    with pytest.raises(ConfigError, match="runtime.journal_interval_s"):
        load_config(None, ["runtime.journal_interval_s=-1"], GenerateConfig)
    cfg = load_config(
        None,
        [
            "teacher.backend=sim",
            "student.backend=sim",
            "sim.time_compression=4",
            "runtime.journal_interval_s=20",
        ],
        GenerateConfig,
    )
    assert cfg.effective().runtime.journal_interval_s == 5.0  # simulated seconds, like the deadlines


def test_a_retry_replaces_a_failed_attempts_later_steps(tmp_path):
    """Attempt 1 journaled steps 0-3; a retry restored at step 2 journaled other steps 2 (real engines
    are not batch-invariant): the state is 0-1 of attempt 1 and 2 of attempt 2, never attempt 1's 3,
    even when attempt 1's write lands last; a compaction keeps that resolution."""
    out = str(tmp_path / "out")
    a = _problem("a")
    first, other = _logs("a", 4, seed=3), _logs("a", 4, seed=4)
    w = JournalWriter(JournalTarget(out, "fp", 1.0))
    w.record("a", content_hash(a), 0, other[2:3], attempt="0002", base=2)
    w.flush()
    w.record("a", content_hash(a), 0, first[:4], attempt="0001", base=0)  # the old attempt, written late
    w.flush()
    want = first[:2] + other[2:3]
    j = Journal.open(out, "fp", committed=lambda pid: False, interval_s=1.0)
    assert j.take(a)[0] == want
    # after the compaction, a late write of the old attempt still cannot override the retry
    w.record("a", content_hash(a), 0, first[3:4], attempt="0001", base=0)
    w.flush()
    j = Journal.open(out, "fp", committed=lambda pid: False, interval_s=1.0)
    assert j.take(a)[0] == want
