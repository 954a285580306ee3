"""Student evaluation: any model folder on any problem set, scored by math-verify.

`evaluate(cfg)` renders every problem with the model's own chat template (the one renderer,
gen_ssd_ray.common.prompts), generates whole responses with engine actors
(`gen_ssd_ray.engines.actors.TeacherEngine`, data parallel over `model.num_engines`, fed by the shared
dispatcher), extracts final answers, checks them with the `Verifier` exactly as the generation job
does, and writes two files to `output.dir`:

- `predictions.parquet`: one row per problem x sample (gen_ssd_ray.evaluate.rows: the typed row, its
  statuses and `PREDICTION_SCHEMA`).
- `summary.json`, written last: accuracy (mean over non-error problems of the fraction of correct
  samples), counts, mean response length, throughput, the model's revision, the data, the sampling
  and a fingerprint of everything that changes the result.

Both files are written atomically (temporary name, fsync, rename); a stale summary.json is removed
before new predictions land, so a summary.json always describes the predictions.parquet beside it.
A folder whose summary.json has the same fingerprint is not evaluated again (`evaluate` returns the
stored summary with "skipped": true, starting nothing); a different fingerprint is refused unless
`output.force=true`, which always re-evaluates and overwrites.

Bad input fails in `prepare`, before Ray or any actor starts: a missing model folder or tokenizer, a
model without a chat template, an unusable data source, a refused output folder (all InputErrors).
An engine that dies or misses `runtime.call_timeout_s` has its batch retried up to
`runtime.max_attempts` times, then the run fails (`JobFailed`) without writing anything; SIGINT/SIGTERM
stop it the same way (`JobInterrupted`).

ray, vllm and transformers are imported inside functions; importing this module is cheap.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gen_ssd_ray.common.cluster import init_ray
from gen_ssd_ray.common.data import Problem
from gen_ssd_ray.common.errors import InputError, JobFailed, JobInterrupted
from gen_ssd_ray.common.fsio import atomic_write_json
from gen_ssd_ray.common.models import model_revision
from gen_ssd_ray.common.prompts import RenderedPrompt, load_chat_tokenizer, render_prompt
from gen_ssd_ray.evaluate.config import EvaluateConfig, evaluation_fingerprint
from gen_ssd_ray.evaluate.rows import problem_seed, sample_rows, summarize, write_predictions

log = logging.getLogger("gen_ssd_ray")

PREDICTIONS_NAME = "predictions.parquet"
SUMMARY_NAME = "summary.json"
# Batches in flight per engine: one generating, one queued behind it, so the engine does not idle
# while the driver collects and verifies a finished batch.
INFLIGHT_BATCHES_PER_ENGINE = 2


class EvaluationExistsError(InputError):
    """The output folder holds an evaluation with another fingerprint (refused without output.force)."""


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


def prepare(cfg: EvaluateConfig) -> Prepared:
    """Resolve the model, load the problems, check the output folder, render the prompts.

    Raises ModelNotFoundError, DataError, EvaluationExistsError or InputError with a message naming
    the config key and the fix.
    """
    from gen_ssd_ray.common.data import load_problems
    from gen_ssd_ray.common.models import resolve_model

    model_path = resolve_model(cfg.model.model)
    revision = model_revision(model_path)
    problems = load_problems(cfg.data)
    fp = evaluation_fingerprint(cfg, revision, problems)
    existing = check_existing(Path(cfg.output.dir), fp, cfg.output.force)
    prepared = Prepared(model_path, revision, problems, fp, existing)
    if existing is None:
        key = f"model.model={cfg.model.model!r}"
        tokenizer = load_chat_tokenizer(model_path, key, cfg.model.trust_remote_code)
        prepared.prompts = render_prompts(
            tokenizer, cfg.prompt, problems, cfg.model.max_model_len, cfg.sampling.max_new_tokens
        )
    return prepared


def check_existing(out_dir: Path, fingerprint: str, force: bool) -> dict[str, Any] | None:
    """The stored summary if `out_dir` already holds this exact evaluation (skip it), else None (run).

    Raises EvaluationExistsError if it holds a different one and `force` is not set.
    """
    summary_path = out_dir / SUMMARY_NAME
    if force or not summary_path.is_file():
        return None
    try:
        stored = json.loads(summary_path.read_text())
        old = stored.get("fingerprint") if isinstance(stored, dict) else None
    except (OSError, ValueError):
        stored, old = None, "(unreadable summary.json)"
    if old != fingerprint:
        raise EvaluationExistsError(
            f"output.dir={str(out_dir)!r} holds an evaluation with fingerprint {old} (another model, data, "
            f"prompt or sampling; this one is {fingerprint}): set output.force=true to overwrite it, "
            "or choose another output.dir"
        )
    if not (out_dir / PREDICTIONS_NAME).is_file():
        log.warning("%s: summary.json without %s; evaluating again", out_dir, PREDICTIONS_NAME)
        return None
    return stored


def render_prompts(
    tokenizer, prompt, problems: Sequence[Problem], max_model_len: int, max_new_tokens: int
) -> list[RenderedPrompt]:
    """One `RenderedPrompt` per problem (gen_ssd_ray.common.prompts.render_prompt).

    A bad problem row keeps its own error; a prompt with no room for `max_new_tokens` within
    `max_model_len` gets an error naming both keys.
    """
    rendered = []
    for p in problems:
        if p.error is not None or p.question is None:
            rendered.append(RenderedPrompt(error=p.error or "no question"))
            continue
        r = render_prompt(tokenizer, prompt, p.question)
        if len(r.token_ids) + max_new_tokens > max_model_len:
            r = dataclasses.replace(
                r,
                error=f"prompt has {len(r.token_ids)} tokens; with sampling.max_new_tokens={max_new_tokens} it "
                f"exceeds model.max_model_len={max_model_len} (raise it or lower sampling.max_new_tokens)",
            )
        rendered.append(r)
    return rendered


# ---- the run ----------------------------------------------------------------------------------------


def evaluate(cfg: EvaluateConfig, prepared: Prepared | None = None) -> dict[str, Any]:
    """Evaluate `cfg.model` on `cfg.data`; write predictions.parquet and summary.json; return the summary.

    Raises the `prepare` errors (bad input), JobFailed (engines failed), and JobInterrupted on SIGINT or
    SIGTERM (engines are shut down and nothing is written).
    """
    started = time.perf_counter()
    p = prepared or prepare(cfg)
    if p.existing is not None:
        log.info("%s already holds this evaluation (fingerprint %s): skipped", cfg.output.dir, p.fingerprint)
        return {**p.existing, "skipped": True}
    assert p.prompts is not None
    rows, generation_s = _generate_rows(cfg, p)
    summary = {
        **summarize(rows),
        "elapsed_s": round(time.perf_counter() - started, 1),
        "generation_s": round(generation_s, 1),
        **_describe(cfg, p),
    }
    summary["tokens_per_s"] = round(summary["generated_tokens"] / generation_s, 1) if generation_s else None
    out = Path(cfg.output.dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / SUMMARY_NAME).unlink(missing_ok=True)  # never leave an old summary beside new predictions
    write_predictions(out / PREDICTIONS_NAME, rows)
    atomic_write_json(out / SUMMARY_NAME, summary, indent=2)
    return summary


def _describe(cfg: EvaluateConfig, p: Prepared) -> dict[str, Any]:
    out = Path(cfg.output.dir)
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
        "output_dir": str(out),
        "predictions": str(out / PREDICTIONS_NAME),
    }


def _generate_rows(cfg: EvaluateConfig, p: Prepared) -> tuple[list[dict[str, Any]], float]:
    """Rows for every problem in input order, and the seconds spent generating (engine start excluded)."""
    from gen_ssd_ray.common.interrupts import stop_on_signals
    from gen_ssd_ray.common.progress import Progress
    from gen_ssd_ray.common.verify import Verifier
    from gen_ssd_ray.engines.actors import actors_of, stop_actors

    assert p.prompts is not None
    n, name = cfg.sampling.n, cfg.model.model
    seeds = [problem_seed(cfg.sampling.seed, q.problem_id) for q in p.problems]
    rows: dict[int, list[dict[str, Any]]] = {}
    todo = []
    for i, (problem, prompt) in enumerate(zip(p.problems, p.prompts, strict=True)):
        if prompt.error is not None:  # bad row or too long: an error row, no engine needed
            rows[i] = sample_rows(problem, prompt, None, n=n, model=name, seed=seeds[i])
        else:
            todo.append(i)
    generation_s = 0.0
    if todo:
        init_ray(cfg.runtime.ray_address, cfg.runtime.local_num_cpus)
        verifier = Verifier(workers=cfg.runtime.verify_workers, timeout_s=cfg.runtime.verify_timeout_s)
        engines: list = []
        progress = None
        try:
            engines = start_engines(cfg, p.model_path)
            t0 = time.perf_counter()  # rates exclude engine start-up
            progress = Progress(
                "evaluate", len(p.problems), len(p.problems) - len(todo), cfg.runtime.progress
            )
            with stop_on_signals() as stop:
                for batch, generations in generate_batches(cfg, engines, batches(todo, cfg), p, seeds, stop):
                    for i, g in zip(batch, generations, strict=True):
                        rows[i] = sample_rows(p.problems[i], p.prompts[i], g, n=n, model=name, seed=seeds[i])
                        verifier.verify_rows(rows[i])
                    progress.update(len(batch), sum(r["num_response_tokens"] for i in batch for r in rows[i]))
            if stop.is_set():
                raise JobInterrupted("evaluation interrupted: engines stopped, nothing written")
            generation_s = time.perf_counter() - t0
        finally:
            if progress is not None:
                progress.close()
            verifier.close()
            if engines:
                stop_actors(actors_of(engines))
    return [r for i in range(len(p.problems)) for r in rows[i]], generation_s


def start_engines(cfg: EvaluateConfig, model_path: str) -> list:
    """`model.num_engines` engine actors with resources from the config, waited for until ready.

    Raises JobFailed (after killing them) if one fails to start or misses runtime.startup_timeout_s.
    """
    from gen_ssd_ray.engines.actors import actors_of, create_engine_pool, wait_ready

    m = cfg.model
    engines = create_engine_pool(
        m,
        model_path,
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
    INFLIGHT_BATCHES_PER_ENGINE each, deadline runtime.call_timeout_s per call). A batch that failed on
    every one of runtime.max_attempts raises JobFailed."""
    from gen_ssd_ray.common.dispatch import Dispatcher, ray_calls
    from gen_ssd_ray.core.types import ExpandRequest

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

    dispatcher = Dispatcher(
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
    for out in dispatcher.run(todo):
        if not out.ok:
            raise JobFailed(
                f"a batch of {len(out.item)} problems failed {out.attempts} times (last: {out.error}); nothing "
                "was written, re-run the same command (raise runtime.call_timeout_s if engines are slow)"
            )
        yield out.item, out.result


# ---- files ---------------------------------------------------------------------------------------


def format_summary(summary: dict[str, Any]) -> str:
    """What a person reads at the end of `python -m jobs.evaluate`."""
    out = Path(summary["output_dir"]).resolve()
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
        "truncated = hit sampling.max_new_tokens)",
        f"Accuracy: {summary['accuracy']} (mean over scored problems of the fraction of correct samples); "
        f"correct {summary['correct']}, incorrect {summary['incorrect']}, unverified {summary['unverified']} "
        "(not completed, no answer, or unparseable)",
        f"Mean response length {summary['mean_response_tokens']} tokens; {summary['generated_tokens']} tokens "
        f"generated at {summary['tokens_per_s']} tok/s; elapsed {summary['elapsed_s']} s.",
    ]
    if summary.get("skipped"):
        lines.append(
            "Skipped: this folder already held this exact evaluation (same fingerprint); nothing ran. "
            "Set output.force=true to evaluate again."
        )
    return "\n".join(lines)
