"""Student evaluation: any model folder on any problem set, scored by math-verify.

`evaluate(cfg)` renders every problem with the model's own chat template, generates whole responses
with vLLM engines running in Ray actors (`gen_ssd_ray.actors.TeacherEngine`, data parallel over
`model.num_engines`), extracts final answers (`core.answers.extract_final_answer`), checks them with
the `Verifier` exactly as the generation job does, and writes two files to `output.dir`:

- `predictions.parquet`: one row per problem x sample (`PREDICTION_SCHEMA`). `status` is `completed`
  (ended with EOS), `truncated` (hit `sampling.max_new_tokens` or the model length) or `error` (the
  reason in `error`: a bad data row, a prompt that does not fit `model.max_model_len` with the
  response budget, or a prompt the engine rejected). Only completed samples get a `final_answer`
  and a verdict; `correct` is null ("unverified") for the others and where no answer could be checked.
- `summary.json`, written last: accuracy (mean over non-error problems of the fraction of correct
  samples), counts, mean response length, throughput, the model's revision, the data, the sampling
  and a fingerprint of everything that changes the result.

Both files are written atomically (temporary name, fsync, rename); a stale summary.json is removed
before new predictions land, so a summary.json always describes the predictions.parquet beside it.
A folder whose summary.json has the same fingerprint is not evaluated again (`evaluate` returns the
stored summary with "skipped": true, starting nothing); a different fingerprint is refused unless
`output.force=true`, which always re-evaluates and overwrites.

Bad input fails in `prepare`, before Ray or any actor starts: a missing model folder or tokenizer, a
model without a chat template, an unusable data source, a refused output folder (all ValueErrors).
An engine that dies or misses `runtime.call_timeout_s` has its batch retried up to
`runtime.max_attempts` times, then the run fails (`EngineFailure`) without writing anything.

ray, vllm and transformers are imported inside functions; importing this module is cheap.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import signal
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from gen_ssd_ray.common.cluster import init_ray
from gen_ssd_ray.common.data import Problem, chat_messages
from gen_ssd_ray.common.fsio import atomic_write_json, atomic_writer
from gen_ssd_ray.core.answers import extract_final_answer
from gen_ssd_ray.generate.config import (
    DEFAULT_STUDENT,
    DataConfig,
    PromptConfig,
    model_revision,
    require,
)

log = logging.getLogger("gen_ssd_ray")

PREDICTIONS_NAME = "predictions.parquet"
SUMMARY_NAME = "summary.json"
STATUSES = ("completed", "truncated", "error")
# Batches in flight per engine: one generating, one queued behind it, so the engine does not idle
# while the driver collects and verifies a finished batch.
INFLIGHT_BATCHES_PER_ENGINE = 2

PREDICTION_SCHEMA: pa.Schema = pa.schema(
    [
        pa.field("problem_id", pa.string(), nullable=False),
        pa.field("sample_index", pa.int32(), nullable=False),
        pa.field("question", pa.string()),
        pa.field("gold_answer", pa.string()),
        pa.field("prompt", pa.string()),  # the rendered chat prompt
        pa.field("response", pa.string()),
        pa.field("final_answer", pa.string()),  # completed samples only
        pa.field("correct", pa.bool_()),  # null: unverified
        pa.field("status", pa.string(), nullable=False),  # completed | truncated | error
        pa.field("error", pa.string()),  # the reason; null unless status == "error"
        pa.field("num_response_tokens", pa.int32()),
        pa.field("model", pa.string()),  # model.model as configured
        pa.field("seed", pa.int64()),  # the request seed of the problem
    ]
)


# ---- config ----------------------------------------------------------------------------------------


@dataclass
class EvalModelConfig:
    # Hugging Face folder or hub id (offline cache) of the model to evaluate, or "embedded:student".
    model: str = DEFAULT_STUDENT
    # Weights dtype for vLLM: bfloat16, float16, float32 or auto.
    dtype: str = "bfloat16"
    # Context length: prompt + sampling.max_new_tokens must fit, or the problem is an error row.
    max_model_len: int = 2048
    # vLLM engines (Ray actors); problems are split across them (data parallel).
    num_engines: int = 1
    # Ray resources per engine actor. On GPU: num_gpus = tensor_parallel_size.
    num_gpus: float = 0.0
    num_cpus: float = 1.0
    tensor_parallel_size: int = 1
    # GPU: fraction of device memory for weights + KV cache. CPU: see kv_cache_gib.
    gpu_memory_utilization: float = 0.85
    # CPU only: KV cache size in GiB (VLLM_CPU_KVCACHE_SPACE).
    kv_cache_gib: float = 1.0
    # Skip torch.compile / CUDA graphs: faster start-up, slower generation.
    enforce_eager: bool = False
    # Max sequences an engine batches at once; also sizes the batches sent to each engine.
    max_num_seqs: int = 128
    trust_remote_code: bool = False


@dataclass
class EvalSamplingConfig:
    # 0 = greedy decoding (then n must be 1).
    temperature: float = 0.0
    top_p: float = 1.0
    # Samples per problem; accuracy is the mean over problems of the fraction of correct samples.
    n: int = 1
    # Response token budget; a sample that reaches it is "truncated".
    max_new_tokens: int = 512
    # Base seed; each problem's request seed derives from it and the problem id.
    seed: int = 0


@dataclass
class EvalOutputConfig:
    # Folder for predictions.parquet and summary.json.
    dir: str = "outputs/evaluate"
    # Re-evaluate and overwrite whatever the folder holds (otherwise: same fingerprint = skip,
    # different fingerprint = refused).
    force: bool = False


@dataclass
class EvalRuntimeConfig:
    # Ray address, e.g. "auto" (null: RAY_ADDRESS if set, as under `ray job submit`, else a private
    # local Ray started for this run).
    ray_address: str | None = None
    # CPUs for a local Ray started by the job (null: all).
    local_num_cpus: int | None = None
    # Deadline in seconds for each generate call (one batch of up to model.max_num_seqs / n prompts).
    call_timeout_s: float = 600.0
    # Engine start-up deadline (model load + warm-up).
    startup_timeout_s: float = 900.0
    # Attempts per batch (engine death, missed deadline) before the run fails.
    max_attempts: int = 2
    # math-verify worker processes and the per-answer deadline.
    verify_workers: int = 2
    verify_timeout_s: float = 10.0
    # Show a progress bar (false: log lines only).
    progress: bool = True


def _all_problems() -> DataConfig:
    return DataConfig(limit=None)


@dataclass
class EvaluateConfig:
    model: EvalModelConfig = field(default_factory=EvalModelConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    sampling: EvalSamplingConfig = field(default_factory=EvalSamplingConfig)
    # Default: the whole GSM8K test set (data.limit=null).
    data: DataConfig = field(default_factory=_all_problems)
    output: EvalOutputConfig = field(default_factory=EvalOutputConfig)
    runtime: EvalRuntimeConfig = field(default_factory=EvalRuntimeConfig)

    def validate(self) -> None:
        """Cross-field and value checks (ConfigError naming the key and the fix)."""
        _validate_model(self.model)
        _validate_sampling(self.sampling, self.model)
        require("{question}" in self.prompt.instruction, "prompt.instruction", "must contain {question}")
        d, o, r = self.data, self.output, self.runtime
        require(d.limit is None or d.limit >= 1, "data.limit", f"must be >= 1 or null, got {d.limit}")
        require(d.offset >= 0, "data.offset", f"must be >= 0, got {d.offset}")
        require(bool(d.question_field) and bool(d.answer_field), "data.question_field", "must not be empty")
        require(bool(o.dir), "output.dir", "must not be empty")
        require(
            r.local_num_cpus is None or r.local_num_cpus >= 1,
            "runtime.local_num_cpus",
            "must be >= 1 or null",
        )
        require(r.call_timeout_s > 0, "runtime.call_timeout_s", f"must be > 0, got {r.call_timeout_s}")
        require(r.startup_timeout_s > 0, "runtime.startup_timeout_s", "must be > 0")
        require(r.max_attempts >= 1, "runtime.max_attempts", f"must be >= 1, got {r.max_attempts}")
        require(r.verify_workers >= 1, "runtime.verify_workers", f"must be >= 1, got {r.verify_workers}")
        require(r.verify_timeout_s > 0, "runtime.verify_timeout_s", "must be > 0")


def _validate_model(m: EvalModelConfig) -> None:
    require(bool(m.model), "model.model", "must name a model folder, a hub id or embedded:student")
    dtypes = ("auto", "bfloat16", "float16", "float32")
    require(m.dtype in dtypes, "model.dtype", f"must be one of {', '.join(dtypes)}, got {m.dtype!r}")
    require(m.max_model_len >= 2, "model.max_model_len", f"must be >= 2, got {m.max_model_len}")
    require(m.num_engines >= 1, "model.num_engines", f"must be >= 1, got {m.num_engines}")
    require(m.tensor_parallel_size >= 1, "model.tensor_parallel_size", "must be >= 1")
    require(m.num_cpus >= 0 and m.num_gpus >= 0, "model.num_cpus", "resources must be >= 0")
    require(
        m.num_gpus == 0 or m.num_gpus >= m.tensor_parallel_size,
        "model.num_gpus",
        f"is {m.num_gpus} but model.tensor_parallel_size={m.tensor_parallel_size}; set num_gpus to at least it",
    )
    require(0 < m.gpu_memory_utilization <= 1, "model.gpu_memory_utilization", "must be in (0, 1]")
    require(m.kv_cache_gib > 0, "model.kv_cache_gib", f"must be > 0, got {m.kv_cache_gib}")
    require(m.max_num_seqs >= 1, "model.max_num_seqs", f"must be >= 1, got {m.max_num_seqs}")


def _validate_sampling(s: EvalSamplingConfig, m: EvalModelConfig) -> None:
    require(s.temperature >= 0, "sampling.temperature", f"must be >= 0, got {s.temperature}")
    require(0 < s.top_p <= 1, "sampling.top_p", f"must be in (0, 1], got {s.top_p}")
    require(s.n >= 1, "sampling.n", f"must be >= 1, got {s.n}")
    require(
        s.temperature > 0 or s.n == 1,
        "sampling.n",
        f"is {s.n} with greedy decoding (sampling.temperature=0), which gives {s.n} identical samples; "
        "set sampling.n=1 or sampling.temperature > 0 (e.g. 0.6)",
    )
    require(s.max_new_tokens >= 1, "sampling.max_new_tokens", f"must be >= 1, got {s.max_new_tokens}")
    require(
        s.max_new_tokens < m.max_model_len,
        "sampling.max_new_tokens",
        f"{s.max_new_tokens} leaves no room for the prompt in model.max_model_len={m.max_model_len}; "
        "raise model.max_model_len or lower sampling.max_new_tokens",
    )


# ---- preparation: everything that can fail on bad input, before any actor starts -------------------


class EvaluationExistsError(ValueError):
    """The output folder holds an evaluation with another fingerprint (refused without output.force)."""


class EngineFailure(RuntimeError):
    """Engines did not start, or a batch failed on every attempt: nothing was written."""


@dataclass(frozen=True)
class RenderedPrompt:
    """A problem's chat prompt as text and token ids, or why it cannot be generated (`error`)."""

    text: str | None = None
    token_ids: tuple[int, ...] = ()
    error: str | None = None


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

    Raises ModelNotFoundError, DataError, EvaluationExistsError or ValueError (all ValueErrors) with
    a message naming the config key and the fix.
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
        tokenizer = load_tokenizer(cfg.model, model_path)
        prepared.prompts = render_prompts(
            tokenizer, cfg.prompt, problems, cfg.model.max_model_len, cfg.sampling.max_new_tokens
        )
    return prepared


def evaluation_fingerprint(cfg: EvaluateConfig, revision: str, problems: Sequence[Problem]) -> str:
    """Hash of what changes the result: the model's revision and dtype, max_model_len (which prompts
    fit), the problems' content, the prompt and the sampling. Resources and output placement are out."""
    content = hashlib.sha256()
    for p in problems:
        content.update(json.dumps([p.problem_id, p.question, p.gold_answer, p.error]).encode())
    picked = {
        "model": {"revision": revision, "dtype": cfg.model.dtype, "max_model_len": cfg.model.max_model_len},
        "data": {"path": cfg.data.path, "split": cfg.data.split, "problems": content.hexdigest()},
        "prompt": dataclasses.asdict(cfg.prompt),
        "sampling": dataclasses.asdict(cfg.sampling),
    }
    blob = json.dumps(picked, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


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


def load_tokenizer(m: EvalModelConfig, model_path: str):
    """The model's tokenizer; a ValueError naming model.model if it is missing or has no chat template."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(model_path, trust_remote_code=m.trust_remote_code)
    except Exception as e:  # transformers raises OSError, ValueError, KeyError... for a bad folder
        raise ValueError(
            f"model.model={m.model!r}: cannot load a tokenizer from {model_path} ({type(e).__name__}: {e})"
        ) from None
    if not getattr(tok, "chat_template", None):
        raise ValueError(
            f"model.model={m.model!r}: the tokenizer has no chat template, and prompts are rendered with "
            "the model's own template; use a chat/instruct model folder or add a chat_template.jinja to it"
        )
    return tok


def render_prompts(
    tokenizer, prompt: PromptConfig, problems: Sequence[Problem], max_model_len: int, max_new_tokens: int
) -> list[RenderedPrompt]:
    """One `RenderedPrompt` per problem: the chat template with the generation prompt, as token ids.

    A bad problem row keeps its own error; a prompt with no room for `max_new_tokens` within
    `max_model_len` gets an error naming both keys.
    """
    rendered = []
    for p in problems:
        if p.error is not None or p.question is None:
            rendered.append(RenderedPrompt(error=p.error or "no question"))
            continue
        text = tokenizer.apply_chat_template(
            chat_messages(prompt, p.question), tokenize=False, add_generation_prompt=True
        )
        ids = tuple(tokenizer(text, add_special_tokens=False)["input_ids"])
        error = None
        if len(ids) + max_new_tokens > max_model_len:
            error = (
                f"prompt has {len(ids)} tokens; with sampling.max_new_tokens={max_new_tokens} it exceeds "
                f"model.max_model_len={max_model_len} (raise it or lower sampling.max_new_tokens)"
            )
        rendered.append(RenderedPrompt(text, ids, error))
    return rendered


def problem_seed(base: int, problem_id: str) -> int:
    """The request seed of a problem: results do not depend on batching, engine count or order."""
    h = hashlib.blake2b(f"{base}/{problem_id}".encode(), digest_size=4).digest()
    return int.from_bytes(h, "big") & 0x7FFFFFFF


# ---- rows and the summary (pure) -----------------------------------------------------------------


def sample_rows(
    problem: Problem,
    prompt: RenderedPrompt,
    generation: Any | None,
    *,
    n: int,
    model: str,
    seed: int,
) -> list[dict[str, Any]]:
    """The output rows of one problem (without `correct`, which the verifier fills in).

    `generation` is the engine's `Generation` (samples with token ids, text and finish reason, or an
    error); None for a problem that never reached an engine (then `prompt.error` says why).
    """
    base = {
        "problem_id": problem.problem_id,
        "question": problem.question,
        "gold_answer": problem.gold_answer,
        "prompt": prompt.text,
        "model": model,
        "seed": seed,
        "correct": None,
    }
    error = prompt.error or (generation.error if generation is not None else "not generated")
    if error is not None or generation is None:
        failed = {"response": None, "final_answer": None, "status": "error", "error": error}
        return [{**base, "sample_index": i, **failed, "num_response_tokens": 0} for i in range(n)]
    return [{**base, "sample_index": i, **_sample_fields(s)} for i, s in enumerate(generation.samples)]


def _sample_fields(sample: Any) -> dict[str, Any]:
    status = {"stop": "completed", "length": "truncated"}.get(sample.finish_reason, "error")
    return {
        "response": sample.text,
        "final_answer": extract_final_answer(sample.text) if status == "completed" else None,
        "status": status,
        "error": None if status != "error" else f"generation ended with finish_reason={sample.finish_reason}",
        "num_response_tokens": len(sample.token_ids),
    }


def summarize(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy and counts over prediction rows.

    accuracy: mean over problems with at least one non-error sample of (correct samples / non-error
    samples); error rows are counted apart, never as wrong. unverified: non-error samples whose
    `correct` is null (truncated, no answer, or math-verify could not parse it).
    """
    by_problem: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_problem.setdefault(r["problem_id"], []).append(r)
    fractions = []
    for samples in by_problem.values():
        scored = [r for r in samples if r["status"] != "error"]
        if scored:
            fractions.append(sum(r.get("correct") is True for r in scored) / len(scored))
    scored_rows = [r for r in rows if r["status"] != "error"]
    tokens = sum(r["num_response_tokens"] or 0 for r in scored_rows)
    statuses = Counter(r["status"] for r in rows)
    return {
        "accuracy": round(sum(fractions) / len(fractions), 6) if fractions else None,
        "problems": len(by_problem),
        "problems_scored": len(fractions),
        "problems_error": len(by_problem) - len(fractions),
        "samples": len(rows),
        "samples_by_status": {s: statuses.get(s, 0) for s in STATUSES},
        "correct": sum(r.get("correct") is True for r in scored_rows),
        "incorrect": sum(r.get("correct") is False for r in scored_rows),
        "unverified": sum(r.get("correct") is None for r in scored_rows),
        "mean_response_tokens": round(tokens / len(scored_rows), 2) if scored_rows else None,
        "generated_tokens": tokens,
    }


# ---- the run ----------------------------------------------------------------------------------------


def evaluate(cfg: EvaluateConfig, prepared: Prepared | None = None) -> dict[str, Any]:
    """Evaluate `cfg.model` on `cfg.data`; write predictions.parquet and summary.json; return the summary.

    Raises the `prepare` errors (bad input), EngineFailure, and KeyboardInterrupt on SIGINT/SIGTERM
    (engines are shut down and nothing is written).
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
    from gen_ssd_ray.common.verify import Verifier
    from gen_ssd_ray.engines.actors import Pools, shutdown_pools

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
        restore = _sigterm_interrupts()
        verifier = Verifier(workers=cfg.runtime.verify_workers, timeout_s=cfg.runtime.verify_timeout_s)
        engines: list = []
        progress = None
        try:
            engines = start_engines(cfg, p.model_path)
            t0 = time.perf_counter()  # rates exclude engine start-up
            progress = _Progress(len(p.problems), len(p.problems) - len(todo), cfg.runtime.progress)
            prompts = [p.prompts[i].token_ids for i in range(len(p.problems))]
            for batch, generations in run_batches(engines, batches(todo, cfg), prompts, seeds, cfg):
                for i, g in zip(batch, generations, strict=True):
                    rows[i] = sample_rows(p.problems[i], p.prompts[i], g, n=n, model=name, seed=seeds[i])
                    _verify(verifier, rows[i])
                progress.update(len(batch), sum(r["num_response_tokens"] for i in batch for r in rows[i]))
            generation_s = time.perf_counter() - t0
        finally:
            if progress is not None:
                progress.close()
            verifier.close()
            if engines:
                shutdown_pools(Pools(teachers=engines, scorers=[], managers=[]))
            restore()
    return [r for i in range(len(p.problems)) for r in rows[i]], generation_s


def _sigterm_interrupts() -> Callable[[], None]:
    """Make SIGTERM (`ray job stop`) behave like Ctrl-C (KeyboardInterrupt); returns the undo.

    Installed after ray.init, which sets its own handler. Nothing is written before the end, so an
    interrupt anywhere only has to shut the engines down (the `finally` above)."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def interrupt(*_: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    return lambda: signal.signal(signal.SIGTERM, previous)


def engine_spec(cfg: EvaluateConfig, model_path: str):
    from gen_ssd_ray.engines.teacher_vllm import TeacherEngineSpec

    m, s = cfg.model, cfg.sampling
    return TeacherEngineSpec(
        model=model_path,
        dtype=m.dtype,
        max_model_len=m.max_model_len,
        tensor_parallel_size=m.tensor_parallel_size,
        gpu_memory_utilization=m.gpu_memory_utilization,
        kv_cache_gib=m.kv_cache_gib,
        max_num_seqs=m.max_num_seqs,
        enforce_eager=m.enforce_eager,
        trust_remote_code=m.trust_remote_code,
        temperature=s.temperature,
        top_p=s.top_p,
        seed=s.seed,
    )


def start_engines(cfg: EvaluateConfig, model_path: str) -> list:
    """`model.num_engines` TeacherEngine actors with resources from the config, waited for until ready.

    Raises EngineFailure (after killing them) if one fails to start or misses runtime.startup_timeout_s.
    """
    import ray

    from gen_ssd_ray.engines.actors import TeacherEngine, _engine_env

    m = cfg.model
    engine_cls = ray.remote(TeacherEngine).options(
        num_cpus=m.num_cpus,
        num_gpus=m.num_gpus,
        max_restarts=1,
        max_task_retries=0,
        max_concurrency=4 * INFLIGHT_BATCHES_PER_ENGINE,
        runtime_env={"env_vars": _engine_env(m.kv_cache_gib)},
    )
    spec = engine_spec(cfg, model_path)
    engines = [engine_cls.remote(spec) for _ in range(m.num_engines)]
    try:
        ray.get([e.ready.remote() for e in engines], timeout=cfg.runtime.startup_timeout_s)
    except BaseException as e:  # KeyboardInterrupt too: never leave half-started engines behind
        for a in engines:
            ray.kill(a)
        if not isinstance(e, Exception):
            raise
        raise EngineFailure(
            f"the vLLM engines for {model_path} did not start ({_reason(e)}); see the actor log above "
            f"(runtime.startup_timeout_s={cfg.runtime.startup_timeout_s:g}, model.num_gpus={m.num_gpus:g})"
        ) from None
    return engines


def batches(todo: Sequence[int], cfg: EvaluateConfig) -> list[list[int]]:
    """Problem indices in batches of at most max_num_seqs / n prompts, at least one batch per engine."""
    per_call = max(1, cfg.model.max_num_seqs // cfg.sampling.n)
    per_engine = -(-len(todo) // cfg.model.num_engines)
    size = max(1, min(per_call, per_engine))
    return [list(todo[k : k + size]) for k in range(0, len(todo), size)]


def run_batches(
    engines: list,
    todo: list[list[int]],
    prompts: Sequence[Sequence[int]],
    seeds: Sequence[int],
    cfg: EvaluateConfig,
) -> Iterator[tuple[list[int], list]]:
    """Send batches to the least-loaded engine (INFLIGHT_BATCHES_PER_ENGINE each); yield
    `(batch, generations)` as they finish. Each call has the deadline runtime.call_timeout_s; a failed
    or overdue batch is retried up to runtime.max_attempts, then EngineFailure is raised."""
    import ray

    r, s = cfg.runtime, cfg.sampling
    queue = deque((b, 1) for b in todo)
    pending: dict[Any, tuple[list[int], int, int, float]] = {}  # ref -> (batch, engine, attempt, deadline)
    load = [0] * len(engines)
    while queue or pending:
        # 1. Keep every engine busy, the least loaded first.
        while queue and min(load) < INFLIGHT_BATCHES_PER_ENGINE:
            e = min(range(len(load)), key=load.__getitem__)
            batch, attempt = queue.popleft()
            ref = engines[e].generate.remote(
                [list(prompts[i]) for i in batch], s.n, s.max_new_tokens, [seeds[i] for i in batch]
            )
            pending[ref] = (batch, e, attempt, time.monotonic() + r.call_timeout_s)
            load[e] += 1
        # 2. Collect what finished, and what missed its deadline.
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
        now = time.monotonic()
        overdue = [ref for ref, v in pending.items() if v[3] < now and ref not in ready]
        for ref in [*ready, *overdue]:
            batch, e, attempt, _ = pending.pop(ref)
            load[e] -= 1
            generations, failure = None, f"no answer within runtime.call_timeout_s={r.call_timeout_s:g}"
            if ref in overdue:
                ray.cancel(ref)
            else:
                try:
                    generations = ray.get(ref)
                except Exception as exc:
                    failure = _reason(exc)
            if generations is not None:
                yield batch, generations  # outside the try: the consumer's errors are not batch failures
                continue
            # 3. Retry a failed batch, or give up on the run.
            if attempt >= r.max_attempts:
                raise EngineFailure(
                    f"a batch of {len(batch)} problems failed {attempt} times (last: {failure}); nothing was "
                    "written, re-run the same command (raise runtime.call_timeout_s if engines are slow)"
                )
            log.warning("batch of %d problems failed on engine %d (%s); retrying", len(batch), e, failure)
            queue.append((batch, attempt + 1))


def _reason(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None) or exc
    text = str(cause).strip()
    return f"{type(cause).__name__}: {text.splitlines()[-1] if text else ''}"


def _verify(verifier, rows: list[dict[str, Any]]) -> None:
    """math-verify on completed samples (as the generation job does); the others stay null."""
    todo = [r for r in rows if r["status"] == "completed"]
    results = verifier.verify_many([(r["gold_answer"], r["final_answer"]) for r in todo])
    for r, ok in zip(todo, results, strict=True):
        r["correct"] = ok


class _Progress:
    """A tqdm bar over problems, or (runtime.progress=false) one log line per finished batch."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self.total, self.done, self.tokens = total, initial, 0
        self.started = time.perf_counter()
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="problem", dynamic_ncols=True, desc="evaluate")

    def update(self, problems: int, tokens: int) -> None:
        self.done += problems
        self.tokens += tokens
        rate = self.tokens / max(time.perf_counter() - self.started, 1e-9)
        if self.bar is not None:
            self.bar.update(problems)
            self.bar.set_postfix({"tok/s": f"{rate:.0f}"}, refresh=False)
        else:
            log.info("evaluate: problems %d/%d, %.0f generated tok/s", self.done, self.total, rate)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---- files ---------------------------------------------------------------------------------------


def write_predictions(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """The rows as Parquet with exactly `PREDICTION_SCHEMA`, written atomically."""
    import pyarrow.parquet as pq

    names = PREDICTION_SCHEMA.names
    table = pa.Table.from_pylist([{k: r.get(k) for k in names} for r in rows], schema=PREDICTION_SCHEMA)
    with atomic_writer(path) as fh:
        pq.write_table(table, fh)


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
