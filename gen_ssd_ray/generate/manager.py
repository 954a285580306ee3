"""BeamManager: an async actor that runs many problems' search state machines concurrently.

Each `solve(problem, engine)` call is one coroutine: it renders the prompts (teacher and student
chat templates), runs every trajectory's `ProblemSearch` against its pinned teacher engine and a
scorer, and returns the problem's output rows (correctness is filled in by the driver's verifier).
Thousands of calls can be in flight on one manager; the driver bounds admission.

Failure handling (teacher engines and scorers alike, gen_ssd_ray.generate.health): a dead actor or a
dead engine core moves the step to the next engine at once (the search state only advances on
success, so a retry is exact) and the engine cools down, then is probed with real work (`ping`)
before it gets work again. When no engine of a pool is usable (all restarting, a node lost) the step
waits for one, keeping the problem's search state, up to `pool_wait_s`; then the problem fails
(EnginesUnavailable) and the driver retries it later with backoff. `runtime.call_timeout_s` detects hung engines, not slow ones: a call past it
asks the engine for its progress counter, keeps waiting while the engine advances (it is busy, not
hung) and gives up only when it does not. A problem whose prompt does not fit becomes an error row.

Resume (gen_ssd_ray.generate.journal): with a `JournalTarget`, every completed step of every trajectory
is buffered and written to the output's journal every `interval_s` (a background task) and on
`flush_journal()` (the driver's stop path); `solve(..., restore=...)` replays journaled steps first, so a
restored trajectory skips the teacher calls of its journaled chunks and continues with the same seeds.

Metrics (gen_ssd_ray.generate.metrics): every chunk round of a trajectory (chunks, teacher and scorer
tokens, cache hit rates) and every solved problem (its seconds) is recorded for the Ray dashboard.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
import uuid
from dataclasses import asdict, dataclass, replace
from typing import Any

from gen_ssd_ray.common.config import PromptConfig
from gen_ssd_ray.common.data import Problem
from gen_ssd_ray.common.prompts import RenderedPrompt, chat_messages, render_prompt
from gen_ssd_ray.core.answers import extract_final_answer
from gen_ssd_ray.core.search import ProblemSearch, SearchParams
from gen_ssd_ray.core.types import Trajectory
from gen_ssd_ray.generate.config import GenerateConfig, run_fingerprint, search_params
from gen_ssd_ray.generate.rows import ERROR, TrajectoryRow, conversation

log = logging.getLogger("gen_ssd_ray")

# A folder in the managers' environment: each manager keeps the teacher tokens it received in its own
# small file there (rewritten per expansion), so a benchmark can count the work of a SIGKILLed run.
TEACHER_TOKENS_ENV = "GEN_SSD_TEACHER_TOKENS_DIR"


@dataclass(frozen=True)
class ManagerSpec:
    teacher_path: str
    student_path: str
    teacher_name: str
    student_name: str
    params: SearchParams
    prompt: PromptConfig
    trajectories: int
    seed: int
    teacher_max_len: int
    call_timeout_s: float
    fingerprint: str
    # First cooldown of a failed engine (doubles per consecutive failure, up to 32x).
    cooldown_s: float = 10.0
    # A late call whose engine advances is waited for up to this many call_timeout_s (1: hard deadline).
    late_call_limit: float = 4.0
    pool_health: bool = True
    # How long a step waits for a pool with no usable engine (all restarting, a node lost) before the
    # problem fails to the driver (which retries it with backoff, from scratch): waiting keeps the
    # search state, so an outage as long as a restart costs no work. From the config:
    # min(retry_window_s, max(4 x call_timeout_s, startup_timeout_s)).
    pool_wait_s: float = 2400.0
    # Liveness deadline of a probe: a restarted actor loads its model before it answers, so as long
    # as a start-up may take (a hung engine's probe fails after it and the engine stays out meanwhile).
    probe_timeout_s: float = 900.0
    trust_remote_code_teacher: bool = False
    trust_remote_code_student: bool = False
    method: str = "gen_ssd"
    # Dashboard metrics (gen_ssd_ray.generate.metrics): on or off, and their `output` tag.
    metrics: bool = True
    output: str = ""

    @classmethod
    def from_config(cls, cfg: GenerateConfig, teacher_path: str, student_path: str) -> ManagerSpec:
        return cls(
            teacher_path=teacher_path,
            student_path=student_path,
            teacher_name=cfg.teacher.model,
            student_name=cfg.student.model,
            params=search_params(cfg),
            prompt=cfg.prompt,
            trajectories=cfg.search.trajectories_per_problem,
            seed=cfg.search.seed,
            teacher_max_len=cfg.teacher.max_model_len,
            call_timeout_s=cfg.runtime.call_timeout_s,
            cooldown_s=cfg.runtime.engine_cooldown_s,
            late_call_limit=cfg.runtime.late_call_limit,
            pool_health=cfg.runtime.pool_health,
            pool_wait_s=min(
                cfg.runtime.retry_window_s, max(4 * cfg.runtime.call_timeout_s, cfg.runtime.startup_timeout_s)
            ),
            probe_timeout_s=max(cfg.runtime.call_timeout_s, cfg.runtime.startup_timeout_s),
            fingerprint=run_fingerprint(cfg, teacher_path, student_path),
            trust_remote_code_teacher=cfg.teacher.trust_remote_code,
            trust_remote_code_student=cfg.student.trust_remote_code,
            method=cfg.method,
            metrics=cfg.runtime.metrics,
            output=cfg.output.dir,
        )

    def sampling(self) -> dict[str, Any]:
        p = self.params
        return {
            "temperature": p.temperature,
            "top_p": p.top_p,
            "chunk_tokens": p.chunk_tokens,
            "num_candidates": p.num_candidates,
            "beam_width": p.beam_width,
            "max_new_tokens": p.max_new_tokens,
            "prune_ppl": p.prune_ppl,
        }


def trajectory_seed(base: int, problem_id: str, index: int) -> int:
    h = hashlib.blake2b(f"{base}/{problem_id}/{index}".encode(), digest_size=4).digest()
    return int.from_bytes(h, "big") & 0x7FFFFFFF


class EnginesUnavailable(RuntimeError):
    """Every engine of a pool failed or missed its deadline for one step."""


class PoolOutage(EnginesUnavailable):
    """No engine of a pool became usable within `pool_wait_s` (all restarting, a node lost): the step
    never ran, so the driver does not count it against the problem (gen_ssd_ray.generate.failures)."""


class EngineFailed(RuntimeError):
    """A call abandoned because another call found its engine failed (it moves to another engine)."""


class CallTooLate(TimeoutError):
    """A call whose engine still advances outlived `runtime.late_call_limit` deadlines: the engine
    is busy, not broken, so the other calls waiting on it keep waiting."""


class BeamManager:
    def __init__(self, spec: ManagerSpec, teachers: list, scorers: list):
        from transformers import AutoTokenizer

        from gen_ssd_ray.common.models import localize_model

        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        # The driver's copy of an object-store model is on the driver's node: this node gets its own.
        spec = replace(
            spec,
            teacher_path=localize_model(spec.teacher_path),
            student_path=localize_model(spec.student_path),
        )
        self.spec = spec
        self.teachers = teachers
        self.scorers = scorers
        self.teacher_tok = AutoTokenizer.from_pretrained(
            spec.teacher_path, trust_remote_code=spec.trust_remote_code_teacher
        )
        self.student_tok = (
            self.teacher_tok
            if spec.student_path == spec.teacher_path
            else AutoTokenizer.from_pretrained(
                spec.student_path, trust_remote_code=spec.trust_remote_code_student
            )
        )
        self.student_max_len = _max_positions(spec.student_path, spec.trust_remote_code_student)
        from gen_ssd_ray.generate.health import PoolHealth

        cool = {"base_s": spec.cooldown_s, "max_s": 32 * spec.cooldown_s, "enabled": spec.pool_health}
        self.teacher_health = PoolHealth(len(teachers), **cool)
        self.scorer_health = PoolHealth(len(scorers), **cool)
        from gen_ssd_ray.generate.routing import ScorerRouter

        self.router = ScorerRouter(len(scorers)) if scorers else None  # (a manager only rendering prompts)
        self.score_calls = [0] * len(scorers)  # per scorer, answered calls (`stats`)
        self._probes: set = set()
        # per pool (id of its health): set, then replaced, whenever one of its engines comes back
        self._recovered: dict[int, asyncio.Event] = {}
        # (id of a pool's health, engine) -> the calls waiting on that engine, abandoned when it fails
        self._waiting: dict[tuple[int, int], set[asyncio.Future]] = {}
        self._journals: dict = {}  # output folder -> JournalWriter (gen_ssd_ray.generate.journal)
        self._flusher: asyncio.Task | None = None
        self._flush_lock: asyncio.Lock | None = None
        from gen_ssd_ray.generate.metrics import ManagerMetrics

        self.metrics = ManagerMetrics(spec.output, spec.method, enabled=spec.metrics)

    async def ready(self) -> dict[str, Any]:
        return {"pid": os.getpid()}

    async def stats(self) -> dict[str, Any]:
        """Score calls answered per scorer (the driver sums them over managers: scorer balance) and
        what the journal writers wrote."""
        return {
            "score_calls": list(self.score_calls),
            "journal": {uri: j.stats() for uri, j in self._journals.items()},
        }

    # ---- journal (gen_ssd_ray.generate.journal) ----------------------------------------------
    def _journal(self, target):
        from gen_ssd_ray.generate.journal import JournalWriter

        j = self._journals.get(target.uri)
        if j is None or j.target != target:
            j = self._journals[target.uri] = JournalWriter(target)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush_loop())
        return j

    async def _flush_loop(self) -> None:
        while True:
            interval = min((j.target.interval_s for j in self._journals.values()), default=1.0)
            await asyncio.sleep(max(0.05, interval / 4))
            await self.flush_journal(only_due=True)

    async def flush_journal(self, only_due: bool = False) -> int:
        """Write every journal's buffered steps now (the driver calls this when it stops); returns
        the bytes written. A failed write is logged and kept for the next flush."""
        if self._flush_lock is None:
            self._flush_lock = asyncio.Lock()
        written = 0
        async with self._flush_lock:
            for j in list(self._journals.values()):
                if only_due and not j.due():
                    continue
                try:
                    written += await asyncio.to_thread(j.flush)
                except Exception as e:
                    log.warning("journal write to %s failed (%s: %s)", j.target.uri, type(e).__name__, e)
        return written

    # ---- remote calls with health, liveness deadlines and fallback -------------------------
    async def _call(self, pool: list, health, first: int, method: str, payload):
        return (await self._call_where(pool, health, first, method, payload))[1]

    async def _call_where(
        self, pool: list, health, first: int, method: str, payload, prefer: list[int] | None = None
    ) -> tuple[int, Any]:
        """Call `method` on engine `first` of `pool`, falling back to the pool's other usable engines.

        A ValueError raised by the engine is about this input and is re-raised. Anything else (actor
        death, a dead engine core, a hung engine, a call too late) marks the engine failed, once (a
        hung or dead engine's other calls are abandoned and move on too, without counting again),
        and moves on.
        Raises EnginesUnavailable when no engine is usable or every one failed. `prefer`: the
        engines in the order to try them (default: `first`, then the others round-robin). Returns
        (the engine that answered, its result).
        """
        self._start_probes(pool, health)
        order = [i for i in prefer if health.usable(i)] if prefer else health.order(first)
        if not order:  # the whole pool is down: wait for it
            order = await self._usable(pool, health, first, method, prefer)
        errors = []
        for i in order:
            if not health.usable(i):  # another call found it failed meanwhile
                continue
            try:
                result = await self._await_live(pool[i], method, payload, key=(id(health), i))
            except ValueError:
                raise
            except Exception as e:  # RayActorError, EngineDead, a hung engine, EngineFailed
                text = str(e).strip()
                errors.append(f"{method}@{i}: {type(e).__name__}: {text.splitlines()[0] if text else ''}")
                if health.enabled and health.usable(i):  # the first failure of this episode counts
                    health.failed(i)
                    if not isinstance(e, CallTooLate):  # hung or dead: nothing else will come back
                        for other in list(self._waiting.get((id(health), i), ())):
                            other.cancel()
                continue
            if not health.usable(i) or health.failures.get(i):
                self._wake(health)
            health.ok(i)
            return i, result
        raise EnginesUnavailable("; ".join(errors) or f"{method}: no usable engine")

    async def _usable(
        self, pool: list, health, first: int, method: str, prefer: list[int] | None = None
    ) -> list[int]:
        """The pool's usable engines in call order, waiting up to `pool_wait_s` while there are none
        (cooldowns end, probes bring engines back); EnginesUnavailable after that."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.spec.pool_wait_s
        while True:
            self._start_probes(pool, health)
            order = [i for i in prefer if health.usable(i)] if prefer else health.order(first)
            if order:
                return order
            left = deadline - loop.time()
            if left <= 0:
                raise PoolOutage(
                    f"{method}: every engine of the pool is down or cooling down {health.down} "
                    f"(waited {self.spec.pool_wait_s:g} s)"
                )
            event = self._recovered.setdefault(id(health), asyncio.Event())
            due = health.next_due_s()
            wait = left if due is None else min(left, max(due, 0.05))
            try:
                await asyncio.wait_for(event.wait(), wait)
            except TimeoutError:
                pass

    def _wake(self, health) -> None:
        """An engine of this pool is back: wake the steps waiting for it."""
        event = self._recovered.pop(id(health), None)
        if event is not None:
            event.set()

    async def _await_live(
        self, engine, method: str, payload=None, deadline: float | None = None, key: tuple | None = None
    ):
        """The call's result. Past the deadline (`runtime.call_timeout_s` unless given), the engine's
        progress counter decides: advancing means busy (keep waiting, checking every quarter deadline,
        up to `late_call_limit` deadlines in all), not advancing (or no answer) means hung (cancel,
        raise). With `key`, the call is abandoned (EngineFailed) as soon as another call finds that
        engine failed."""

        ref = engine.call(method, payload)
        fut = asyncio.wrap_future(ref.future())
        fut.add_done_callback(_retrieve)  # a cancelled or abandoned call's error is expected
        waiting = self._waiting.setdefault(key, set()) if key is not None else None
        if waiting is not None:
            waiting.add(fut)
        try:
            return await self._wait_live(engine, ref, fut, deadline or self.spec.call_timeout_s)
        finally:
            if waiting is not None:
                waiting.discard(fut)

    async def _wait_live(self, engine, ref, fut: asyncio.Future, deadline: float):
        import ray

        waited, timeout, last = 0.0, deadline, None
        while True:
            done, _ = await asyncio.wait({fut}, timeout=timeout)
            if done:
                if fut.cancelled():  # abandoned: another call found the engine failed
                    ray.cancel(ref)
                    raise EngineFailed("the engine failed in another call")
                return fut.result()
            waited += timeout
            if waited >= deadline * self.spec.late_call_limit - 1e-9:
                why = f"runtime.late_call_limit={self.spec.late_call_limit:g} deadlines"
                break
            try:
                now = await asyncio.wait_for(engine.call("progress"), timeout=deadline / 4)
            except Exception:
                now = None
            if now is None or (last is not None and now <= last):
                why = "no progress"
                break
            last = now
            timeout = min(deadline / 4, deadline * self.spec.late_call_limit - waited)
        ray.cancel(ref)  # do not leave abandoned work on a hung engine
        error = TimeoutError if why == "no progress" else CallTooLate
        raise error(f"no answer within {waited:g} s (deadline {deadline:g} s): {why}")

    def _start_probes(self, pool: list, health) -> None:
        for i in health.due_probes():
            task = asyncio.get_running_loop().create_task(self._probe(pool[i], health, i))
            self._probes.add(task)
            task.add_done_callback(self._probes.discard)

    async def _probe(self, engine, health, i: int) -> None:
        """A cooled-down engine gets work again only once it does a minimal unit of real work
        (`ping`: one token through its queue): a hung engine whose actor still answers fails it. An
        actor that Ray is restarting is asked again until it is back and has loaded its model, up
        to `probe_timeout_s`."""
        from ray.exceptions import ActorUnavailableError

        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.spec.probe_timeout_s
        while True:
            try:
                await self._await_live(engine, "ping", deadline=self.spec.probe_timeout_s)
            except ActorUnavailableError:  # restarting (or its node is not yet known to be gone)
                if loop.time() < deadline:
                    await asyncio.sleep(self.spec.cooldown_s / 4)
                    continue
                e: Exception | None = TimeoutError(f"still unavailable after {self.spec.probe_timeout_s:g} s")
            except Exception as exc:
                e = exc
            else:
                e = None
            break
        if e is None:
            health.probed(i, True)
        else:
            text = str(e).strip().splitlines()
            log.warning(
                "probe of engine %d failed (%d in a row): %s: %s",
                i,
                health.failures.get(i, 0),
                type(e).__name__,
                text[0] if text else "",
            )
            health.probed(i, False)
        self._wake(health)  # waiting steps use it, or look at its new cooldown

    async def _run_trajectory(self, search: ProblemSearch, engine: int, journal=None) -> Trajectory:
        """The trajectory's steps: expand on its pinned teacher engine, score on its scorer (sticky
        for the scorer's cache, spread over all scorers: gen_ssd_ray.generate.routing). `journal`:
        (writer, problem id, content hash, trajectory index, attempt, first step), where each completed
        step is recorded."""
        group, used = search.group, set()
        try:
            while not search.done:
                expanded = await self._call(
                    self.teachers, self.teacher_health, engine, "expand", search.expand_requests()
                )
                score_reqs = search.update_expanded(expanded)
                if os.environ.get(TEACHER_TOKENS_ENV):
                    self._count_teacher_tokens(sum(len(c.token_ids) for r in expanded for c in r.candidates))
                order = self.router.order(group)
                i, scored = await self._call_where(
                    self.scorers, self.scorer_health, order[0], "score", score_reqs, prefer=order
                )
                if i != order[0]:  # its scorer was down: it moves, and its cache is rebuilt there
                    self.router.moved(group, i)
                used.add(i)
                self.score_calls[i] += 1
                search.update_scored(scored)
                self.metrics.step(expanded, score_reqs, scored)
                if journal is not None:
                    writer, pid, h, index, attempt, base = journal
                    writer.record(pid, h, index, [x.to_dict() for x in search.take_log()], attempt, base)
            return search.result()
        finally:
            self.router.release(group)
            for i in used:  # free the scorer's KV cache for this trajectory (fire and forget)
                self.scorers[i].call("release", [group])

    def _count_teacher_tokens(self, tokens: int) -> None:
        self._teacher_tokens = getattr(self, "_teacher_tokens", 0) + tokens
        fd = getattr(self, "_tokens_fd", None)
        if fd is None:
            folder = os.environ[TEACHER_TOKENS_ENV]
            os.makedirs(folder, exist_ok=True)
            name = os.path.join(folder, f"manager-{os.getpid()}-{id(self):x}.txt")
            fd = self._tokens_fd = os.open(name, os.O_WRONLY | os.O_CREAT, 0o644)
        os.pwrite(fd, f"{self._teacher_tokens:020d}\n".encode(), 0)

    # ---- one problem -------------------------------------------------------------------------
    async def solve(
        self, problem: Problem, engine: int, restore: dict | None = None, journal=None
    ) -> list[TrajectoryRow]:
        """All trajectories of one problem as output rows (without `correct`).

        `restore`: {trajectory index: journaled step dicts} to replay before running (a trajectory
        whose steps do not replay starts afresh); `journal`: a JournalTarget to record steps to."""
        n = self.spec.trajectories
        started = time.perf_counter()
        if problem.error is not None:
            return [self._row(problem, None, i, "", error=problem.error) for i in range(n)]
        teacher_prompt, student_prompt = self.prompts(problem.question)
        prompt_text, prompt_ids = teacher_prompt.text, teacher_prompt.token_ids
        student_ids = student_prompt.token_ids
        if err := teacher_prompt.error or student_prompt.error:  # data the tokenizer cannot keep as text
            return [self._row(problem, None, i, prompt_text, error=err) for i in range(n)]
        if err := self._too_long(len(prompt_ids), len(student_ids)):
            return [self._row(problem, None, i, prompt_text, error=err) for i in range(n)]
        searches = [
            ProblemSearch(
                self.spec.params,
                prompt_ids,
                student_ids,
                group=f"{problem.problem_id}/t{i}",
                seed=trajectory_seed(self.spec.seed, problem.problem_id, i),
            )
            for i in range(n)
        ]
        for i, steps in (restore or {}).items():
            if 0 <= int(i) < n:
                searches[int(i)] = _restored(searches[int(i)], steps)
        writer = self._journal(journal) if journal is not None else None
        h = _content_hash(problem) if writer is not None else ""
        attempt = f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"  # sorts by start (journal module doc)
        # A TaskGroup cancels the sibling trajectories if one fails, so no orphaned work stays behind.
        try:
            async with asyncio.TaskGroup() as tg:
                tasks = [
                    tg.create_task(
                        self._run_trajectory(
                            s,
                            engine,
                            (writer, problem.problem_id, h, i, attempt, s.step)
                            if writer is not None
                            else None,
                        )
                    )
                    for i, s in enumerate(searches)
                ]
        except ExceptionGroup as group:  # surface the first failure itself (the driver classifies it)
            raise group.exceptions[0] from None
        trajs = [t.result() for t in tasks]
        self.metrics.solved(started)
        return [self._row(problem, t, i, prompt_text) for i, t in enumerate(trajs)]

    def _too_long(self, teacher_len: int, student_len: int) -> str | None:
        """The reason a prompt cannot fit the teacher or the student with the response budget, if so."""
        budget = self.spec.params.max_new_tokens
        if teacher_len + budget > self.spec.teacher_max_len:
            return (
                f"prompt has {teacher_len} tokens; with search.max_new_tokens={budget} it exceeds "
                f"teacher.max_model_len={self.spec.teacher_max_len}"
            )
        if self.student_max_len and student_len + budget > self.student_max_len:
            return (
                f"student prompt has {student_len} tokens; with search.max_new_tokens={budget} it exceeds "
                f"the student's max_position_embeddings={self.student_max_len}"
            )
        return None

    def _row(
        self,
        problem: Problem,
        traj: Trajectory | None,
        index: int,
        prompt_text: str | None,
        error: str | None = None,
    ) -> TrajectoryRow:
        spec = self.spec
        # The conversation as the user sees it (TRL's form): the question in the prompt config's messages.
        asked = (
            None
            if problem.error or problem.question is None
            else chat_messages(spec.prompt, problem.question)
        )
        row: TrajectoryRow = {
            "problem_id": problem.problem_id,
            "trajectory_index": index,
            "question": problem.question,
            "gold_answer": problem.gold_answer,
            **conversation(asked, None),  # type: ignore[typeddict-item]
            "prompt_text": prompt_text,
            "teacher_model": spec.teacher_name,
            "student_model": spec.student_name,
            "sampling": spec.sampling(),
            "seed": trajectory_seed(spec.seed, problem.problem_id, index),
            "config_fingerprint": spec.fingerprint,
            "method": spec.method,
            "status": ERROR,
            "error": error,
            "chunks": [],
            "response": None,
            "response_token_ids": [],
            "num_response_tokens": 0,
            "teacher_tokens_generated": 0,
            "student_tokens_processed": 0,
            "student_tokens_scored": 0,
            "teacher_prompt_tokens": 0,
            "teacher_cached_prompt_tokens": 0,
        }
        if traj is None:
            return row
        response = self.teacher_tok.decode(list(traj.response_token_ids), skip_special_tokens=True)
        row.update(
            status=traj.status,
            error=traj.error,
            response=response,
            **conversation(asked, response),  # type: ignore[typeddict-item]
            response_token_ids=list(traj.response_token_ids),
            chunks=[
                {"candidates": [asdict(c) for c in rec.candidates], "chosen": rec.chosen}
                for rec in traj.chunks
            ],
            final_answer=extract_final_answer(response) if traj.status == "completed" else None,
            student_ppl=traj.student_ppl,
            num_response_tokens=len(traj.response_token_ids),
            teacher_tokens_generated=traj.teacher_tokens_generated,
            student_tokens_processed=traj.student_tokens_processed,
            student_tokens_scored=traj.student_tokens_scored,
            teacher_prompt_tokens=traj.prompt_tokens,
            teacher_cached_prompt_tokens=traj.cached_prompt_tokens,
        )
        return row

    def prompts(self, question: str) -> tuple[RenderedPrompt, RenderedPrompt]:
        """The question in the teacher's and in the student's chat template (the one renderer)."""
        return (
            render_prompt(self.teacher_tok, self.spec.prompt, question),
            render_prompt(self.student_tok, self.spec.prompt, question),
        )

    async def render_prompt_ids(self, question: str) -> list[int]:
        """The teacher prompt's token ids for a question (used by the benchmark's baseline)."""
        return list(self.prompts(question)[0].token_ids)


def _restored(search: ProblemSearch, steps: list[dict]) -> ProblemSearch:
    """The fresh `search` brought to its journaled state; on a mismatch (it cannot happen under the
    same config fingerprint and content hash, but a journal is only an optimisation) a fresh one."""
    from gen_ssd_ray.core.search import StepLog

    try:
        search.replay([StepLog.from_dict(d) for d in steps])
        return search
    except (ValueError, KeyError, TypeError, IndexError) as e:
        log.warning("journal: trajectory %s does not replay (%s); generating it afresh", search.group, e)
        return ProblemSearch(
            search.params, search.prompt_ids, search.student_prompt_ids, search.group, search.seed
        )


def _content_hash(problem) -> str:
    from gen_ssd_ray.generate.content import content_hash

    return content_hash(problem)


def _retrieve(fut: asyncio.Future) -> None:
    if not fut.cancelled():
        fut.exception()


def _max_positions(model_path: str, trust_remote_code: bool) -> int | None:
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    return getattr(cfg.get_text_config(), "max_position_embeddings", None)


__all__ = ["BeamManager", "EnginesUnavailable", "ManagerSpec", "PoolOutage", "Problem", "trajectory_seed"]
