"""Typed configuration of the generation job (`python -m jobs.generate`): the single source of defaults.

Loaded with `gen_ssd_ray.common.config.load_config(path, overrides, GenerateConfig)`; `validate()`
runs the cross-field checks, naming the key and the value to set. The teacher section is the shared
`EngineConfig` plus admission; prompt, data and runtime are the shared sections.

`DATA_KEYS` lists what changes the data (gen_ssd_ray.common.fingerprint): models, prompts, sampling,
search knobs, the dataset. `data.limit` / `data.offset` are out on purpose, so a run can be extended
to more problems in the same folder; so are resources, deadlines and output placement.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

from gen_ssd_ray.common.config import (
    DEFAULT_STUDENT,
    DataConfig,
    EngineConfig,
    EngineJobRuntimeConfig,
    JobOutputConfig,
    ModelPoolConfig,
    PromptConfig,
    SimConfig,
    derive,
    require,
)
from gen_ssd_ray.common.fingerprint import fingerprint as _fingerprint
from gen_ssd_ray.common.tracking import LoggingConfig
from gen_ssd_ray.core.search import SearchParams


@dataclass(frozen=True)
class TeacherConfig(EngineConfig):
    # Concurrent problems per engine: keeps continuous batching full while others wait for scores.
    max_inflight_problems: int = 32
    # "kv": as many problems per engine as the engine's reported KV cache holds (their prefixes stay
    # cached between chunks; gen_ssd_ray.generate.admission), at most max_inflight_problems.
    # "fixed": max_inflight_problems, whatever the cache holds.
    admission: str = "kv"


@dataclass(frozen=True)
class StudentConfig(ModelPoolConfig):
    """The student scorers. backend: "hf" (transformers: each beam's context KV kept once, calls of
    many trajectories batched; gen_ssd_ray.engines.scorer_hf) or "vllm" (vLLM prompt_logprobs reading
    the prefix cache). dtype "auto": float32 on CPU, bfloat16 on GPU (hf). The KV budget: on GPU
    `gpu_memory_utilization` of the device (hf: what it leaves after the weights), on CPU
    `kv_cache_gib` (hf: cached beams and a forward's working set; vllm: its KV cache);
    enforce_eager applies to the vllm backend."""

    model: str = DEFAULT_STUDENT
    backend: str = "hf"
    num_cpus: float = 0.5
    dtype: str = "auto"
    # Number of scorer actors (one student model each).
    num_scorers: int = 1
    # hf backend: tokens run per forward at most, over the score calls batched together (a call of
    # more runs alone).
    batch_tokens: int = 8192
    # CPU threads for the hf scorer (0 = torch default).
    num_threads: int = 1


@dataclass(frozen=True)
class SearchConfig(SearchParams):
    """The search knobs (gen_ssd_ray.core.search.SearchParams, where each is described) and:"""

    # Trajectories generated per problem (each with its own seeds).
    trajectories_per_problem: int = 1
    # Base seed; per-request seeds derive from it, the problem and the step.
    seed: int = 0


@dataclass(frozen=True)
class OutputConfig(JobOutputConfig):
    dir: str = "outputs/generate"
    # Problems per Parquet shard.
    shard_size: int = 8


@dataclass(frozen=True)
class RuntimeConfig(EngineJobRuntimeConfig):
    # Beam-manager actors: each runs the search of its share of the problems and calls the engines.
    num_beam_managers: int = 1
    # CPUs reserved per beam manager (0: no reservation): tokenizers and the search state of every
    # problem in flight on it.
    manager_num_cpus: float = 0.0
    # Memory in GiB reserved per beam manager (0: no reservation).
    manager_memory_gib: float = 0.0
    # First cooldown of a failed engine or scorer (it doubles per consecutive failure, up to 32x);
    # after it the engine is probed and used again once it answers.
    engine_cooldown_s: float = 10.0
    # While engines are missing (a lost node that comes back, actors restarting), a problem whose
    # engines were unavailable is retried with backoff (1 s doubling to 60 s) for this long before it is
    # left uncommitted for a re-run (and at least runtime.max_attempts times).
    retry_window_s: float = 1800.0
    # A call past runtime.call_timeout_s whose engine still advances (busy, not hung) is waited for,
    # up to this many call_timeout_s in all. 1: a hard deadline (the call is cancelled and retried
    # elsewhere, even on a busy engine).
    late_call_limit: float = 4.0
    # Cooldown, probes and fallback order per pool (gen_ssd_ray.generate.health). false: a failed
    # engine gets the next call again at once (for comparison runs; see scripts/bench_fixes.py).
    pool_health: bool = True
    # Infrastructure failures (a dead beam manager or engine, engines unavailable, a missed deadline) a
    # problem may cause, counted across attempts and runs in the output folder's _failures.json, before
    # it is committed as an error row saying so (a problem that reliably kills its engine or manager
    # would otherwise never commit, and every re-run would exit 1). A failure counts against every
    # problem in flight where it struck, so a problem at the limit is first retried alone on one beam
    # manager, after the rest of the run, and blamed only if it fails there too. 0: never give up on a
    # problem (re-runs retry it).
    max_problem_failures: int = 5
    # Journal of accepted chunks (gen_ssd_ray.generate.journal): every beam manager writes its
    # trajectories' completed steps to the output's `_journal/` at most this often (and when the job is
    # stopped), so a resubmitted job continues each in-flight trajectory at its last journaled step:
    # a kill loses at most one chunk per trajectory plus this interval. 0: no journal.
    journal_interval_s: float = 10.0
    # Ray dashboard metrics: the job's gen_ssd_* and vLLM's engine metrics (cluster/README.md); false: none.
    metrics: bool = True


@dataclass(frozen=True)
class GenerateConfig:
    PRESET: ClassVar[str] = "conf/default.yaml"

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
    # Simulated engines (teacher.backend=sim, student.backend=sim): profile, time compression, faults.
    sim: SimConfig = field(default_factory=SimConfig)
    # Experiment tracking (TensorBoard, MLflow, W&B) of progress, throughput, prune / correct / cache rates.
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    @property
    def simulated(self) -> bool:
        return "sim" in (self.teacher.backend, self.student.backend)

    def effective(self) -> GenerateConfig:
        """The config as the job runs it. With simulated engines every runtime deadline is in
        simulated seconds: divided by `sim.time_compression` (start-up never below 120 wall-clock
        seconds: starting actor processes is real time)."""
        c = self.sim.time_compression
        if not self.simulated or c == 1:
            return self
        r = self.runtime
        return derive(
            self,
            {
                "runtime.call_timeout_s": r.call_timeout_s / c,
                "runtime.startup_timeout_s": max(120.0, r.startup_timeout_s / c),
                "runtime.engine_cooldown_s": r.engine_cooldown_s / c,
                "runtime.retry_window_s": r.retry_window_s / c,
                "runtime.journal_interval_s": r.journal_interval_s / c,
            },
        )

    def validate(self) -> None:
        """Cross-field and value checks. Locations (output.dir, data.path, the models) are checked
        for a usable scheme (gen_ssd_ray.common.storage.check_location); their contents by their
        loaders."""
        from gen_ssd_ray.common.config import ConfigError
        from gen_ssd_ray.engines.registry import SCORER_BACKENDS

        t, s, q, o, r = self.teacher, self.student, self.search, self.output, self.runtime
        t.validate("teacher")
        require(t.max_inflight_problems >= 1, "teacher.max_inflight_problems", "must be >= 1")
        require(
            t.admission in ("kv", "fixed"), "teacher.admission", f"must be kv or fixed, got {t.admission!r}"
        )
        s.validate_pool("student", SCORER_BACKENDS)
        require(s.num_scorers >= 1, "student.num_scorers", f"must be >= 1, got {s.num_scorers}")
        require(s.batch_tokens >= 1, "student.batch_tokens", f"must be >= 1, got {s.batch_tokens}")
        self.prompt.validate()
        require(q.temperature >= 0, "search.temperature", f"must be >= 0, got {q.temperature}")
        require(0 < q.top_p <= 1, "search.top_p", f"must be in (0, 1], got {q.top_p}")
        require(q.trajectories_per_problem >= 1, "search.trajectories_per_problem", "must be >= 1")
        require(
            q.max_new_tokens < t.max_model_len,
            "search.max_new_tokens",
            f"{q.max_new_tokens} leaves no room for the prompt in teacher.max_model_len={t.max_model_len}",
        )
        try:
            search_params(self)
        except ValueError as e:
            raise ConfigError(f"method: {e}" if str(e).startswith("method") else str(e)) from None
        require(
            self.method != "posthoc_ppl" or q.trajectories_per_problem >= 2,
            "search.trajectories_per_problem",
            "must be >= 2 with method=posthoc_ppl (it picks one of N whole solutions; e.g. 4)",
        )
        self.data.validate()
        o.validate()
        # Every location a user gives: a local path or a usable object-store URI (s3://bucket/x), never
        # a local folder named "s3:" (StorageError, exit 2, before anything is created or started).
        from gen_ssd_ray.common.storage import check_location

        for key, value in (
            ("output.dir", o.dir),
            ("data.path", self.data.path),
            ("teacher.model", t.model),
            ("student.model", s.model),
        ):
            check_location(value, key)
        require(o.shard_size >= 1, "output.shard_size", f"must be >= 1, got {o.shard_size}")
        r.validate()
        require(r.num_beam_managers >= 1, "runtime.num_beam_managers", "must be >= 1")
        require(r.manager_num_cpus >= 0, "runtime.manager_num_cpus", "must be >= 0")
        require(r.manager_memory_gib >= 0, "runtime.manager_memory_gib", "must be >= 0")
        require(r.engine_cooldown_s > 0, "runtime.engine_cooldown_s", "must be > 0")
        require(r.retry_window_s >= 0, "runtime.retry_window_s", "must be >= 0")
        require(
            r.journal_interval_s >= 0,
            "runtime.journal_interval_s",
            f"must be >= 0 (0: no journal), got {r.journal_interval_s}",
        )
        require(r.late_call_limit >= 1, "runtime.late_call_limit", f"must be >= 1, got {r.late_call_limit}")
        require(
            isinstance(r.max_problem_failures, int) and r.max_problem_failures >= 0,
            "runtime.max_problem_failures",
            f"must be an integer >= 0 (0: never give up on a problem), got {r.max_problem_failures!r}",
        )
        self.sim.validate()
        self.logging.validate()


def search_params(cfg: GenerateConfig) -> SearchParams:
    """The pure-core view of the search knobs, as the configured method runs them."""
    from gen_ssd_ray.core.methods import get_method

    knobs = {f.name: getattr(cfg.search, f.name) for f in dataclasses.fields(SearchParams)}
    return get_method(cfg.method).search_params(SearchParams(**knobs))


DATA_KEYS = (
    "method",
    "teacher.model",
    "teacher.dtype",
    "teacher.trust_remote_code",
    "teacher.max_model_len",
    "student.model",
    "student.backend",
    "student.dtype",
    "student.trust_remote_code",
    "prompt",
    "search",
    "data.path",
    "data.split",
    "data.question_field",
    "data.answer_field",
    "data.id_field",
)

# Also data keys, but part of the fingerprint only when set (null leaves earlier fingerprints unchanged).
OPTIONAL_DATA_KEYS = ("teacher.revision", "student.revision", "data.subset", "data.revision")


def fingerprint(cfg: GenerateConfig, model_revisions: dict[str, str] | None = None) -> str:
    """The fingerprint of `DATA_KEYS`, with the search as the method runs it (the baselines ignore
    chunk_tokens, num_candidates, ...) and the models' revisions when given."""
    derived: dict = {"search": dataclasses.asdict(search_params(cfg))}
    if cfg.teacher.backend != "vllm":  # (the vLLM default keeps the fingerprints of earlier versions)
        derived["teacher_backend"] = cfg.teacher.backend
    if cfg.simulated:  # a profile's token statistics change the data
        derived["sim_profile"] = cfg.sim.profile
    if model_revisions:
        derived["revisions"] = dict(sorted(model_revisions.items()))
    # Keys added after DATA_KEYS was pinned: in only when set, so earlier folders keep their fingerprint.
    for key in OPTIONAL_DATA_KEYS:
        section, _, name = key.partition(".")
        value = getattr(getattr(cfg, section), name)
        if value is not None:
            derived[key] = value
    return _fingerprint(cfg, DATA_KEYS, derived)


def run_fingerprint(cfg: GenerateConfig, teacher_path: str, student_path: str) -> str:
    """The fingerprint recorded in the output: config fields plus the resolved models' identities."""
    from gen_ssd_ray.common.models import model_revision

    return fingerprint(
        cfg, {"teacher": model_revision(teacher_path), "student": model_revision(student_path)}
    )
