"""The whole distillation experiment as one resumable job (`python -m jobs.pipeline`, `make run`).

Stages, in order, each one a call into the project's own jobs on one Ray (local or the cluster's):

1. `teacher`     the teacher as configured, or, for `teacher: lab:<size>`, a model built from scratch
                 with the lab tokenizer and trained by the fine-tuning job (`teacher_train`);
2. `cold_start`  the student (a folder, or `lab:<size>` from scratch) fine-tuned on ordinary
                 solutions (`cold_start`), so that its perplexity means something on teacher-style text;
3. `generate/M`  the generation job once per method M in `methods` (teacher + cold-start student);
                 standard_kd samples `kd_samples` and posthoc_ppl `posthoc_samples` whole solutions
                 per problem;
4. `distill/M`   the cold-start student fine-tuned on M's selected trajectories (`distill`);
5. `eval/X`      the evaluation job on held-out problems for the teacher, the cold-start student and
                 every distilled student (`evaluate`);
6. `report`      Markdown and PNG plots from the run's own files (`gen_ssd_ray.pipeline.report`).

Every stage writes to its own folder under `output_dir` and is resumable on its own (generation skips
committed problems, fine-tuning resumes from its last checkpoint and skips a complete run, evaluation
skips a folder with the same fingerprint), so re-running the same command skips finished stages and
continues the interrupted one. The pipeline fills in what links the stages (model paths, data paths,
output folders, the prompt, the method); everything else comes from the stage sections of the config.

A method whose filter keeps no trajectory gets no distilled student: the stage is recorded as
`empty` with the reason and the others go on.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gen_ssd_ray.evaluate.run import EvaluateConfig
from gen_ssd_ray.generate.config import ConfigError, GenerateConfig, PromptConfig, require
from gen_ssd_ray.train.config import FinetuneConfig

log = logging.getLogger("gen_ssd_ray")

LAB_PREFIX = "lab:"
STATE_NAME = "pipeline.json"


def _default_methods() -> list[str]:
    return ["gen_ssd", "standard_kd", "posthoc_ppl"]


def _distill_defaults() -> FinetuneConfig:
    cfg = FinetuneConfig()
    cfg.data.filters = ["selected == True"]
    return cfg


@dataclass
class PipelineRuntimeConfig:
    # Ray address (null: RAY_ADDRESS if set, as under `ray job submit`, else a private local Ray).
    ray_address: str | None = None
    # CPUs for a local Ray started by the pipeline (null: all).
    local_num_cpus: int | None = None


@dataclass
class PipelineConfig:
    # Every stage writes under this folder; the report lands in <output_dir>/report.
    output_dir: str = "outputs/pipeline"
    # The teacher: a Hugging Face folder, hub id or embedded:teacher used as is, or lab:<size>
    # (gen_ssd_ray.lab.models: teacher, student, medium, large) built from scratch and trained by the
    # teacher_train stage.
    teacher: str = "lab:teacher"
    # The student before its cold start: a folder / embedded:student, or lab:<size> (random init).
    student: str = "lab:student"
    # Initialization seed of lab:<size> models.
    init_seed: int = 0
    # Data-generation methods compared (gen_ssd_ray.core.methods).
    methods: list[str] = field(default_factory=_default_methods)
    # Whole solutions sampled per problem by standard_kd (each correct one is kept) and by posthoc_ppl
    # (the correct one with the lowest student PPL is kept). With kd_samples=1 every method keeps at
    # most one trajectory per problem, so the comparison is about which one, not how many.
    kd_samples: int = 1
    posthoc_samples: int = 4
    # The prompt of every stage (generation, fine-tuning, evaluation).
    prompt: PromptConfig = field(default_factory=PromptConfig)
    # Fine-tuning of a lab:<size> teacher (model.path, output.dir and prompt are set by the pipeline).
    teacher_train: FinetuneConfig = field(default_factory=FinetuneConfig)
    # Cold-start fine-tune of the student on ordinary solutions (model.path, output.dir, prompt set).
    cold_start: FinetuneConfig = field(default_factory=FinetuneConfig)
    # Generation (teacher.model, student.model, method, output.dir, prompt set by the pipeline; the
    # baselines get search.trajectories_per_problem = kd_samples / posthoc_samples).
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    # Fine-tuning of the cold-start student on each method's data (model.path, data.path,
    # data.expect_fingerprint, output.dir, prompt set). Default filter: the method's selection.
    distill: FinetuneConfig = field(default_factory=_distill_defaults)
    # Evaluation of every model on held-out problems (model.model, output.dir, prompt set).
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    runtime: PipelineRuntimeConfig = field(default_factory=PipelineRuntimeConfig)

    def validate(self) -> None:
        from gen_ssd_ray.core.methods import METHODS
        from gen_ssd_ray.lab.models import LAB_MODEL_SIZES

        require(bool(self.output_dir), "output_dir", "must not be empty")
        require(bool(self.methods), "methods", f"must list at least one of {sorted(METHODS)}")
        for m in self.methods:
            require(m in METHODS, "methods", f"unknown method {m!r}; choose from {sorted(METHODS)}")
        require(len(set(self.methods)) == len(self.methods), "methods", "lists a method twice")
        require(
            self.posthoc_samples >= 2 or "posthoc_ppl" not in self.methods,
            "posthoc_samples",
            f"must be >= 2 when methods include posthoc_ppl, got {self.posthoc_samples}",
        )
        require(self.kd_samples >= 1, "kd_samples", f"must be >= 1, got {self.kd_samples}")
        for key in ("teacher", "student"):
            value = getattr(self, key)
            if value.startswith(LAB_PREFIX):
                size = value.removeprefix(LAB_PREFIX)
                require(
                    size in LAB_MODEL_SIZES, key, f"lab size {size!r} unknown; use {sorted(LAB_MODEL_SIZES)}"
                )
        for section in ("teacher_train", "cold_start", "generate", "distill", "evaluate"):
            sub = _linked(self, section)
            try:
                sub.validate()
            except ConfigError as e:
                raise ConfigError(f"{section}.{e}") from None


def _linked(cfg: PipelineConfig, section: str):
    """A stage section with the prompt the pipeline gives every stage."""
    sub = copy.deepcopy(getattr(cfg, section))
    sub.prompt = copy.deepcopy(cfg.prompt)
    return sub


class StageFailed(RuntimeError):
    """A stage failed; re-running the pipeline continues from it."""


class StageInputError(ValueError):
    """A stage refused its input before starting (bad data, or a folder holding another config's results)."""


@contextlib.contextmanager
def _stage_input(name: str, folder: Path):
    """Name the stage in a bad-input error. A folder written with another config is the pipeline's own
    doing (its config changed since): the fix is a new output_dir, or removing that stage's folder and
    every later stage's (they depend on it)."""
    from gen_ssd_ray.evaluate.run import EvaluationExistsError
    from gen_ssd_ray.generate.output import FingerprintMismatchError

    try:
        yield
    except (FingerprintMismatchError, EvaluationExistsError) as e:
        raise StageInputError(
            f"stage {name}: {folder} holds results of a different configuration (the pipeline config or an "
            "earlier stage's result changed since it ran). Use a new output_dir, or delete that folder and the "
            f"folders of the stages after it to redo them. ({e})"
        ) from None
    except ValueError as e:
        raise StageInputError(f"stage {name}: {e}") from None


class PipelineInterrupted(RuntimeError):
    """SIGINT/SIGTERM during a stage: what finished is kept; re-run to continue."""


def _sigterm_interrupts() -> None:
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.default_int_handler)


@contextlib.contextmanager
def _own_signals():
    """Stages install their own SIGINT/SIGTERM handlers; put the pipeline's back after each one."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in saved.items():
            signal.signal(s, h)


class Pipeline:
    """Runs the stages in order and records each one's outcome in `<output_dir>/pipeline.json`."""

    def __init__(self, cfg: PipelineConfig):
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.state: dict[str, Any] = {"init_seed": cfg.init_seed, "methods": list(cfg.methods), "stages": {}}

    # ---- bookkeeping -------------------------------------------------------------------------
    def _record(self, name: str, status: str, started: float, **info: Any) -> None:
        from gen_ssd_ray.common.fsio import atomic_write_json

        self.state["stages"][name] = {
            "status": status,
            "elapsed_s": round(time.perf_counter() - started, 1),
            **info,
        }
        atomic_write_json(self.out / STATE_NAME, self.state, indent=1, default=str)
        log.info("pipeline: stage %s %s (%.1f s)", name, status, time.perf_counter() - started)

    # ---- models ------------------------------------------------------------------------------
    def _base_model(self, spec: str, role: str) -> str:
        """A lab:<size> model built from scratch (once, atomically) or the configured name as is."""
        if not spec.startswith(LAB_PREFIX):
            return spec
        from gen_ssd_ray.lab.models import build_lab_model

        dest = self.out / "models" / f"{role}-init-{spec.removeprefix(LAB_PREFIX)}-seed{self.cfg.init_seed}"
        if not (dest / "config.json").is_file():
            tmp = dest.with_name(f".tmp-{dest.name}")
            shutil.rmtree(tmp, ignore_errors=True)
            build_lab_model(tmp, size=spec.removeprefix(LAB_PREFIX), seed=self.cfg.init_seed)
            tmp.replace(dest)
        return str(dest)

    # ---- stages ------------------------------------------------------------------------------
    def finetune(self, name: str, section: str, model: str, **data: Any) -> dict[str, Any] | None:
        """One fine-tuning stage; None when its filters left nothing to train on."""
        from gen_ssd_ray.train.data import EmptyTrainingSetError
        from gen_ssd_ray.train.run import TrainingFailed, TrainingInterrupted, prepare, run_finetune

        started = time.perf_counter()
        ft: FinetuneConfig = _linked(self.cfg, section)
        ft.model.path = model
        ft.output.dir = str(self.out / name)
        ft.runtime.ray_address = self.cfg.runtime.ray_address
        for k, v in data.items():
            setattr(ft.data, k, v)
        ft.validate()
        with _stage_input(name, self.out / name):
            try:
                prepared = prepare(ft)
            except EmptyTrainingSetError as e:  # a method that kept nothing: no student, the rest goes on
                self._record(name, "empty", started, reason=str(e))
                log.warning("pipeline: %s has nothing to train on: %s", name, e)
                return None
        try:
            with _own_signals():
                summary = run_finetune(ft, prepared)
        except TrainingFailed as e:
            raise StageFailed(f"{name}: {e}") from e
        except TrainingInterrupted as e:
            raise PipelineInterrupted(f"{name}: {e}") from e
        self._record(name, "skipped" if summary.get("skipped") else "done", started, summary=summary)
        return summary

    def _generate_config(self, method: str, teacher: str, student: str) -> GenerateConfig:
        g: GenerateConfig = _linked(self.cfg, "generate")
        g.method = method
        g.teacher.model, g.student.model = teacher, student
        g.output.dir = str(self.out / "generate" / method)
        g.runtime.ray_address = self.cfg.runtime.ray_address
        samples = {"standard_kd": self.cfg.kd_samples, "posthoc_ppl": self.cfg.posthoc_samples}
        if method in samples:
            g.search.trajectories_per_problem = samples[method]
        g.validate()
        return g

    def generate_all(self, teacher: str, student: str) -> dict[str, dict[str, Any]]:
        """The generation job once per method, all on one set of teacher and scorer engines (started
        only if some method has problems left); each method gets its own beam managers."""
        from gen_ssd_ray.engines.actors import Pools, build_managers, build_pools, shutdown_pools
        from gen_ssd_ray.generate.driver import prepare, run_generate

        configs = {m: self._generate_config(m, teacher, student) for m in self.cfg.methods}
        prepared = {}
        for m, g in configs.items():  # bad input: ValueError, nothing started
            with _stage_input(f"generate/{m}", Path(g.output.dir)):
                prepared[m] = prepare(g)
        pending = [
            m
            for m in configs
            if {q.problem_id for q in prepared[m].problems} - prepared[m].writer.committed_ids
        ]
        engines = None
        summaries = {}
        try:
            for method, g in configs.items():
                started, name = time.perf_counter(), f"generate/{method}"
                p = prepared[method]
                pools = None
                try:
                    if method in pending:
                        if engines is None:  # sized for the method with the most trajectories per problem
                            widest = max(
                                (configs[m] for m in pending), key=lambda c: c.search.trajectories_per_problem
                            )
                            engines = build_pools(widest, p.teacher_path, p.student_path)
                            shutdown_pools(Pools([], [], engines.managers))
                        managers = build_managers(
                            g, p.teacher_path, p.student_path, engines.teachers, engines.scorers
                        )
                        pools = Pools(engines.teachers, engines.scorers, managers)
                    with _own_signals():
                        summary = run_generate(g, p, pools=pools)
                except Exception as e:  # engines that do not start, a dead Ray...: resumable
                    raise StageFailed(f"{name}: {type(e).__name__}: {_last_line(e)}") from e
                finally:
                    if pools is not None:
                        shutdown_pools(Pools([], [], pools.managers))
                if summary.get("interrupted"):
                    raise PipelineInterrupted(f"{name} interrupted; re-run the same command to continue")
                if summary.get("problems_failed_retry_later"):
                    raise StageFailed(
                        f"{name}: {summary['problems_failed_retry_later']} problems failed on engine errors; "
                        "re-run the same command to retry them"
                    )
                self._record(name, "done" if method in pending else "skipped", started, summary=summary)
                summaries[method] = summary
        finally:
            for p in prepared.values():
                p.writer.close()
            if engines is not None:
                shutdown_pools(Pools(engines.teachers, engines.scorers, []))
        return summaries

    def evaluate(self, name: str, model: str) -> dict[str, Any]:
        from gen_ssd_ray.evaluate.run import EngineFailure, evaluate
        from gen_ssd_ray.evaluate.run import prepare as prepare_eval

        started = time.perf_counter()
        ev: EvaluateConfig = _linked(self.cfg, "evaluate")
        ev.model.model = model
        ev.output.dir = str(self.out / "eval" / name)
        ev.runtime.ray_address = self.cfg.runtime.ray_address
        ev.validate()
        with _stage_input(f"eval/{name}", Path(ev.output.dir)):
            prepared = prepare_eval(ev)
        try:
            with _own_signals():
                summary = evaluate(ev, prepared)
        except KeyboardInterrupt:
            raise PipelineInterrupted(
                f"eval/{name} interrupted; re-run the same command to continue"
            ) from None
        except EngineFailure as e:
            raise StageFailed(f"eval/{name}: {e}") from e
        self._record(
            f"eval/{name}", "skipped" if summary.get("skipped") else "done", started, summary=summary
        )
        return summary

    # ---- the run -----------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        from gen_ssd_ray.common.cluster import init_ray
        from gen_ssd_ray.generate.output import read_manifest
        from gen_ssd_ray.pipeline.report import write_report

        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        _sigterm_interrupts()  # `ray job stop` between stages: exit 130 like Ctrl-C
        init_ray(cfg.runtime.ray_address, cfg.runtime.local_num_cpus, dashboard=True)
        started = time.perf_counter()

        teacher = self._base_model(cfg.teacher, "teacher")
        if cfg.teacher.startswith(LAB_PREFIX):
            if self.finetune("teacher", "teacher_train", teacher) is None:
                raise StageFailed("teacher: the teacher's training set is empty (see teacher_train.data)")
            teacher = str(self.out / "teacher" / "model")
        student = self._base_model(cfg.student, "student")
        if self.finetune("cold_start", "cold_start", student) is None:
            raise StageFailed("cold_start: the cold-start training set is empty (see cold_start.data)")
        student = str(self.out / "cold_start" / "model")

        students = {"cold_start": student}
        self.generate_all(teacher, student)
        for method in cfg.methods:
            folder = self.out / "generate" / method
            manifest = read_manifest(folder) or {}
            done = self.finetune(
                f"distill/{method}",
                "distill",
                student,
                path=str(folder),
                expect_fingerprint=manifest.get("fingerprint"),
            )
            if done is not None:
                students[method] = str(self.out / "distill" / method / "model")

        evals = {"teacher": self.evaluate("teacher", teacher)}
        for name, path in students.items():
            evals[name] = self.evaluate(name, path)

        t0 = time.perf_counter()
        report = write_report(self.out, cfg.methods)
        self._record("report", "done", t0, path=str(report))
        self.state["elapsed_s"] = round(time.perf_counter() - started, 1)
        self.state["report"] = str(report)
        self.state["accuracy"] = {k: v.get("accuracy") for k, v in evals.items()}
        self._record("pipeline", "done", started)
        return self.state


def _last_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[-1] if text else ""


def run_pipeline(cfg: PipelineConfig) -> dict[str, Any]:
    return Pipeline(cfg).run()


def format_summary(state: dict[str, Any]) -> str:
    lines = ["", f"Report: {state['report']}"]
    lines.append(
        "Stages: " + ", ".join(f"{k} {v['status']}" for k, v in state["stages"].items() if k != "pipeline")
    )
    acc = state.get("accuracy", {})
    lines.append(
        "Accuracy on held-out problems: "
        + ", ".join(f"{k} {v:.3f}" if v is not None else f"{k} n/a" for k, v in acc.items())
    )
    lines.append(
        "Every stage's folder sits beside the report (teacher/, cold_start/, generate/<method>/, "
        "distill/<method>/, eval/<model>/); re-running the same command skips finished stages."
    )
    return "\n".join(lines)
