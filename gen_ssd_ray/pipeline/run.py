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

One pipeline at a time per `output_dir`: the run holds `<output_dir>/_lock`
(gen_ssd_ray.common.joblock) and a second one is refused with exit 2; each stage's job locks its own
folder below it the same way. Every stage writes to its own folder under `output_dir` and is resumable on its own (generation skips
committed problems, fine-tuning resumes from its last checkpoint and skips a complete run, evaluation
skips a folder with the same fingerprint), so re-running the same command skips finished stages and
continues the interrupted one. The pipeline fills in what links the stages (model paths, data paths,
output folders, the prompt, the method); everything else comes from the stage sections of the config.

Decontamination: every training stage (teacher_train, cold_start, generate, distill) gets the top-level
`decontaminate` section as its `data.decontaminate`, with the evaluate stage's dataset added to its
`against` (`decontaminate_links`), so nothing the pipeline trains or generates on overlaps what it
evaluates; the counts land in each stage's summary, the report and the closing summary.

A method whose filter keeps no trajectory gets no distilled student: the stage is recorded as
`empty` with the reason and the others go on.

`output_dir` may be an object-store URI (``s3://bucket/exp``): every stage folder is then a child URI
(each stage's job writes there through gen_ssd_ray.common.storage), the run holds the folder's lease,
`pipeline.json` is written there, lab base models are built locally and uploaded (config.json last),
and the report is built in a local staging folder from copies of its inputs and uploaded to
`<output_dir>/report/` (report.md last).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gen_ssd_ray.common.errors import InputError, JobFailed, JobInterrupted, reason
from gen_ssd_ray.evaluate.config import EvaluateConfig
from gen_ssd_ray.generate.config import GenerateConfig
from gen_ssd_ray.pipeline.config import LAB_PREFIX, PipelineConfig, decontaminate_links, stage_config

log = logging.getLogger("gen_ssd_ray")

STATE_NAME = "pipeline.json"


class StageInputError(InputError):
    """A stage refused its input before starting (bad data, or a folder holding another config's results)."""


@contextlib.contextmanager
def _stage_input(name: str, folder: str | Path):
    """Name the stage in a bad-input error. A folder written with another config is the pipeline's own
    doing (its config changed since): the fix is a new output_dir, or removing that stage's folder and
    every later stage's (they depend on it)."""
    from gen_ssd_ray.evaluate.run import EvaluationExistsError
    from gen_ssd_ray.generate.output import FingerprintMismatchError
    from gen_ssd_ray.train.run import TrainOutputExistsError

    try:
        yield
    except (FingerprintMismatchError, EvaluationExistsError, TrainOutputExistsError) as e:
        raise StageInputError(
            f"stage {name}: {folder} holds results of a different configuration (the pipeline config or an "
            "earlier stage's result changed since it ran). Use a new output_dir, or delete that folder and the "
            f"folders of the stages after it to redo them. ({e})"
        ) from None
    except (ValueError, OSError) as e:
        raise StageInputError(f"stage {name}: {e}") from None


@contextlib.contextmanager
def _stage(name: str, *, any_error_fails: bool = False) -> Iterator[None]:
    """Name the stage in its failure or interrupt. With `any_error_fails` (generation, whose engines
    may not start or whose Ray may die), any other exception is a JobFailed too: re-running continues
    from the stage."""
    try:
        yield
    except JobInterrupted as e:
        raise JobInterrupted(f"{name}: {e}") from e
    except KeyboardInterrupt:
        raise JobInterrupted(f"{name} interrupted") from None
    except JobFailed as e:
        raise JobFailed(f"{name}: {e}") from e
    except Exception as e:
        if not any_error_fails or isinstance(e, InputError):
            raise
        raise JobFailed(f"{name}: {reason(e)}") from e


class Pipeline:
    """Runs the stages in order and records each one's outcome in `<output_dir>/pipeline.json`."""

    def __init__(self, cfg: PipelineConfig):
        from gen_ssd_ray.common.models import staging_dir
        from gen_ssd_ray.common.storage import Storage, is_remote

        self.cfg = cfg
        # An object store: `storage` is the folder, `out` a local staging folder (lab models, report).
        self.storage = Storage(cfg.output_dir, key="output_dir") if is_remote(cfg.output_dir) else None
        self.out = staging_dir(cfg.output_dir, "pipeline") if self.storage else Path(cfg.output_dir)
        self.state: dict[str, Any] = {"init_seed": cfg.init_seed, "methods": list(cfg.methods), "stages": {}}

    # ---- bookkeeping -------------------------------------------------------------------------
    def loc(self, *parts: str) -> str:
        """The location of a stage folder or file: a path under output_dir, or a child URI."""
        name = "/".join(parts)
        return self.storage.uri_of(name) if self.storage is not None else str(self.out / name)

    def _record(self, name: str, status: str, started: float, **info: Any) -> None:
        from gen_ssd_ray.common.fsio import atomic_write_json

        self.state["stages"][name] = {
            "status": status,
            "elapsed_s": round(time.perf_counter() - started, 1),
            **info,
        }
        if self.storage is not None:
            self.storage.write_json(STATE_NAME, self.state, indent=1, default=str)
        else:
            atomic_write_json(self.out / STATE_NAME, self.state, indent=1, default=str)
        log.info("pipeline: stage %s %s (%.1f s)", name, status, time.perf_counter() - started)

    # ---- models ------------------------------------------------------------------------------
    def _base_model(self, spec: str, role: str) -> str:
        """A lab:<size> model built from scratch (once, atomically) or the configured name as is."""
        if not spec.startswith(LAB_PREFIX):
            return spec
        from gen_ssd_ray.lab.models import build_lab_model

        name = f"{role}-init-{spec.removeprefix(LAB_PREFIX)}-seed{self.cfg.init_seed}"
        dest = self.out / "models" / name
        if self.storage is not None and self.storage.exists(f"models/{name}/config.json"):
            return self.loc("models", name)
        if not (dest / "config.json").is_file():
            tmp = dest.with_name(f".tmp-{dest.name}")
            shutil.rmtree(tmp, ignore_errors=True)
            build_lab_model(tmp, size=spec.removeprefix(LAB_PREFIX), seed=self.cfg.init_seed)
            tmp.replace(dest)
        if self.storage is not None:  # config.json last: a folder without it is not a model yet
            for f in sorted(dest.rglob("*"), key=lambda f: f.name == "config.json"):
                if f.is_file():
                    self.storage.upload_file(f, f"models/{name}/{f.relative_to(dest).as_posix()}")
            return self.loc("models", name)
        return str(dest)

    # ---- stages ------------------------------------------------------------------------------
    def finetune(self, name: str, section: str, model: str, **data: Any) -> dict[str, Any] | None:
        """One fine-tuning stage; None when its filters left nothing to train on."""
        from gen_ssd_ray.train.data import EmptyTrainingSetError
        from gen_ssd_ray.train.run import prepare, run_finetune

        started = time.perf_counter()
        links = {"model.path": model, "output.dir": self.loc(name), **decontaminate_links(self.cfg, section)}
        links.update({f"data.{k}": v for k, v in data.items()})
        ft = stage_config(self.cfg, section, links)
        ft.validate()
        with _stage_input(name, self.loc(name)):
            try:
                prepared = prepare(ft)
            except EmptyTrainingSetError as e:  # a method that kept nothing: no student, the rest goes on
                self._record(name, "empty", started, reason=str(e))
                log.warning("pipeline: %s has nothing to train on: %s", name, e)
                return None
        with _stage(name):
            summary = run_finetune(ft, prepared)
        self._record(name, "skipped" if summary.get("skipped") else "done", started, summary=summary)
        return summary

    def _generate_config(self, method: str, teacher: str, student: str) -> GenerateConfig:
        links: dict[str, Any] = {
            "method": method,
            "teacher.model": teacher,
            "student.model": student,
            "output.dir": self.loc("generate", method),
            **decontaminate_links(self.cfg, "generate"),
        }
        samples = {"standard_kd": self.cfg.kd_samples, "posthoc_ppl": self.cfg.posthoc_samples}
        if method in samples:
            links["search.trajectories_per_problem"] = samples[method]
        g: GenerateConfig = stage_config(self.cfg, "generate", links)
        g.validate()
        return g

    def generate_all(self, teacher: str, student: str) -> dict[str, dict[str, Any]]:
        """The generation job once per method, all on one set of teacher and scorer engines (started
        only if some method has problems left); each method gets its own beam managers."""
        from gen_ssd_ray.generate.driver import check_finished, prepare, run_generate
        from gen_ssd_ray.generate.pools import Pools, build_managers, build_pools, shutdown_pools

        configs = {m: self._generate_config(m, teacher, student) for m in self.cfg.methods}
        prepared = {}
        try:
            for m, g in configs.items():  # bad input: ValueError, nothing started
                with _stage_input(f"generate/{m}", g.output.dir):
                    prepared[m] = prepare(g)
        except BaseException:  # the folders already opened are let go (their writers hold the locks)
            for p in prepared.values():
                p.writer.close()
            raise
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
                    with _stage(name, any_error_fails=True):
                        if method in pending:
                            if engines is None:  # sized for the method with the most trajectories per problem
                                widest = max(
                                    (configs[m] for m in pending),
                                    key=lambda c: c.search.trajectories_per_problem,
                                )
                                engines = build_pools(widest, p.teacher_path, p.student_path)
                                shutdown_pools(Pools([], [], engines.managers))
                            managers = build_managers(
                                g, p.teacher_path, p.student_path, engines.teachers, engines.scorers
                            )
                            pools = Pools(engines.teachers, engines.scorers, managers)
                        summary = run_generate(g, p, pools=pools)
                        summary = check_finished(summary, "generation")
                finally:
                    if pools is not None:
                        shutdown_pools(Pools([], [], pools.managers))
                self._record(name, "done" if method in pending else "skipped", started, summary=summary)
                summaries[method] = summary
        finally:
            for p in prepared.values():
                p.writer.close()
            if engines is not None:
                shutdown_pools(Pools(engines.teachers, engines.scorers, []))
        return summaries

    def evaluate(self, name: str, model: str) -> dict[str, Any]:
        from gen_ssd_ray.evaluate.run import evaluate
        from gen_ssd_ray.evaluate.run import prepare as prepare_eval

        started = time.perf_counter()
        ev: EvaluateConfig = stage_config(
            self.cfg, "evaluate", {"model.model": model, "output.dir": self.loc("eval", name)}
        )
        ev.validate()
        with _stage_input(f"eval/{name}", ev.output.dir):
            prepared = prepare_eval(ev)
        with _stage(f"eval/{name}"):
            summary = evaluate(ev, prepared)
        self._record(
            f"eval/{name}", "skipped" if summary.get("skipped") else "done", started, summary=summary
        )
        return summary

    # ---- the run -----------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Hold `<output_dir>/_lock` for the whole run (a second pipeline on the folder is refused
        before anything starts: FolderLockedError, exit 2), then run the stages."""
        from gen_ssd_ray.common.joblock import hold_job_folder

        with hold_job_folder(self.cfg.output_dir, "pipeline", key="output_dir"):
            return self._run()

    def _run(self) -> dict[str, Any]:
        from gen_ssd_ray.common.cluster import init_ray
        from gen_ssd_ray.generate.manifest import read_manifest
        from gen_ssd_ray.pipeline.report import write_report

        cfg = self.cfg
        init_ray(cfg.runtime.ray_address, cfg.runtime.local_num_cpus, dashboard=True)
        started = time.perf_counter()

        teacher = self._base_model(cfg.teacher, "teacher")
        if cfg.teacher.startswith(LAB_PREFIX):
            if self.finetune("teacher", "teacher_train", teacher) is None:
                raise JobFailed("teacher: the teacher's training set is empty (see teacher_train.data)")
            teacher = self.loc("teacher", "model")
        student = self._base_model(cfg.student, "student")
        if self.finetune("cold_start", "cold_start", student) is None:
            raise JobFailed("cold_start: the cold-start training set is empty (see cold_start.data)")
        student = self.loc("cold_start", "model")

        students = {"cold_start": student}
        self.generate_all(teacher, student)
        for method in cfg.methods:
            folder = self.loc("generate", method)
            manifest = read_manifest(folder) or {}
            done = self.finetune(
                f"distill/{method}",
                "distill",
                student,
                path=folder,
                expect_fingerprint=manifest.get("fingerprint"),
            )
            if done is not None:
                students[method] = self.loc("distill", method, "model")

        evals = {"teacher": self.evaluate("teacher", teacher)}
        for name, path in students.items():
            evals[name] = self.evaluate(name, path)

        t0 = time.perf_counter()
        if self.storage is None:
            report = write_report(self.out, cfg.methods)
        else:
            report = self._remote_report()
        self._record("report", "done", t0, path=str(report))
        self.state["elapsed_s"] = round(time.perf_counter() - started, 1)
        self.state["report"] = str(report)
        self.state["accuracy"] = {k: v.get("accuracy") for k, v in evals.items()}
        self._record("pipeline", "done", started)
        return self.state

    def _remote_report(self) -> str:
        """The report of an object-store output_dir: its inputs copied into the staging folder, the
        report written there, then uploaded to `<output_dir>/report/` (report.md last)."""
        from gen_ssd_ray.common.fsio import atomic_write_json
        from gen_ssd_ray.generate.manifest import read_manifest
        from gen_ssd_ray.pipeline.report import REPORT_DIR, write_report

        assert self.storage is not None
        stage = self.out
        shutil.rmtree(stage / REPORT_DIR, ignore_errors=True)
        shutil.rmtree(stage / "generate", ignore_errors=True)  # copies of an earlier report only
        folders = set()
        for name in self.storage.list():
            if _report_input(name):
                self.storage.download_file(name, stage / name)
                if name.startswith("generate/"):
                    folders.add("/".join(name.split("/")[:2]))
        for folder in sorted(folders):
            # The local copy gets the store's merged manifest as its snapshot: the object-store log
            # (one record object per shard, not the local append-only file) is not copied.
            manifest = read_manifest(self.storage.uri_of(folder))
            if manifest is not None:
                atomic_write_json(stage / folder / "_manifest.json", manifest)
        report = write_report(stage, self.cfg.methods)
        folder = report.parent
        files = sorted((f for f in folder.rglob("*") if f.is_file()), key=lambda f: f == report)
        for f in files:
            self.storage.upload_file(f, f"{REPORT_DIR}/{f.relative_to(folder).as_posix()}")
        return self.storage.uri_of(f"{REPORT_DIR}/{report.name}")


def _report_input(name: str) -> bool:
    """Whether object `name` of an object-store output_dir is read by the report (pipeline.report):
    pipeline.json, the generation folders, and the stages' summaries, metrics, configs, predictions."""
    parts = name.split("/")
    if parts[-1].startswith("_lock") or "checkpoints" in parts or "model" in parts or "models" in parts:
        return False
    if parts[0] == "generate" and any(p in ("_manifest.log", "_manifest.json", "_journal") for p in parts):
        return False  # the manifest is rebuilt from the store (`_remote_report`); the journal is not read
    if name == STATE_NAME or parts[0] == "generate":
        return True
    return parts[-1] in ("summary.json", "metrics.jsonl", "_config.yaml", "predictions.parquet")


def run_pipeline(cfg: PipelineConfig) -> dict[str, Any]:
    return Pipeline(cfg).run()


def summary_json(state: dict[str, Any]) -> dict[str, Any]:
    """The closing JSON line: the state without the per-stage details."""
    return {k: v for k, v in state.items() if k != "stages"}


def format_summary(state: dict[str, Any]) -> str:
    lines = ["", f"Report: {state['report']}"]
    lines.append(
        "Stages: " + ", ".join(f"{k} {v['status']}" for k, v in state["stages"].items() if k != "pipeline")
    )
    from gen_ssd_ray.pipeline.report import decontamination

    stages = state.get("stages", {})
    trained = {
        k: {"summary": v["summary"]} for k, v in stages.items() if "filters" in (v.get("summary") or {})
    }
    decon = decontamination(state, trained, state.get("methods", []))
    if decon:
        lines.append(
            "Dropped as overlapping the evaluation set (decontaminate): "
            + ", ".join(f"{d['stage']} {d['dropped']} {d['unit']}" for d in decon)
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
