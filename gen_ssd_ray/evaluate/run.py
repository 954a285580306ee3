"""Student evaluation: any model folder on any problem set, scored by math-verify.

`evaluate(cfg)` renders every problem with the model's own chat template (the one renderer,
gen_ssd_ray.common.prompts), generates whole responses with engine actors
(`gen_ssd_ray.engines.actors.TeacherEngine`, data parallel over `model.num_engines`, fed by the shared
dispatcher), extracts final answers, checks them with the `Verifier` exactly as the generation job
does, and writes two files to `output.dir`:

- `predictions.parquet`: one row per problem x sample (gen_ssd_ray.evaluate.rows: the typed row, its
  statuses and `PREDICTION_SCHEMA`).
- `summary.json`, written last: accuracy (mean over non-error problems of the fraction of correct
  samples; failed samples, whose generation did not end normally, count as not correct), counts,
  the verifier's counters (errors, timeouts, pool restarts), mean response length, throughput, the
  model's revision, the data, the sampling and a fingerprint of everything that changes the result.

While it runs, rows are committed in pieces as batches finish, in `output.dir/_partial`
(gen_ssd_ray.evaluate.partial: atomic Parquet pieces carrying the fingerprint). A run that fails or is
interrupted keeps them; re-running the same command resumes: problems already committed are not
generated again, and the final files count every row. At the end predictions.parquet and
summary.json are written from all the pieces (each atomically: temporary name, fsync, rename) and
`_partial` is removed. A stale summary.json is removed before the run starts, so a summary.json always
describes the predictions.parquet beside it. A folder whose summary.json has the same fingerprint is
not evaluated again (`evaluate` returns the stored summary with "skipped": true, starting nothing); a
different fingerprint (finished or in `_partial`) is refused unless `output.force=true`, which
re-evaluates and overwrites (an unfinished run of the same fingerprint is still resumed).

With `logging.backends` set, the summary's accuracy and counts also go to the trackers
(gen_ssd_ray.common.tracking: `eval/accuracy`, `eval/correct`, ...), one point per evaluation.

`output.dir` may be an object-store URI (``s3://bucket/evals/x``): the run then holds the folder's
lease (gen_ssd_ray.common.joblock) and works in a local staging folder rebuilt from the store
(summary.json, predictions.parquet and the `_partial` pieces); each piece is uploaded when committed,
predictions.parquet then summary.json (last) at the end, and the remote `_partial` is then deleted, each
write after checking the lease. The model may be an object-store folder too (`model.model=s3://...`):
the driver and every engine actor resolve it on their node (gen_ssd_ray.common.models).

Bad input fails in `prepare`, before Ray or any actor starts: a missing model folder or tokenizer, a
model without a chat template, an unusable data source, a refused output folder, an answer checker
that cannot run (math-verify missing or broken: `gen_ssd_ray.common.verify.check_verifier`), all
InputErrors. A problem that cannot be asked (bad data row, prompt too long or not renderable) is an
error row; the run goes on. An engine that dies or misses `runtime.call_timeout_s` has its batch
retried up to `runtime.max_attempts` times, then the run fails (`JobFailed`), keeping the committed
pieces; SIGINT/SIGTERM stop it the same way (`JobInterrupted`).

ray, vllm and transformers are imported inside functions; importing this module is cheap.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gen_ssd_ray.common.cluster import init_ray
from gen_ssd_ray.common.data import Problem
from gen_ssd_ray.common.errors import InputError, JobFailed, JobInterrupted, disk_full, reason
from gen_ssd_ray.common.fsio import atomic_write_json
from gen_ssd_ray.common.joblock import FolderLock, ObjectLease, lock_job_folder
from gen_ssd_ray.common.models import model_revision
from gen_ssd_ray.common.prompts import RenderedPrompt, check_chat_model, render_prompt
from gen_ssd_ray.evaluate.config import EvaluateConfig, evaluation_fingerprint
from gen_ssd_ray.evaluate.partial import (
    PARTIAL_DIR,
    EvaluationExistsError,  # noqa: F401 - raised by prepare; callers import it from here
    PartialPredictions,
    check_partial,
    refused,
)
from gen_ssd_ray.evaluate.rows import encodable, problem_seed, sample_rows, summarize, write_predictions

log = logging.getLogger("gen_ssd_ray")

PREDICTIONS_NAME = "predictions.parquet"
SUMMARY_NAME = "summary.json"
# Batches in flight per engine: one generating, one queued behind it, so the engine does not idle
# while the driver collects and verifies a finished batch.
INFLIGHT_BATCHES_PER_ENGINE = 2
# What stands in for the engines in `evaluate(..., generate_fn=)`:
# (batches, prompts, seeds, stop) -> Iterator[(batch, generations)].
GenerateFn = Callable[..., Iterator[tuple[list[int], list[Any]]]]


@dataclass
class Prepared:
    model_path: str
    model_revision: str
    problems: list[Problem]
    fingerprint: str
    # The stored summary of a finished identical evaluation: the run is skipped.
    existing: dict[str, Any] | None = None
    # One per problem (None when skipped).
    prompts: list[RenderedPrompt] | None = None
    # `output.dir`'s job-folder lock (an object store's lease), taken by `prepare` and released when
    # `evaluate` returns.
    lock: FolderLock | ObjectLease | None = None


def remote_of(cfg: EvaluateConfig):
    """The Storage of `output.dir` if it is on an object store, else None."""
    from gen_ssd_ray.common.storage import Storage, is_remote

    return Storage(cfg.output.dir, key="output.dir") if is_remote(cfg.output.dir) else None


def work_dir(cfg: EvaluateConfig) -> Path:
    """Where the run's files are written on this machine: `output.dir`, or its local staging folder."""
    from gen_ssd_ray.common.models import staging_dir
    from gen_ssd_ray.common.storage import is_remote

    return staging_dir(cfg.output.dir, "evaluate") if is_remote(cfg.output.dir) else Path(cfg.output.dir)


def pull(storage, staging: Path) -> None:
    """Rebuild the staging folder from the store: summary.json, predictions.parquet, the pieces."""
    import shutil

    from gen_ssd_ray.evaluate.partial import pull_pieces

    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True, exist_ok=True)
    for name in (SUMMARY_NAME, PREDICTIONS_NAME):
        if storage.exists(name):
            storage.download_file(name, staging / name)
    pull_pieces(storage.child(PARTIAL_DIR), staging / PARTIAL_DIR)


def prepare(cfg: EvaluateConfig) -> Prepared:
    """Resolve the model, load the problems, check the output folder, render the prompts.

    Raises ModelNotFoundError, DataError, EvaluationExistsError, VerifierUnavailable or InputError
    with a message naming the config key and the fix.
    """
    from gen_ssd_ray.common.data import load_problems
    from gen_ssd_ray.common.models import resolve_model
    from gen_ssd_ray.common.verify import check_verifier

    model_path = resolve_model(cfg.model.model, "model.model", cfg.model.revision)
    revision = model_revision(model_path)
    problems = load_problems(cfg.data)
    fp = evaluation_fingerprint(cfg, revision, problems)
    out = work_dir(cfg)
    storage = remote_of(cfg)
    lock = None
    if storage is not None:  # the staging folder is rebuilt from the store under the lease
        lock = lock_job_folder(cfg.output.dir, "evaluate")
        try:
            pull(storage, out)
        except BaseException:
            lock.release()
            raise
    try:
        existing = check_existing(out, fp, cfg.output.force)
    except BaseException as e:
        if lock is not None:
            lock.release()
            if isinstance(e, InputError):  # name the store's folder, not the staging copy
                raise type(e)(str(e).replace(str(out), cfg.output.dir)) from None
        raise
    prepared = Prepared(model_path, revision, problems, fp, existing, lock=lock)
    if prepared.existing is not None:
        if lock is not None:
            lock.release()
            prepared.lock = None
        return prepared  # a finished identical evaluation: skipped, nothing is written
    # Checks that would fail for every problem, before anything is written or started.
    check_verifier(cfg.runtime.verify_timeout_s)  # math-verify runs
    key = f"model.model={cfg.model.model!r}"
    m, new = cfg.model, cfg.sampling.max_new_tokens
    tokenizer = check_chat_model(
        model_path,
        key,
        cfg.prompt,
        m.trust_remote_code,
        max_prompt_tokens=m.max_model_len - new,
        budget=f"model.max_model_len={m.max_model_len} - sampling.max_new_tokens={new}",
    )
    try:
        prepared.prompts = render_prompts(tokenizer, cfg.prompt, problems, m.max_model_len, new, key)
    except BaseException:
        if prepared.lock is not None:
            prepared.lock.release()
        raise
    if prepared.lock is not None:
        return prepared  # an object store: locked and checked above
    # One evaluation per folder (exit 2 if another job holds it); `evaluate` releases it. What was
    # read before it is read again under it (another job may have finished meanwhile).
    prepared.lock = lock_job_folder(out, "evaluate")
    try:
        prepared.existing = check_existing(out, fp, cfg.output.force)
    except BaseException:
        prepared.lock.release()
        raise
    return prepared


def check_existing(out_dir: Path, fingerprint: str, force: bool) -> dict[str, Any] | None:
    """The stored summary if `out_dir` already holds this exact evaluation (skip it), else None (run).

    Raises EvaluationExistsError if it holds a different one (finished, or unfinished in `_partial`)
    and `force` is not set.
    """
    summary_path = out_dir / SUMMARY_NAME
    if force or not summary_path.is_file():
        check_partial(out_dir / PARTIAL_DIR, fingerprint, force)
        return None
    try:
        stored = json.loads(summary_path.read_text())
        old = stored.get("fingerprint") if isinstance(stored, dict) else None
    except (OSError, ValueError):
        stored, old = None, "(unreadable summary.json)"
    if old != fingerprint:
        raise refused(out_dir, old, fingerprint)
    if not (out_dir / PREDICTIONS_NAME).is_file():
        log.warning("%s: summary.json without %s; evaluating again", out_dir, PREDICTIONS_NAME)
        check_partial(out_dir / PARTIAL_DIR, fingerprint, force)
        return None
    return stored


def render_prompts(
    tokenizer,
    prompt,
    problems: Sequence[Problem],
    max_model_len: int,
    max_new_tokens: int,
    model_key: str = "model.model",
) -> list[RenderedPrompt]:
    """One `RenderedPrompt` per problem (gen_ssd_ray.common.prompts.render_prompt).

    A bad problem row keeps its own error; so does a question or gold answer that is not valid Unicode
    text (a lone surrogate such as "\\ud800" from JSON) and a question the tokenizer or the chat
    template raises on; a prompt with no room for `max_new_tokens` within `max_model_len` gets an error
    naming both keys. If rendering raises for every problem it is the model's tokenizer, not the data:
    InputError naming `model_key`.
    """
    rendered = []
    raised: list[str] = []
    attempted = 0
    for p in problems:
        if p.error is not None or p.question is None:
            rendered.append(RenderedPrompt(error=p.error or "no question"))
            continue
        bad = next((why for f in ("question", "gold_answer") if (why := _not_text(f, getattr(p, f)))), None)
        if bad is not None:
            rendered.append(RenderedPrompt(error=f"{bad}: fix the data row"))
            continue
        attempted += 1
        try:
            r = render_prompt(tokenizer, prompt, p.question)
        except Exception as e:  # noqa: BLE001 - this row's text; all rows failing is checked below
            raised.append(reason(e))
            rendered.append(RenderedPrompt(error=f"the prompt could not be rendered: {reason(e)}"))
            continue
        if len(r.token_ids) + max_new_tokens > max_model_len:
            r = dataclasses.replace(
                r,
                error=f"prompt has {len(r.token_ids)} tokens; with sampling.max_new_tokens={max_new_tokens} it "
                f"exceeds model.max_model_len={max_model_len} (raise it or lower sampling.max_new_tokens)",
            )
        rendered.append(r)
    if raised and len(raised) == attempted:
        raise InputError(
            f"{model_key}: rendering the prompt failed for every problem ({raised[0]}); check the "
            "model's tokenizer and chat template (prompt.* keys for the prompt text)"
        )
    return rendered


def _not_text(field: str, value: object) -> str | None:
    """Why `value` (a problem's question or gold answer) is not usable text, or None (None is fine)."""
    if value is None:
        return None
    if not isinstance(value, str):
        return f"the {field} is a {type(value).__name__} ({value!r:.40}), not text"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return f'the {field} is not valid Unicode text (it holds a lone surrogate, e.g. an "\\ud800" escape in JSON)'
    return None


# ---- the run ----------------------------------------------------------------------------------------


def evaluate(
    cfg: EvaluateConfig, prepared: Prepared | None = None, *, generate_fn: GenerateFn | None = None
) -> dict[str, Any]:
    """Evaluate `cfg.model` on `cfg.data`; write predictions.parquet and summary.json; return the summary.

    Raises the `prepare` errors (bad input), JobFailed (engines failed) and JobInterrupted on SIGINT or
    SIGTERM (engines are shut down); both keep the committed pieces, and re-running resumes.
    `generate_fn` stands in for the engines (tests run the whole job in-process with a fake):
    `generate_fn(batches, prompts, seeds, stop)` yields `(batch, generations)` as batches finish and
    stops yielding once `stop` is set.
    """
    started = time.perf_counter()
    p = prepared or prepare(cfg)
    try:
        return _evaluate_locked(cfg, p, started, generate_fn)
    finally:
        if p.lock is not None:
            p.lock.release()


def _evaluate_locked(
    cfg: EvaluateConfig, p: Prepared, started: float, generate_fn: GenerateFn | None
) -> dict[str, Any]:
    if p.existing is not None:
        log.info("%s already holds this evaluation (fingerprint %s): skipped", cfg.output.dir, p.fingerprint)
        return {**p.existing, "skipped": True}
    assert p.prompts is not None
    out = work_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    storage = remote_of(cfg)
    mirror = None
    if storage is not None:
        from gen_ssd_ray.evaluate.partial import Mirror

        mirror = Mirror(storage.child(PARTIAL_DIR), p.lock.check if p.lock is not None else None)
        mirror.check()
        storage.delete(SUMMARY_NAME)  # never leave an old summary beside new predictions
    with writing(out / PARTIAL_DIR):
        (out / SUMMARY_NAME).unlink(missing_ok=True)  # never leave an old summary beside new predictions
        partial = PartialPredictions(out / PARTIAL_DIR, p.fingerprint, force=cfg.output.force, mirror=mirror)
    generation_s, tokens, counters = _generate_rows(cfg, p, partial, generate_fn)
    rows = _all_rows(p, partial)
    summary = {
        **summarize(rows),
        "resumed_problems": len(partial.resumed_ids & {encodable(q.problem_id) for q in p.problems}),
        "verifier": counters,
        "elapsed_s": round(time.perf_counter() - started, 1),
        "generation_s": round(generation_s, 1),
        **_describe(cfg, p),
    }
    summary["tokens_per_s"] = round(tokens / generation_s, 1) if generation_s else None  # this run
    unchecked = counters["errors"] + counters["timeouts"] + counters["lost"]
    if unchecked:
        log.warning(
            "verifier: %d of %d answer checks failed (%s); those samples are unverified",
            unchecked,
            counters["checks"],
            counters,
        )
    with writing(out / PREDICTIONS_NAME, partial):
        write_predictions(out / PREDICTIONS_NAME, rows)
    with writing(out / SUMMARY_NAME, partial):
        atomic_write_json(out / SUMMARY_NAME, summary, indent=2)
    if storage is not None:  # predictions, then summary.json last: the evaluation is complete there
        mirror.check()
        storage.upload_file(out / PREDICTIONS_NAME, PREDICTIONS_NAME)
        mirror.check()
        storage.upload_file(out / SUMMARY_NAME, SUMMARY_NAME)
    partial.remove()
    _track(cfg, summary)
    return summary


# The summary's figures the trackers get, as eval/<key>.
TRACKED = (
    "accuracy",
    "correct",
    "incorrect",
    "unverified",
    "failed",
    "problems",
    "problems_scored",
    "problems_error",
    "samples",
    "mean_response_tokens",
    "tokens_per_s",
    "generation_s",
)


def _track(cfg: EvaluateConfig, summary: dict[str, Any]) -> None:
    """The evaluation's figures (one point, step 0) and the model evaluated to `logging.backends`."""
    from gen_ssd_ray.common.tracking import open_tracker

    with open_tracker(cfg.logging, "evaluate", cfg.output.dir, config=cfg) as tracker:
        tracker.log_params({k: summary[k] for k in ("model_path", "model_revision", "fingerprint")})
        tracker.log({f"eval/{k}": summary.get(k) for k in TRACKED}, 0)


@contextlib.contextmanager
def writing(path: Path, partial: PartialPredictions | None = None) -> Iterator[None]:
    """An OSError writing `path` (disk full, permissions, quota) as JobFailed: one line naming the
    file and the fix; what is committed is kept."""
    try:
        yield
    except OSError as e:
        full = disk_full(e) is not None  # ENOSPC / EDQUOT, the shared test (common/errors.py)
        kept = (
            f"the {len(partial.done_ids)} problems committed in {partial.folder} are kept, "
            if partial
            else ""
        )
        raise JobFailed(
            f"writing {path} failed ({reason(e)}){': the disk is full' if full else ''}; "
            f"{'free space' if full else 'fix the folder (space, permissions)'} and re-run the same command "
            f"({kept}it continues from there)"
        ) from e


def _all_rows(p: Prepared, partial: PartialPredictions) -> list[dict[str, Any]]:
    """Every committed row in input order (problem, then sample); JobFailed if a problem is missing."""
    order = {encodable(q.problem_id): i for i, q in enumerate(p.problems)}  # ids as stored
    rows = [r for r in partial.rows() if r["problem_id"] in order]
    rows.sort(key=lambda r: (order[r["problem_id"]], r["sample_index"]))
    missing = len(order) - len({r["problem_id"] for r in rows})
    if missing:
        raise JobFailed(
            f"{missing} problems have no committed rows in {partial.folder}; re-run the same command"
        )
    return rows


def _describe(cfg: EvaluateConfig, p: Prepared) -> dict[str, Any]:
    out = Path(cfg.output.dir)
    storage = remote_of(cfg)
    return {
        "model": cfg.model.model,
        "model_path": p.model_path,
        "model_revision": p.model_revision,
        "data_path": cfg.data.path,
        "data": dataclasses.asdict(cfg.data),
        "prompt": dataclasses.asdict(cfg.prompt),
        "sampling": dataclasses.asdict(cfg.sampling),
        "num_engines": cfg.model.num_engines,
        "fingerprint": p.fingerprint,
        "output_dir": storage.uri if storage is not None else str(out),
        "predictions": storage.uri_of(PREDICTIONS_NAME)
        if storage is not None
        else str(out / PREDICTIONS_NAME),
    }


def _generate_rows(
    cfg: EvaluateConfig, p: Prepared, partial: PartialPredictions, generate_fn: GenerateFn | None
) -> tuple[float, int, dict[str, int]]:
    """Generate, verify and commit the rows of every problem `partial` does not hold yet.

    Returns the seconds spent generating (engine start excluded), the tokens generated and the
    verifier's counters, all of this run.
    """
    from gen_ssd_ray.common.interrupts import stop_on_signals
    from gen_ssd_ray.common.progress import Progress
    from gen_ssd_ray.common.verify import PoolUnavailable, Verifier
    from gen_ssd_ray.engines.actors import actors_of, stop_actors

    assert p.prompts is not None
    n, name = cfg.sampling.n, cfg.model.model
    seeds = [problem_seed(cfg.sampling.seed, q.problem_id) for q in p.problems]
    done = partial.done_ids
    if done:
        log.info("%s: %d problems already committed by an earlier run; resuming", partial.folder, len(done))
    error_rows: list[dict[str, Any]] = []
    todo = []
    for i, (problem, prompt) in enumerate(zip(p.problems, p.prompts, strict=True)):
        if encodable(problem.problem_id) in done:  # ids as stored (rows.encodable)
            continue
        if prompt.error is not None:  # bad row or too long: an error row, no engine needed
            error_rows += sample_rows(problem, prompt, None, n=n, model=name, seed=seeds[i])
        else:
            todo.append(i)
    with writing(partial.folder, partial):
        partial.commit(error_rows)
    generation_s, tokens = 0.0, 0
    counters = {"checks": 0, "errors": 0, "timeouts": 0, "lost": 0, "pool_restarts": 0}
    if not todo:
        return generation_s, tokens, counters
    verifier = Verifier(workers=cfg.runtime.verify_workers, timeout_s=cfg.runtime.verify_timeout_s)
    engines: list = []
    progress = None
    try:
        run_batches = generate_fn
        if run_batches is None:
            init_ray(cfg.runtime.ray_address, cfg.runtime.local_num_cpus)
            engines = start_engines(cfg, p.model_path)

            def run_batches(todo_batches, prompts, seeds, stop):
                return generate_batches(cfg, engines, todo_batches, p, seeds, stop)

        t0 = time.perf_counter()  # rates exclude engine start-up
        progress = Progress("evaluate", len(p.problems), len(p.problems) - len(todo), cfg.runtime.progress)
        with stop_on_signals() as stop:
            for batch, generations in run_batches(batches(todo, cfg), p.prompts, seeds, stop):
                rows = []
                for i, g in zip(batch, generations, strict=True):
                    rows += sample_rows(p.problems[i], p.prompts[i], g, n=n, model=name, seed=seeds[i])
                try:
                    verifier.verify_rows(rows)
                except PoolUnavailable as e:
                    raise JobFailed(
                        f"the answer checker (math-verify) stopped working: {e}; the "
                        f"{len(partial.done_ids)} problems committed in {partial.folder} are kept, "
                        "re-run the same command to continue"
                    ) from e
                with writing(partial.folder, partial):
                    partial.commit(rows)
                batch_tokens = sum(r["num_response_tokens"] for r in rows)
                tokens += batch_tokens
                progress.update(len(batch), batch_tokens)
        generation_s = time.perf_counter() - t0
        counters = verifier.counters()
        if stop.is_set():
            raise JobInterrupted(
                f"evaluation interrupted: {len(partial.done_ids)} of {len(p.problems)} problems are committed "
                f"in {partial.folder}"
            )
    finally:
        if progress is not None:
            progress.close()
        verifier.close()
        if engines:
            stop_actors(actors_of(engines))
    return generation_s, tokens, counters


def start_engines(cfg: EvaluateConfig, model_path: str) -> list:
    """`model.num_engines` engine actors with resources from the config, waited for until ready.

    Raises JobFailed (after killing them) if one fails to start or misses runtime.startup_timeout_s.
    """
    from gen_ssd_ray.engines.actors import actors_of, create_engine_pool, wait_ready

    m = cfg.model
    engines = create_engine_pool(
        m,
        model_path,
        section="model",
        max_concurrency=4 * INFLIGHT_BATCHES_PER_ENGINE,
        max_restarts=cfg.runtime.max_actor_restarts,
        scheduling_strategy=cfg.runtime.scheduling_strategy,
    )
    wait_ready(actors_of(engines), cfg.runtime.startup_timeout_s, f"the {m.backend} engines for {model_path}")
    return engines


def batches(todo: Sequence[int], cfg: EvaluateConfig) -> list[list[int]]:
    """Problem indices in batches of at most max_num_seqs / n prompts, at least one batch per engine."""
    per_call = max(1, cfg.model.max_num_seqs // cfg.sampling.n)
    per_engine = -(-len(todo) // cfg.model.num_engines)
    size = max(1, min(per_call, per_engine))
    return [list(todo[k : k + size]) for k in range(0, len(todo), size)]


def generate_batches(cfg: EvaluateConfig, engines: list, todo: list[list[int]], p: Prepared, seeds, stop):
    """Yield `(batch, generations)` as batches finish (the shared dispatcher: least-loaded engine,
    INFLIGHT_BATCHES_PER_ENGINE each, deadline runtime.call_timeout_s per call).

    A batch that failed on every one of runtime.max_attempts is halved until the problem that fails
    is alone (`bisecting`): a problem that kills its engine (a poison problem) becomes error rows that
    say so and the rest is evaluated, instead of every re-run failing on it. Engines that are down (not
    one problem) raise JobFailed: the committed problems are kept and a re-run continues."""
    from gen_ssd_ray.common.dispatch import Dispatcher, ray_calls
    from gen_ssd_ray.core.types import ExpandRequest
    from gen_ssd_ray.engines.base import Generation

    assert p.prompts is not None
    s, r = cfg.sampling, cfg.runtime
    calls = ray_calls()

    def submit(batch: list[int], engine: int, attempt: int):
        requests = [
            ExpandRequest(
                key=p.problems[i].problem_id,
                prompt_token_ids=p.prompts[i].token_ids,
                n=s.n,
                max_tokens=s.max_new_tokens,
                seed=seeds[i],
                temperature=s.temperature,
                top_p=s.top_p,
            )
            for i in batch
        ]
        return engines[engine].call("generate", requests)

    def dispatcher() -> Dispatcher:
        return Dispatcher(
            num_workers=len(engines),
            capacity=INFLIGHT_BATCHES_PER_ENGINE,
            submit=submit,
            watch=calls.watch,
            get=calls.get,
            cancel=calls.cancel,
            deadline_s=r.call_timeout_s,
            max_attempts=r.max_attempts,
            retry_window_s=0.0,  # evaluation: max_attempts quick tries (backoff between them)
            describe=lambda b: f"batch of {len(b)} problems",
            stop=stop,
        )

    for batch, result in bisecting(dispatcher, todo, stop):
        if isinstance(result, BatchFailed):
            why = (
                f"the engine failed on this problem alone on every one of runtime.max_attempts="
                f"{r.max_attempts} attempts while the engines evaluated other problems (last: {result.error})"
            )
            log.error("problem %s: %s", p.problems[batch[0]].problem_id, why)
            result = [Generation(error=why)]
        yield batch, result


@dataclass(frozen=True)
class BatchFailed:
    """A lone problem's call failed on every attempt while the engines answered others (`bisecting`)."""

    error: str


def bisecting(dispatcher: Callable[[], Any], todo: list[list[int]], stop) -> Iterator[tuple[list[int], Any]]:
    """Run `todo` (batches of problem indexes) through fresh dispatchers (`dispatcher()`), in rounds.
    Yields `(batch, result)` for every batch that succeeded, and `(batch, BatchFailed)` for a lone
    problem that is the failure: a batch that failed on every attempt is halved into the next round,
    and a single problem that still fails is blamed only if the engines work for others, i.e. a batch
    succeeded in the same round, or, when none did, a canary (a problem that succeeded before) succeeds
    now. Otherwise (the engines are down, not one problem) raises JobFailed; committed rows are kept."""
    done: list[int] = []  # a batch that succeeded: the canary
    batches = list(todo)
    while batches and not stop.is_set():
        failed, ok = [], 0
        for out in dispatcher().run(batches):
            if out.ok:
                ok += 1
                done = out.item
                yield out.item, out.result
            else:
                failed.append(out)
        if not failed or stop.is_set():
            return
        lone = [out for out in failed if len(out.item) == 1]
        # Nothing succeeded this round: are the engines up? Ask a problem that succeeded before (none
        # yet: keep halving, the failure may be one problem in the only batch).
        if not ok and (done or lone) and not (done and all(o.ok for o in dispatcher().run([done[:1]]))):
            last = failed[-1]
            raise JobFailed(
                f"a batch of {len(last.item)} problems failed {last.attempts} times (last: {last.error}) "
                "and the engines answered nothing else; the finished problems are committed, re-run the "
                "same command to continue (raise runtime.call_timeout_s if engines are slow)"
            )
        for out in lone:
            yield out.item, BatchFailed(str(out.error))
        batches = [half for out in failed if len(out.item) > 1 for half in _halves(out.item)]
        if batches:
            log.warning(
                "%d batches failed on every attempt; trying their halves to find the problem that fails",
                len(failed) - len(lone),
            )


def _halves(batch: list[int]) -> list[list[int]]:
    h = len(batch) // 2
    return [batch[:h], batch[h:]]


# ---- files ---------------------------------------------------------------------------------------


def format_summary(summary: dict[str, Any]) -> str:
    """What a person reads at the end of `python -m jobs.evaluate`."""
    from gen_ssd_ray.common.storage import is_remote

    out = summary["output_dir"] if is_remote(summary["output_dir"]) else Path(summary["output_dir"]).resolve()
    st = summary["samples_by_status"]
    lines = [
        "",
        f"Output: {out}",
        f"  {PREDICTIONS_NAME} (one row per problem x sample), {SUMMARY_NAME} (these numbers).",
        f"Model: {summary['model']}"
        + (f" ({summary['model_path']})" if summary["model_path"] != summary["model"] else "")
        + f", revision {summary['model_revision']}",
        f"Data: {summary['data_path']}; sampling: {json.dumps(summary['sampling'])}",
        f"Problems: {summary['problems']} ({summary['problems_scored']} scored, {summary['problems_error']} "
        f"errors: see the `error` column); samples: {summary['samples']}",
        "Samples: " + ", ".join(f"{k} {v}" for k, v in st.items()) + "  (completed = ended with EOS; "
        "truncated = hit sampling.max_new_tokens; failed = generation did not end normally, e.g. aborted: "
        "counted as not correct; error = not asked, see the `error` column)",
        f"Accuracy: {summary['accuracy']} (mean over scored problems of the fraction of correct samples); "
        f"correct {summary['correct']}, incorrect {summary['incorrect']}, unverified {summary['unverified']} "
        "(not completed, no answer, or unparseable)",
        _verifier_line(summary),
        f"Mean response length {summary['mean_response_tokens']} tokens; {summary['generated_tokens']} tokens "
        f"generated at {summary['tokens_per_s']} tok/s; elapsed {summary['elapsed_s']} s.",
    ]
    if summary.get("skipped"):
        lines.append(
            "Skipped: this folder already held this exact evaluation (same fingerprint); nothing ran. "
            "Set output.force=true to evaluate again."
        )
    return "\n".join(lines)


def _verifier_line(summary: dict[str, Any]) -> str:
    v = summary.get("verifier") or {}
    line = (
        f"Verifier (math-verify): {v.get('checks', 0)} checks, {v.get('errors', 0)} errors, "
        f"{v.get('timeouts', 0)} timeouts, {v.get('lost', 0)} lost, {v.get('pool_restarts', 0)} pool restarts "
        "(errors, timeouts and lost checks are unverified)"
    )
    if summary.get("resumed_problems"):
        line += f"; {summary['resumed_problems']} problems resumed from an earlier run (counted, not checked again)"
    return line
