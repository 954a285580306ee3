"""Typed configuration of the pipeline (`python -m jobs.pipeline`): the experiment's own knobs, and one
section per stage holding that job's own config (gen_ssd_ray.generate.config, train.config,
evaluate.config). The pipeline derives each stage's config from its section with `stage_config`
(a copy with the shared prompt, Ray address and tracking and the links between stages filled in); a
loaded config is frozen and never changes.

Tracking: the pipeline's `logging` section applies to every stage, each stage a run of its own (named
<job>-<stage folder>, prefixed by `logging.run_name` if set), all in one folder (default
`<output_dir>/tracking`). A stage section's own `logging` keys are refused (ConfigError naming the
pipeline key to set), except the fine-tuning stages' `logging.every_steps`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

from gen_ssd_ray.common.config import (
    ConfigError,
    DatasetRef,
    DecontamConfig,
    PromptConfig,
    RayConfig,
    derive,
    require,
)
from gen_ssd_ray.common.models import check_source_location
from gen_ssd_ray.common.storage import StorageError, check_location, is_remote
from gen_ssd_ray.common.tracking import LoggingConfig
from gen_ssd_ray.evaluate.config import EvaluateConfig
from gen_ssd_ray.generate.config import GenerateConfig
from gen_ssd_ray.train.config import FinetuneConfig, TrainDataConfig

LAB_PREFIX = "lab:"
# The sections whose data is trained on: each one's data.decontaminate is set by the pipeline.
TRAINING_SECTIONS = ("teacher_train", "cold_start", "generate", "distill")


def _default_methods() -> list[str]:
    return ["gen_ssd", "standard_kd", "posthoc_ppl"]


def _distill_defaults() -> FinetuneConfig:
    return FinetuneConfig(data=TrainDataConfig(filters=["selected == True"]))


@dataclass(frozen=True)
class PipelineConfig:
    PRESET: ClassVar[str] = "conf/pipeline.yaml"

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
    # Whole solutions sampled per problem by standard_kd (each correct one is kept). With kd_samples=1
    # every method keeps at most one trajectory per problem, so the comparison is about which one.
    kd_samples: int = 1
    # Whole solutions sampled per problem by posthoc_ppl (the correct one with the lowest student PPL
    # is kept); at least 2.
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
    # Where Ray runs; every stage runs on this one Ray.
    runtime: RayConfig = field(default_factory=RayConfig)
    # Decontamination of every training stage's data (teacher_train, cold_start, generate, distill):
    # problems or rows whose question overlaps `against` or the evaluate stage's data (always added)
    # are dropped and counted. The pipeline sets each of those sections' data.decontaminate from it.
    decontaminate: DecontamConfig = field(default_factory=DecontamConfig)
    # Experiment tracking of every stage (TensorBoard, MLflow, W&B), one run per stage (null dir:
    # <output_dir>/tracking).
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def validate(self) -> None:
        from gen_ssd_ray.core.methods import METHODS
        from gen_ssd_ray.lab.models import LAB_MODEL_SIZES

        require(bool(self.output_dir), "output_dir", "must not be empty")
        # A local folder or an object-store URI (s3://...): every stage folder is a child of it.
        check_location(self.output_dir, "output_dir")
        check_source_location(self.teacher, "teacher")
        check_source_location(self.student, "student")
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
        self.runtime.validate()
        self.decontaminate.validate("decontaminate")
        for section in TRAINING_SECTIONS:
            require(
                getattr(self, section).data.decontaminate == DecontamConfig(),
                f"{section}.data.decontaminate",
                "is set by the pipeline (every training stage checks against the evaluation set); set "
                "decontaminate.* at the top level of the pipeline config instead",
            )
        self.logging.validate()
        unset = LoggingConfig()
        for section in STAGES:
            own = getattr(self, section).logging
            for f in dataclasses.fields(LoggingConfig):
                require(
                    getattr(own, f.name) == getattr(unset, f.name),
                    f"{section}.logging.{f.name}",
                    f"the pipeline's logging section applies to every stage: set logging.{f.name} instead",
                )
        for section in STAGES:
            try:
                stage_config(self, section, {}).validate()
            except (ConfigError, StorageError) as e:
                raise ConfigError(f"{section}.{e}") from None


STAGES = ("teacher_train", "cold_start", "generate", "distill", "evaluate")


def decontaminate_links(cfg: PipelineConfig, section: str) -> dict[str, Any]:
    """The `data.decontaminate` link of a training section: the top-level `decontaminate` with the
    evaluate stage's dataset (its whole source) added to `against`; {} for the evaluate section."""
    if section not in TRAINING_SECTIONS:
        return {}
    e = cfg.evaluate.data
    own = DatasetRef(e.path, e.subset, e.split, e.revision, e.question_field, e.answer_field)
    against = list(dict.fromkeys([*cfg.decontaminate.against, own]))
    return {"data.decontaminate": replace(cfg.decontaminate, against=against)}


def stage_config(cfg: PipelineConfig, section: str, links: dict[str, Any]):
    """A stage's config: its section of `cfg`, with the prompt, Ray address and tracking every stage
    shares and the `links` the pipeline fills in (dotted keys: model paths, data paths, output folders,
    ...). Derived as a copy (`derive`); the loaded config never changes."""
    shared = {"prompt": cfg.prompt, "runtime.ray_address": cfg.runtime.ray_address}
    stage = derive(getattr(cfg, section), {**shared, **links})
    return derive(stage, _stage_logging(cfg, section, stage.output.dir))


def _stage_logging(cfg: PipelineConfig, section: str, stage_dir: str) -> dict[str, Any]:
    """The pipeline's `logging` keys as a stage's: one tracking folder for all, a run name per stage."""
    lg = cfg.logging
    keys = {f"logging.{f.name}": getattr(lg, f.name) for f in dataclasses.fields(LoggingConfig)}
    if lg.dir is None:
        if is_remote(cfg.output_dir):  # a local folder: the pipeline's staging folder
            from gen_ssd_ray.common.models import staging_dir

            keys["logging.dir"] = str(staging_dir(cfg.output_dir, "pipeline") / "tracking")
        else:
            keys["logging.dir"] = f"{cfg.output_dir.rstrip('/')}/tracking"
    if lg.run_name:
        keys["logging.run_name"] = f"{lg.run_name}-{section}-{stage_dir.rstrip('/').rsplit('/', 1)[-1]}"
    return keys
