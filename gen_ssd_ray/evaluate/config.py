"""Typed configuration of the evaluation job (`python -m jobs.evaluate`): the single source of defaults.

The evaluated model is the shared `EngineConfig` section (the same keys as the generation teacher);
prompt, data and runtime are the shared sections. `DATA_KEYS` lists what changes the result
(gen_ssd_ray.common.fingerprint): the model's dtype and context length (which prompts fit), the data,
the prompt and the sampling; the model's revision and the problems' content are derived values.
Resources and output placement are out.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

from gen_ssd_ray.common.config import (
    DEFAULT_STUDENT,
    DataConfig,
    EngineConfig,
    EngineJobRuntimeConfig,
    JobOutputConfig,
    PromptConfig,
    require,
)
from gen_ssd_ray.common.data import Problem
from gen_ssd_ray.common.fingerprint import fingerprint
from gen_ssd_ray.common.models import check_source_location
from gen_ssd_ray.common.storage import check_location
from gen_ssd_ray.common.tracking import LoggingConfig


@dataclass(frozen=True)
class EvalModelConfig(EngineConfig):
    """The evaluated model's engines. max_model_len: prompt + sampling.max_new_tokens must fit, or the
    problem is an error row. max_num_seqs also sizes the batches sent to each engine (max_num_seqs /
    sampling.n prompts)."""

    # Hugging Face folder or hub id (with model.revision) of the model to evaluate, or "embedded:student".
    model: str = DEFAULT_STUDENT


@dataclass(frozen=True)
class EvalSamplingConfig:
    # 0 = greedy decoding (then n must be 1).
    temperature: float = 0.0
    # Nucleus sampling: sample from the smallest token set holding this much probability (1: off).
    top_p: float = 1.0
    # Samples per problem; accuracy is the mean over problems of the fraction of correct samples.
    n: int = 1
    # Response token budget; a sample that reaches it is "truncated".
    max_new_tokens: int = 512
    # Base seed; each problem's request seed derives from it and the problem id.
    seed: int = 0


@dataclass(frozen=True)
class EvalOutputConfig(JobOutputConfig):
    # Folder for predictions.parquet and summary.json. With force: re-evaluate and overwrite whatever
    # the folder holds (otherwise: same fingerprint = skip, different fingerprint = refused).
    dir: str = "outputs/evaluate"


@dataclass(frozen=True)
class EvalRuntimeConfig(EngineJobRuntimeConfig):
    # Attempts per batch (engine death, missed deadline) before the run fails. call_timeout_s is the
    # deadline of one batch (up to model.max_num_seqs / sampling.n prompts).
    max_attempts: int = 2


def _all_problems() -> DataConfig:
    return DataConfig(limit=None)


@dataclass(frozen=True)
class EvaluateConfig:
    PRESET: ClassVar[str] = "conf/evaluate.yaml"

    model: EvalModelConfig = field(default_factory=EvalModelConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    sampling: EvalSamplingConfig = field(default_factory=EvalSamplingConfig)
    # Default: the whole GSM8K test set (data.limit=null).
    data: DataConfig = field(default_factory=_all_problems)
    output: EvalOutputConfig = field(default_factory=EvalOutputConfig)
    runtime: EvalRuntimeConfig = field(default_factory=EvalRuntimeConfig)
    # Experiment tracking (TensorBoard, MLflow, W&B) of the accuracy and counts at the end.
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def validate(self) -> None:
        """Cross-field and value checks (ConfigError naming the key and the fix)."""
        m, s = self.model, self.sampling
        m.validate("model")
        # Locations: a path or an object-store URI (s3://...); a bad scheme is refused naming the key.
        check_source_location(m.model, "model.model")
        check_source_location(self.data.path, "data.path")
        check_location(self.output.dir, "output.dir")
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
        self.prompt.validate()
        self.data.validate()
        self.output.validate()
        self.runtime.validate()
        self.logging.validate()


DATA_KEYS = ("model.dtype", "model.max_model_len", "data.path", "data.split", "prompt", "sampling")


def evaluation_fingerprint(cfg: EvaluateConfig, revision: str, problems: Sequence[Problem]) -> str:
    """The fingerprint of `DATA_KEYS`, the model's revision and the problems' content."""
    content = hashlib.sha256()
    for p in problems:
        content.update(json.dumps([p.problem_id, p.question, p.gold_answer, p.error]).encode())
    return fingerprint(cfg, DATA_KEYS, {"model.revision": revision, "data.problems": content.hexdigest()})
