"""Typed configuration of the fine-tuning job (`python -m jobs.finetune`): the single source of defaults.

Loaded with `gen_ssd_ray.common.config.load_config(path, overrides, FinetuneConfig)`: the dataclass
defaults, an optional YAML file and `key=value` overrides, then `FinetuneConfig.validate()` runs the
cross-field checks. Every error is a `ConfigError` naming the key and the value to set, raised before
any worker starts. Every section is a frozen dataclass; the pipeline derives its stage configs with
`gen_ssd_ray.common.config.derive`. `prompt` is the shared `PromptConfig` and `runtime` extends the
shared `RayConfig`.

Fingerprint (the convention of gen_ssd_ray.common.fingerprint): `DATA_KEYS` lists what changes the
trained weights: the model, data and filters, prompt, optimisation knobs and batch geometry,
DeepSpeed settings, and the world size (`runtime.num_workers`, which changes the global batch), plus
the `lora` adapter shape when `lora.enabled`. Output placement and handling, Ray address, per-worker
resources and the loss implementation (`loss.*`: the same loss, computed in slices or by another
kernel) are left out, so a run may resume with another `loss.slice_tokens`. `train_fingerprint(cfg,
model_revision, data_signature)` adds the input model's identity and the training data's (row count
and content hash) as derived values. A resume into a folder written with another fingerprint is
refused unless `output.force=true`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import ClassVar

from gen_ssd_ray.common.config import (
    DEFAULT_STUDENT,
    ConfigError,
    DecontamConfig,
    JobOutputConfig,
    PromptConfig,
    RayConfig,
    require,
)
from gen_ssd_ray.common.filters import FilterError, parse_all
from gen_ssd_ray.common.fingerprint import fingerprint
from gen_ssd_ray.common.models import check_source_location
from gen_ssd_ray.common.storage import check_location
from gen_ssd_ray.common.tracking import LoggingConfig

DEFAULT_FILTERS = ["status == 'completed'", "correct == True"]


@dataclass(frozen=True)
class ModelConfig:
    # Hugging Face folder, hub id in the offline cache, or embedded:student / embedded:teacher.
    path: str = DEFAULT_STUDENT
    # Run the model folder's own Python code (only for a folder you trust).
    trust_remote_code: bool = False
    # Attention kernel: sdpa (CPU and GPU), eager, or flash_attention_2 (GPU with flash-attn installed).
    # Packed examples never attend to each other with any of them (position ids restart per example).
    attn_implementation: str = "sdpa"
    # Trade compute for activation memory on long sequences.
    gradient_checkpointing: bool = False
    # dtype of the exported model folder: "auto" keeps the input model's dtype.
    save_dtype: str = "auto"


@dataclass(frozen=True)
class TrainDataConfig:
    # A generation job's output folder (only manifest-listed shards are read), a Parquet file or folder,
    # a JSONL / JSON file of question-solution pairs, or embedded:gsm8k/train|test.
    path: str = "outputs/generate"
    # The column holding the problem text the prompt is built from.
    question_field: str = "question"
    # The text the student learns to write (generation shards: response; GSM8K files: answer).
    response_field: str = "response"
    # Row filters applied in order; [] keeps every row. Each is a boolean expression over the columns
    # (gen_ssd_ray.common.filters): column names, literals, == != < <= > >= in, and/or/not (& | ~),
    # col.isin([...]), col.isna(), col.notna(), len(col); nothing else (no calls, attributes, @vars).
    # The default keeps completed trajectories whose answer was verified correct.
    filters: list[str] = field(default_factory=lambda: list(DEFAULT_FILTERS))
    # A generation folder must hold rows of one config fingerprint; if set, it must be this one.
    expect_fingerprint: str | None = None
    # Use at most this many rows after filtering (null: all).
    limit: int | None = None
    # Rows whose question overlaps these datasets are dropped after data.filters and data.limit (a filter
    # step of the summary). Left out of the fingerprint: the rows it drops change the data's signature.
    decontaminate: DecontamConfig = field(default_factory=DecontamConfig)


@dataclass(frozen=True)
class OptimConfig:
    # Passes over the filtered data.
    epochs: int = 1
    # Stop after this many optimizer steps (null: run all epochs).
    max_steps: int | None = None
    # Peak learning rate (AdamW), reached after warm-up.
    lr: float = 1.0e-5
    # Schedule after warm-up: cosine or linear decay to lr * min_lr_ratio, or constant.
    schedule: str = "cosine"
    # Optimizer steps of linear warm-up from 0 to lr.
    warmup_steps: int = 0
    # The decay schedules end at lr * min_lr_ratio.
    min_lr_ratio: float = 0.1
    # AdamW decoupled weight decay.
    weight_decay: float = 0.0
    # AdamW beta1 (first-moment decay).
    adam_beta1: float = 0.9
    # AdamW beta2 (second-moment decay).
    adam_beta2: float = 0.95
    # Gradient-norm clipping (0: off).
    grad_clip: float = 1.0
    # Examples longer than this (prompt + response tokens) are dropped and counted.
    max_seq_len: int = 1024
    # Pack whole examples into padding-free rows (attention never crosses examples); false: batches of
    # examples of similar length, padded to the longest.
    packing: bool = True
    # Tokens per micro-batch per worker (packed: one row of at most this many; unpacked: padded size).
    micro_batch_tokens: int = 4096
    # Micro-batches per worker per optimizer step.
    grad_accum_steps: int = 1
    # Shuffle seed (the data order is a function of it and the epoch, so a resume replays it exactly).
    seed: int = 0


@dataclass(frozen=True)
class DeepSpeedConfig:
    # ZeRO stage: 2 shards optimizer state and gradients, 3 also the parameters (0/1 also accepted).
    zero_stage: int = 2
    # ZeRO-Offload: optimizer state and step on the CPU (DeepSpeed CPU-Adam).
    offload_optimizer: bool = False
    # ZeRO-3 only: parameters live on the CPU between uses.
    offload_param: bool = False
    # fp32, or bf16 mixed precision (fp32 master weights); fp16 needs a GPU.
    precision: str = "fp32"


LOSS_KERNELS = ("torch", "liger")
# What `lora.target_modules` may hold: module names or suffixes (q_proj, mlp.down_proj), or all-linear.
_MODULE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.]*")


@dataclass(frozen=True)
class LossConfig:
    # Loss-carrying tokens whose logits exist at once: the LM head and fp32 cross-entropy run (and are
    # recomputed in the backward pass) over slices of this many, so memory does not grow with vocabulary
    # x micro-batch tokens; 0: the model's full logits, upcast to fp32 for the whole micro-batch.
    slice_tokens: int = 1024
    # torch (the slices above) or liger (Liger-Kernel's fused linear cross-entropy: GPU, ZeRO 0-2).
    kernel: str = "torch"

    def validate(self, zero_stage: int, gpus_per_worker: float) -> None:
        require(self.slice_tokens >= 0, "loss.slice_tokens", f"must be >= 0, got {self.slice_tokens}")
        require(self.kernel in LOSS_KERNELS, "loss.kernel", f"must be torch or liger, got {self.kernel!r}")
        if self.kernel == "liger":
            require(gpus_per_worker > 0, "loss.kernel", "liger needs GPU workers; use loss.kernel=torch")
            require(
                zero_stage <= 2,
                "loss.kernel",
                "liger reads the LM head's full weight, which ZeRO-3 partitions: use loss.kernel=torch "
                "(the sliced loss) or deepspeed.zero_stage=2",
            )
            require(self.slice_tokens > 0, "loss.slice_tokens", "must be > 0 with loss.kernel=liger")


@dataclass(frozen=True)
class LoraConfig:
    # Train low-rank adapters (peft LoRA) instead of all weights; the exported model has them merged.
    enabled: bool = False
    # Rank of each adapter.
    r: int = 16
    # Scale numerator: each adapter adds (alpha / r) * B @ A to its layer's weight.
    alpha: float = 32.0
    # Dropout on each adapter's input during training.
    dropout: float = 0.05
    # Layers to adapt: [all-linear] (every linear layer but the LM head) or names like [q_proj, v_proj].
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    # Also write the adapter alone (peft format, e.g. for vLLM --enable-lora) to model/adapter/.
    save_adapter: bool = False

    def validate(self) -> None:
        if not self.enabled:
            return
        require(self.r >= 1, "lora.r", f"must be >= 1, got {self.r}")
        require(self.alpha > 0, "lora.alpha", f"must be > 0, got {self.alpha}")
        require(0 <= self.dropout < 1, "lora.dropout", f"must be in [0, 1), got {self.dropout}")
        t = list(self.target_modules)
        require(bool(t), "lora.target_modules", "must not be empty: use [all-linear] or names like [q_proj]")
        require(
            "all-linear" not in t or len(t) == 1,
            "lora.target_modules",
            f"all-linear stands alone (got {t})",
        )
        bad = [n for n in t if n != "all-linear" and not _MODULE_NAME.fullmatch(str(n))]
        require(
            not bad,
            "lora.target_modules",
            f"{bad} are not module names: use [all-linear] or names like [q_proj, v_proj]",
        )


@dataclass(frozen=True)
class FinetuneOutputConfig(JobOutputConfig):
    # A local folder, or an object-store URI (s3://bucket/prefix, gs://...): checkpoints and the model
    # are then staged on local disk and uploaded, each with its completion marker last.
    dir: str = "outputs/finetune"
    # Save a resumable checkpoint (model, optimizer, scheduler, data position) every N steps (0: only
    # at the end of training).
    save_every_steps: int = 50
    # Checkpoints kept on disk (older ones are deleted after a newer one is complete).
    keep_last: int = 2


@dataclass(frozen=True)
class TrainRuntimeConfig(RayConfig):
    # ray_address and local_num_cpus: see RayConfig.
    # Ray Train workers (data-parallel ranks), each with these resources.
    num_workers: int = 1
    # CPUs reserved for each worker.
    cpus_per_worker: float = 1.0
    # GPUs for each worker (0: CPU training, gloo; > 0: nccl).
    gpus_per_worker: float = 0.0
    # torch threads per worker on CPU (0: cpus_per_worker, at least 1).
    torch_threads: int = 0
    # Ray Train restarts of the whole worker group after a worker failure; each restart resumes from
    # the last checkpoint (useful on preemptible nodes).
    max_failures: int = 0
    # Optimizer steps whose loss is NaN/inf are skipped (their update is never applied); one more than
    # this many fails the run before export, the last good checkpoint kept (0: the first one fails it).
    max_nonfinite_steps: int = 0

    def validate(self) -> None:
        super().validate()
        require(self.num_workers >= 1, "runtime.num_workers", f"must be >= 1, got {self.num_workers}")
        require(self.cpus_per_worker > 0, "runtime.cpus_per_worker", "must be > 0")
        require(self.gpus_per_worker >= 0, "runtime.gpus_per_worker", "must be >= 0")
        require(self.torch_threads >= 0, "runtime.torch_threads", "must be >= 0")
        require(self.max_failures >= 0, "runtime.max_failures", "must be >= 0")
        require(
            self.max_nonfinite_steps >= 0,
            "runtime.max_nonfinite_steps",
            f"must be >= 0, got {self.max_nonfinite_steps}",
        )


@dataclass(frozen=True)
class FinetuneLoggingConfig(LoggingConfig):
    """Experiment tracking (rank 0 logs train/loss, train/lr, train/tokens_per_s, train/grad_norm per
    step) and the progress line."""

    # Print one line (step, loss, lr, tok/s, ETA) every this many optimizer steps, and at the last (0: none).
    every_steps: int = 10

    def validate(self, key: str = "logging") -> None:
        super().validate(key)
        require(
            self.every_steps >= 0, f"{key}.every_steps", f"must be >= 0 (0: none), got {self.every_steps}"
        )


@dataclass(frozen=True)
class FinetuneConfig:
    # The preset that lists every key (named in errors about unknown keys).
    PRESET: ClassVar[str] = "conf/finetune.yaml"

    # The student model to fine-tune.
    model: ModelConfig = field(default_factory=ModelConfig)
    # The training rows and the filters that pick them.
    data: TrainDataConfig = field(default_factory=TrainDataConfig)
    # The prompt the student sees: the same keys (and defaults) as the generation job's prompt.
    prompt: PromptConfig = field(default_factory=PromptConfig)
    # Optimisation, schedule and batch geometry.
    optim: OptimConfig = field(default_factory=OptimConfig)
    # How the loss is computed (memory and speed only: the same numbers, left out of the fingerprint).
    loss: LossConfig = field(default_factory=LossConfig)
    # Low-rank adapters (peft LoRA) instead of full fine-tuning.
    lora: LoraConfig = field(default_factory=LoraConfig)
    # DeepSpeed ZeRO stage, offload and precision.
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    # Where checkpoints and the exported model go, and how often.
    output: FinetuneOutputConfig = field(default_factory=FinetuneOutputConfig)
    # Ray Train workers and their resources.
    runtime: TrainRuntimeConfig = field(default_factory=TrainRuntimeConfig)
    # Experiment tracking (TensorBoard, MLflow, W&B) and the progress line every N steps.
    logging: FinetuneLoggingConfig = field(default_factory=FinetuneLoggingConfig)

    def validate(self) -> None:
        m, d, o, z, out, r = self.model, self.data, self.optim, self.deepspeed, self.output, self.runtime
        require(bool(m.path), "model.path", "must not be empty")
        # Locations: a path or an object-store URI (s3://...); a bad scheme is refused naming the key.
        check_source_location(m.path, "model.path")
        check_source_location(d.path, "data.path")
        check_location(out.dir, "output.dir")
        require(
            m.attn_implementation in ("sdpa", "eager", "flash_attention_2"),
            "model.attn_implementation",
            f"must be sdpa, eager or flash_attention_2, got {m.attn_implementation!r}",
        )
        require(
            m.save_dtype in ("auto", "float32", "bfloat16", "float16"),
            "model.save_dtype",
            f"must be auto, float32, bfloat16 or float16, got {m.save_dtype!r}",
        )
        require(bool(d.path), "data.path", "must not be empty")
        require(bool(d.question_field) and bool(d.response_field), "data.response_field", "must not be empty")
        require(d.limit is None or d.limit >= 1, "data.limit", f"must be >= 1 or null, got {d.limit}")
        d.decontaminate.validate("data.decontaminate")
        try:  # checked before anything runs: a filter is never executed as code
            parse_all(list(d.filters), "data.filters")
        except FilterError as e:
            raise ConfigError(str(e)) from None
        self.prompt.validate()
        require(o.epochs >= 1, "optim.epochs", f"must be >= 1, got {o.epochs}")
        require(o.max_steps is None or o.max_steps >= 1, "optim.max_steps", "must be >= 1 or null")
        require(o.lr > 0, "optim.lr", f"must be > 0, got {o.lr}")
        require(
            o.schedule in ("cosine", "linear", "constant"),
            "optim.schedule",
            f"must be cosine, linear or constant, got {o.schedule!r}",
        )
        require(o.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
        require(0 <= o.min_lr_ratio <= 1, "optim.min_lr_ratio", "must be in [0, 1]")
        require(o.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
        require(
            0 <= o.adam_beta1 < 1 and 0 <= o.adam_beta2 < 1, "optim.adam_beta1", "betas must be in [0, 1)"
        )
        require(o.grad_clip >= 0, "optim.grad_clip", "must be >= 0 (0 = off)")
        require(o.max_seq_len >= 8, "optim.max_seq_len", f"must be >= 8, got {o.max_seq_len}")
        require(
            o.micro_batch_tokens >= o.max_seq_len,
            "optim.micro_batch_tokens",
            f"is {o.micro_batch_tokens}, below optim.max_seq_len={o.max_seq_len}: set it to at least "
            "max_seq_len so the longest example fits one micro-batch",
        )
        require(o.grad_accum_steps >= 1, "optim.grad_accum_steps", "must be >= 1")
        require(z.zero_stage in (0, 1, 2, 3), "deepspeed.zero_stage", f"must be 0-3, got {z.zero_stage}")
        require(
            not z.offload_param or z.zero_stage == 3,
            "deepspeed.offload_param",
            f"needs deepspeed.zero_stage=3 (got {z.zero_stage})",
        )
        require(
            not z.offload_optimizer or z.zero_stage >= 1,
            "deepspeed.offload_optimizer",
            "needs deepspeed.zero_stage >= 1",
        )
        require(
            z.precision in ("fp32", "bf16", "fp16"),
            "deepspeed.precision",
            f"must be fp32, bf16 or fp16, got {z.precision!r}",
        )
        require(
            z.precision != "fp16" or r.gpus_per_worker > 0,
            "deepspeed.precision",
            "fp16 needs GPUs (runtime.gpus_per_worker > 0); use bf16 or fp32 on CPU",
        )
        self.loss.validate(z.zero_stage, r.gpus_per_worker)
        self.lora.validate()
        self.logging.validate()
        out.validate()
        require(out.save_every_steps >= 0, "output.save_every_steps", "must be >= 0")
        require(out.keep_last >= 1, "output.keep_last", "must be >= 1")
        r.validate()


# What changes the trained weights (gen_ssd_ray.common.fingerprint). Left out: output.* (placement,
# checkpoint cadence, force), runtime.* except num_workers (Ray address, per-worker resources,
# threads, restarts, the non-finite step budget: a fault policy, like restarts) and loss.* (the same
# loss computed another way). `LORA_KEYS` join them when lora.enabled (a run without LoRA keeps the
# fingerprint it had before the lora section existed).
# data.decontaminate is out too: what it drops changes the training data's signature (a derived value).
DATA_KEYS = (
    "model",
    *(
        f"data.{k}"
        for k in ("path", "question_field", "response_field", "filters", "expect_fingerprint", "limit")
    ),
    "prompt",
    "optim",
    "deepspeed",
    "runtime.num_workers",
)
LORA_KEYS = ("lora.enabled", "lora.r", "lora.alpha", "lora.dropout", "lora.target_modules")


def train_fingerprint(cfg: FinetuneConfig, model_revision: str, data_signature: str) -> str:
    """Fingerprint of `DATA_KEYS`, the input model's identity and the training data's (row count and
    content hash)."""
    # The values predate the shared convention and are pinned (tests/test_fingerprints.py): they were
    # the hash of `asdict(cfg)` minus the ignored fields, which left an empty "output" section and the
    # top-level keys "_model_revision" and "_data". The derived values reproduce exactly that JSON, so
    # that folders written before keep resuming.
    derived = {"output": {}, "_model_revision": model_revision, "_data": data_signature}
    keys = DATA_KEYS + LORA_KEYS if cfg.lora.enabled else DATA_KEYS
    return fingerprint(cfg, keys, derived)
