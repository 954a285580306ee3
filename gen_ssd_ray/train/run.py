"""The fine-tuning job's driver: everything `python -m jobs.finetune` does, in order.

1. `prepare(cfg)`: resolve and check the model (a causal LM with a chat template whose tokenizer fits
   its embeddings; with `lora.enabled`, one whose layers the LoRA targets match), read and filter the
   rows, tokenize them, and check the output folder (a folder
   written with another config is refused unless `output.force`). Everything that can fail on bad
   input fails here, before Ray or any worker starts.
2. `run_finetune(cfg, prepared)`: a complete folder with the same fingerprint is returned as is (a
   pipeline re-run skips the stage); otherwise Ray Train's `TorchTrainer` runs
   `gen_ssd_ray.train.worker.train_loop_per_worker` on `runtime.num_workers` workers (gloo on CPU,
   nccl on GPU), which resumes from the last checkpoint if there is one. Then the loss plot and
   `summary.json` (written last) are produced from the run's own files.

`output.dir` may be an object-store URI (``s3://bucket/runs/ft``): the job then works in a local staging
folder rebuilt from the store (gen_ssd_ray.train.remote), holds the folder's lease instead of a file
lock, and uploads every complete checkpoint (marker last), the exported model (marker last), the
metrics, the plot and `summary.json` (last); the lease is checked before each upload.

Failures follow the shared model (gen_ssd_ray.common.errors): bad input is an `InputError`
(`ModelIncompatibleError`, `TrainDataError`, `TrainOutputExistsError`, ...; exit 2); a failed worker
surfaces as `JobFailed`, naming the last complete checkpoint a re-run resumes from (exit 1), and so do
more non-finite steps than `runtime.max_nonfinite_steps` (nothing exported); SIGINT or
SIGTERM during training is `JobInterrupted` (exit 130), the last checkpoint kept.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from gen_ssd_ray.common.cluster import init_ray
from gen_ssd_ray.common.errors import InputError, JobFailed, JobInterrupted
from gen_ssd_ray.common.fsio import atomic_write_json, atomic_write_text, atomic_writer
from gen_ssd_ray.common.interrupts import raise_on_signals
from gen_ssd_ray.common.joblock import FolderLock, ObjectLease, lock_job_folder
from gen_ssd_ray.common.models import model_revision
from gen_ssd_ray.common.tracking import tracking_dir
from gen_ssd_ray.train import checkpoint as ck
from gen_ssd_ray.train.config import FinetuneConfig, train_fingerprint
from gen_ssd_ray.train.data import (
    Examples,
    FilterStep,
    TokenizeReport,
    TrainDataError,
    batch_stats,
    data_signature,
    plan_epoch,
    read_filtered,
    steps_per_epoch,
    tokenize,
)
from gen_ssd_ray.train.nonfinite import REPORT as NONFINITE_REPORT
from gen_ssd_ray.train.nonfinite import failure_message
from gen_ssd_ray.train.worker import FAIL_AT_STEP_ENV, NAN_AT_STEPS_ENV

log = logging.getLogger("gen_ssd_ray.train")


class ModelIncompatibleError(InputError):
    """The model folder cannot be fine-tuned here; the message says why and what to use."""


class TrainOutputExistsError(InputError):
    """output.dir holds a run with another fingerprint; the message says how to proceed."""


@dataclass
class Prepared:
    model_path: str
    examples: Examples
    rows_read: int
    filters: list[FilterStep]
    tokenized: TokenizeReport
    fingerprint: str
    pad_id: int
    save_dtype: str
    complete: dict[str, Any] | None  # the summary of an already complete run with this fingerprint
    # `output.dir`'s job-folder lock (an object store's lease), taken by `prepare` and released when
    # `run_finetune` returns.
    lock: FolderLock | ObjectLease | None = None


def work_dir(cfg: FinetuneConfig) -> Path:
    """Where the run's files are written on this machine: `output.dir`, or for an object-store URI its
    local staging folder (gen_ssd_ray.train.remote)."""
    from gen_ssd_ray.common.storage import is_remote
    from gen_ssd_ray.train.remote import staging_dir

    return staging_dir(cfg.output.dir) if is_remote(cfg.output.dir) else Path(cfg.output.dir)


def remote_of(cfg: FinetuneConfig):
    """The Storage of `output.dir` if it is on an object store, else None."""
    from gen_ssd_ray.common.storage import Storage, is_remote

    return Storage(cfg.output.dir, key="output.dir") if is_remote(cfg.output.dir) else None


def check_model(path: str, trust_remote_code: bool):
    """(tokenizer, config) of a model folder that can be fine-tuned; raises ModelIncompatibleError."""
    from transformers import AutoConfig, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        raise ModelIncompatibleError(
            f"model.path={path!r} cannot be loaded: {type(e).__name__}: {e}"
        ) from None
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not trust_remote_code:
        raise ModelIncompatibleError(
            f"model.path={path!r} is a {config.model_type!r} model, not a causal language model "
            "transformers can train (AutoModelForCausalLM)"
        )
    if not tokenizer.chat_template:
        raise ModelIncompatibleError(
            f"model.path={path!r}: its tokenizer has no chat template; the student is trained and "
            "evaluated in its chat template (add chat_template.jinja to the folder)"
        )
    vocab = getattr(config.get_text_config(), "vocab_size", None)
    if vocab is not None and len(tokenizer) > vocab:
        raise ModelIncompatibleError(
            f"model.path={path!r}: the tokenizer has {len(tokenizer)} tokens but the model's embeddings "
            f"only {vocab}: the tokenizer belongs to another model"
        )
    if tokenizer.eos_token_id is None:
        raise ModelIncompatibleError(f"model.path={path!r}: the tokenizer has no EOS token")
    check_safetensors(path)
    return tokenizer, config


def check_safetensors(path: str) -> None:
    """The weights are loaded from safetensors only (no unpickling): refuse a folder without them."""
    folder = Path(path)
    if not folder.is_dir() or any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl"))
    what = f"only pickle weights ({', '.join(pickles[:3])})" if pickles else "no *.safetensors weights"
    raise ModelIncompatibleError(
        f"model.path={path!r} has {what}: weights are loaded from safetensors only, since pickle files run "
        "code when loaded; convert it (AutoModelForCausalLM.from_pretrained(path).save_pretrained(new_path, "
        "safe_serialization=True), with the tokenizer files) and point model.path at the new folder"
    )


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this (Linux x86) CPU computes bf16 natively; True when it cannot tell (no /proc/cpuinfo,
    another architecture), so that nothing is claimed without evidence."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return True
    flags = next((line for line in cpuinfo.splitlines() if line.startswith("flags")), None)
    if flags is None:
        return True
    return bool({"avx512_bf16", "amx_bf16"} & set(flags.split()))


def prepare(cfg: FinetuneConfig) -> Prepared:
    """Everything that can fail on bad input, before any worker starts (see the module docstring).

    Raises ModelNotFoundError / ModelIncompatibleError / TrainDataError (EmptyTrainingSetError) /
    TrainOutputExistsError, all InputErrors whose message names the key and the fix.
    """
    from gen_ssd_ray.common.models import resolve_model
    from gen_ssd_ray.common.prompts import check_chat_model

    if cfg.deepspeed.precision == "bf16" and cfg.runtime.gpus_per_worker == 0 and not cpu_has_native_bf16():
        log.warning(
            "deepspeed.precision=bf16 on CPU workers, and this machine's CPU has no native bf16 "
            "(avx512_bf16/amx_bf16): every matmul is emulated and training is many times slower than "
            "fp32; set deepspeed.precision=fp32 for CPU training"
        )
    model_path = resolve_model(cfg.model.path, "model.path")
    tokenizer, mconfig = check_model(model_path, cfg.model.trust_remote_code)
    check_loss_and_lora(cfg, mconfig)
    check_chat_model(
        model_path,
        f"model.path={cfg.model.path!r}",
        cfg.prompt,
        max_prompt_tokens=cfg.optim.max_seq_len - 1,  # a response has at least one token
        budget=f"optim.max_seq_len={cfg.optim.max_seq_len} (less one response token)",
        example=True,
        tokenizer=tokenizer,
    )
    df, steps, rows_read = read_filtered(cfg.data)
    examples, report = tokenize(df, tokenizer, cfg.data, cfg.prompt, cfg.optim.max_seq_len)
    if len(examples) == 0:
        raise TrainDataError(
            f"no training examples: {len(df)} rows passed data.filters but all are longer than "
            f"optim.max_seq_len={cfg.optim.max_seq_len} tokens ({report.dropped_too_long}) or have an empty "
            "response; raise optim.max_seq_len"
        )
    fp = train_fingerprint(cfg, model_revision(model_path), data_signature(df, cfg.data))
    out = work_dir(cfg)
    # One fine-tune per folder (exit 2 if another job holds it), before reading anything in it.
    lock = lock_job_folder(cfg.output.dir, "finetune")
    try:
        storage = remote_of(cfg)
        if storage is not None:  # the staging folder, rebuilt from the store
            from gen_ssd_ray.train.remote import pull

            pull(storage, out)
        complete = _check_output(cfg, out, fp)
    except BaseException:
        lock.release()
        raise
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    save_dtype = cfg.model.save_dtype
    if save_dtype == "auto":
        dt = getattr(mconfig, "dtype", None) or getattr(mconfig, "torch_dtype", None)
        save_dtype = str(dt).removeprefix("torch.") if dt is not None else "float32"
    return Prepared(model_path, examples, rows_read, steps, report, fp, pad_id, save_dtype, complete, lock)


def check_loss_and_lora(cfg: FinetuneConfig, model_config) -> None:
    """The packages `loss.kernel` and `lora.enabled` need are installed, and the LoRA targets match
    layers of the model (ConfigError naming the key, before anything starts)."""
    from gen_ssd_ray.common.config import ConfigError

    if cfg.loss.kernel == "liger":
        try:
            import liger_kernel  # noqa: F401
        except ImportError:
            raise ConfigError(
                "loss.kernel: liger needs the liger-kernel package (the project's gpu extra): install it, "
                "or use loss.kernel=torch"
            ) from None
    if cfg.lora.enabled:
        from gen_ssd_ray.train.lora import check_targets, require_peft

        require_peft()
        check_targets(model_config, cfg.lora, cfg.model.trust_remote_code)


def _check_output(cfg: FinetuneConfig, out: Path, fp: str) -> dict[str, Any] | None:
    """The summary of a complete run of `fp` in `out` (skip it), else None; raises if `out` holds
    another config's run (without output.force) or checkpoints that cannot be resumed."""
    complete = None
    state = ck.read_json(out / ck.STATE)
    if state is not None and state.get("fingerprint") != fp:
        if not cfg.output.force:
            raise TrainOutputExistsError(
                f"output.dir={cfg.output.dir!r} holds a fine-tuning run with another config or data "
                f"(fingerprint {state.get('fingerprint')} != {fp}){_world_size_hint(cfg, out)}: use "
                "another output.dir, or set output.force=true to start over there"
            )
    else:
        # A folder this run resumes in: nothing under checkpoints/ may be a guess (exit 2 here, before
        # Ray starts), and the checkpoint it resumes from must be this run's and the job's own.
        ck.check_folder(out)
        ck.resume_tag(out, fp, cfg.runtime.num_workers)
    if state is not None and state.get("fingerprint") == fp:
        summary = ck.read_json(out / ck.SUMMARY)
        if summary is not None and summary.get("fingerprint") == fp and ck.model_complete(out):
            complete = summary
    return complete


def _world_size_hint(cfg: FinetuneConfig, out: Path) -> str:
    """'; its checkpoints were written by N workers ...' when only the world size differs."""
    import yaml

    try:
        old = yaml.safe_load((out / ck.CONFIG).read_text()) or {}
        workers = int(old["runtime"]["num_workers"])
    except (OSError, ValueError, KeyError, TypeError, yaml.YAMLError):
        return ""
    if workers == cfg.runtime.num_workers or not ck.complete_tags(out):
        return ""
    return (
        f"; its checkpoints were written by runtime.num_workers={workers} (this run: "
        f"{cfg.runtime.num_workers}), and a ZeRO checkpoint is partitioned per worker: re-run with "
        f"runtime.num_workers={workers} to resume it"
    )


def _start_fresh(cfg: FinetuneConfig, p: Prepared, out: Path) -> None:
    """Write the run's identity; a forced run over another config's folder starts from scratch."""
    import shutil

    from gen_ssd_ray.common.config import to_yaml

    storage = remote_of(cfg)
    state = ck.read_json(out / ck.STATE)
    if state is not None and state.get("fingerprint") != p.fingerprint:  # output.force=true
        for name in (ck.CHECKPOINTS, ck.MODEL):
            shutil.rmtree(out / name, ignore_errors=True)
        for name in (ck.METRICS, ck.SUMMARY, ck.PLOT):
            (out / name).unlink(missing_ok=True)
        if storage is not None:
            from gen_ssd_ray.train.remote import clear_run

            p.lock.check()
            clear_run(storage)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / ck.CONFIG, to_yaml(cfg))
    atomic_write_json(out / ck.STATE, {"fingerprint": p.fingerprint})
    (out / ck.SUMMARY).unlink(missing_ok=True)
    (out / NONFINITE_REPORT).unlink(missing_ok=True)
    if storage is not None:
        from gen_ssd_ray.train.remote import push_files

        p.lock.check()
        storage.delete(ck.SUMMARY)
        storage.delete(NONFINITE_REPORT)
        push_files(storage, out, [ck.CONFIG, ck.STATE])
    partial = ck.incomplete_tags(out)
    if partial:
        log.warning(
            "ignoring incomplete checkpoint folders in %s (a save cut short): %s; training overwrites "
            "them when it reaches their step",
            out / ck.CHECKPOINTS,
            partial,
        )


def launch(cfg: FinetuneConfig, p: Prepared, out: Path) -> None:
    """Run the Ray Train job (blocks). Raises JobFailed when a worker fails, JobInterrupted on SIGINT or
    SIGTERM."""
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from gen_ssd_ray.train.worker import train_loop_per_worker

    r = cfg.runtime
    use_gpu = r.gpus_per_worker > 0
    resources = {"CPU": r.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = r.gpus_per_worker
    worker_env = {"TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(max(1, int(r.cpus_per_worker)))}
    for name in ("HF_HUB_OFFLINE", "TORCH_EXTENSIONS_DIR"):
        if name in os.environ:
            worker_env[name] = os.environ[name]
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "cfg": cfg,
            "out_dir": str(out.resolve()),
            # An object-store output.dir, and the lease the workers check before each upload.
            "remote": cfg.output.dir if remote_of(cfg) is not None else None,
            "lease_id": getattr(p.lock, "lease_id", None),
            "model_path": p.model_path,
            "examples_ref": ray.put(p.examples),
            "fingerprint": p.fingerprint,
            "pad_id": p.pad_id,
            "save_dtype": p.save_dtype,
            "fail_at_step": os.environ.get(FAIL_AT_STEP_ENV),
            "nan_at_steps": os.environ.get(NAN_AT_STEPS_ENV),
            # Rank 0's tracking folder, resolved here (a worker's working directory is not the driver's).
            "tracking_dir": str(tracking_dir(cfg.logging, cfg.output.dir, "finetune")),
        },
        scaling_config=ScalingConfig(
            num_workers=r.num_workers, use_gpu=use_gpu, resources_per_worker=resources
        ),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(
            name="finetune",
            storage_path=str((out / "_ray").resolve()),
            failure_config=FailureConfig(max_failures=r.max_failures),
            worker_runtime_env={"env_vars": worker_env},
        ),
    )
    try:
        # SIGTERM (`ray job stop`) interrupts `fit` like Ctrl-C (installed after ray.init's handlers).
        with raise_on_signals():
            trainer.fit()
    except (KeyboardInterrupt, SystemExit) as e:  # a signal, or Ray Train exiting after aborting the run
        raise JobInterrupted(f"training interrupted; {_resume_hint(out, _remote_uri(cfg))}") from e
    except Exception as e:  # TrainingFailedError and friends: say what is left and how to continue
        _push_report(cfg, p, out)
        last = ck.latest_tag(out)
        if ck.model_complete(out) and last is not None and (ck.step_of(last) or 0) >= planned_steps(cfg, p):
            # Every step ran and the model was exported; a worker then died on its way out (a 2-rank
            # ZeRO-3 run has been seen to abort at exit).
            log.warning("training finished and the model was exported, but a worker failed at exit: %s", e)
            return
        nonfinite = failure_message(out, ck.read_json(out / NONFINITE_REPORT))
        if nonfinite is not None:
            raise JobFailed(nonfinite) from e
        text = str(e).strip()
        raise JobFailed(
            f"training failed: {type(e).__name__}: {text.splitlines()[-1] if text else ''}; {_resume_hint(out, _remote_uri(cfg))}"
        ) from e


def _remote_uri(cfg: FinetuneConfig) -> str | None:
    storage = remote_of(cfg)
    return storage.uri if storage is not None else None


def _push_report(cfg: FinetuneConfig, p: Prepared, out: Path) -> None:
    """A failed run's non-finite report and metrics, to an object-store output.dir (best effort)."""
    storage = remote_of(cfg)
    if storage is None:
        return
    from gen_ssd_ray.train.remote import push_files

    try:
        p.lock.check()
        push_files(storage, out, [NONFINITE_REPORT, ck.METRICS])
    except Exception as e:  # the failure being reported matters more
        log.warning("could not upload the run's report to %s: %s", cfg.output.dir, e)


def _resume_hint(out: Path, remote: str | None = None) -> str:
    last = ck.latest_tag(out)
    where = f"the last complete checkpoint is {last}" if last else "no checkpoint was completed yet"
    folder = f"{remote}/{ck.CHECKPOINTS}" if remote else out / ck.CHECKPOINTS
    return f"{where} in {folder}; re-run the same command to resume"


def run_finetune(cfg: FinetuneConfig, prepared: Prepared | None = None) -> dict[str, Any]:
    """Train (or resume, or skip a complete run) and return the summary (also in summary.json)."""
    p = prepared or prepare(cfg)
    try:
        return _run_locked(cfg, p)
    finally:
        if p.lock is not None:
            p.lock.release()


def _run_locked(cfg: FinetuneConfig, p: Prepared) -> dict[str, Any]:
    from gen_ssd_ray.common.cluster import actor_demand, check_fits

    out = work_dir(cfg)
    if p.complete is not None:
        log.info("%s is complete for this config: skipping training", out)
        return {**p.complete, "skipped": True}
    started = time.perf_counter()
    init_ray(cfg.runtime.ray_address, cfg.runtime.local_num_cpus, dashboard=True)
    r = cfg.runtime  # workers the cluster can never place: refused in seconds, not after a timeout
    check_fits(
        [
            actor_demand(
                "training workers",
                r.num_workers,
                "runtime.num_workers / runtime.cpus_per_worker / runtime.gpus_per_worker",
                num_cpus=r.cpus_per_worker,
                num_gpus=r.gpus_per_worker,
            )
        ]
    )
    _start_fresh(cfg, p, out)  # only once the workers can start: a refusal writes nothing
    resumed = ck.resume_tag(out, p.fingerprint, cfg.runtime.num_workers)
    if resumed is not None:
        log.info("resuming from %s", out / ck.CHECKPOINTS / resumed)
    launch(cfg, p, out)
    if not ck.model_complete(out):  # a worker can abort at exit after finishing (see launch)
        raise JobFailed(f"training ended but {out / ck.MODEL} is incomplete; re-run to export again")
    metrics = ck.read_metrics(out)
    plot_metrics(metrics, out / ck.PLOT)
    summary = make_summary(cfg, p, metrics, out, time.perf_counter() - started)
    summary["resumed_from_step"] = ck.step_of(resumed) if resumed is not None else None
    atomic_write_json(out / ck.SUMMARY, summary, indent=1)
    storage = remote_of(cfg)
    if storage is not None:  # the metrics and plot, then summary.json last: the run is complete
        from gen_ssd_ray.train.remote import push_files

        p.lock.check()
        push_files(storage, out, [ck.METRICS, ck.PLOT, ck.SUMMARY])
    return summary


def planned_steps(cfg: FinetuneConfig, p: Prepared) -> int:
    """Optimizer steps of the whole run (as the workers count them)."""
    o = cfg.optim
    per_epoch = [
        steps_per_epoch(
            len(plan_epoch(p.examples.lengths, e, o.seed, o.micro_batch_tokens, o.packing)),
            cfg.runtime.num_workers,
            o.grad_accum_steps,
        )
        for e in range(o.epochs)
    ]
    return sum(per_epoch) if o.max_steps is None else min(o.max_steps, sum(per_epoch))


def make_summary(cfg: FinetuneConfig, p: Prepared, metrics: list[dict], out: Path, elapsed: float) -> dict:
    o = cfg.optim
    lengths = p.examples.lengths
    plan = plan_epoch(lengths, 0, o.seed, o.micro_batch_tokens, o.packing)
    spe = steps_per_epoch(len(plan), cfg.runtime.num_workers, o.grad_accum_steps)
    last = metrics[-1] if metrics else {}
    losses = [m["loss"] for m in metrics if m.get("loss") is not None]
    remote = remote_of(cfg)
    return {
        "fingerprint": p.fingerprint,
        "output_dir": remote.uri if remote is not None else str(out.resolve()),
        "model_dir": remote.uri_of(ck.MODEL) if remote is not None else str((out / ck.MODEL).resolve()),
        "base_model": p.model_path,
        "data_path": cfg.data.path,
        "rows_read": p.rows_read,
        "filters": [asdict(s) for s in p.filters],
        "examples": p.tokenized.examples,
        "dropped_too_long": p.tokenized.dropped_too_long,
        "dropped_unrenderable": p.tokenized.dropped_unrenderable,
        "response_tokens": p.examples.response_tokens,
        "mean_example_tokens": p.tokenized.mean_len,
        "steps": int(last.get("step", 0)),
        "steps_per_epoch": spe,
        "epochs": o.epochs,
        "num_workers": cfg.runtime.num_workers,
        "zero_stage": cfg.deepspeed.zero_stage,
        "offload_optimizer": cfg.deepspeed.offload_optimizer,
        "offload_param": cfg.deepspeed.offload_param,
        "precision": cfg.deepspeed.precision,
        # how the loss was computed (loss.*), and the LoRA adapters (None: full fine-tuning)
        "loss_slice_tokens": cfg.loss.slice_tokens,
        "loss_kernel": cfg.loss.kernel,
        "lora": asdict(cfg.lora) if cfg.lora.enabled else None,
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        # steps whose loss was NaN/inf and whose update was skipped (runtime.max_nonfinite_steps)
        "nonfinite_steps_skipped": [m["step"] for m in metrics if m.get("skipped_nonfinite")],
        "train/tokens_per_s": last.get("tokens_per_s"),
        "train/batch": batch_stats(lengths, plan, o.micro_batch_tokens, o.packing),
        "elapsed_s": round(elapsed, 1),
    }


def plot_metrics(metrics: list[dict], path: Path) -> None:
    """Loss and learning rate per optimizer step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [m["step"] for m in metrics]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(7, 5), sharex=True)
    losses = [m["loss"] if m.get("loss") is not None else float("nan") for m in metrics]
    ax1.plot(steps, losses, marker="." if len(steps) < 50 else None)
    ax1.set_ylabel("loss (NLL per response token)")
    ax1.grid(alpha=0.3)
    ax2.plot(steps, [m["lr"] for m in metrics], color="tab:orange")
    ax2.set_ylabel("learning rate")
    ax2.set_xlabel("optimizer step")
    ax2.grid(alpha=0.3)
    fig.suptitle(f"fine-tuning: {path.parent.name}")
    fig.tight_layout()
    try:
        with atomic_writer(path) as fh:
            fig.savefig(fh, format="png", dpi=100)
    finally:
        plt.close(fig)


def _lora_note(summary: dict[str, Any]) -> str:
    lora = summary.get("lora")
    return f", LoRA r={lora['r']} (merged into the model)" if lora else ""


def format_summary(summary: dict[str, Any]) -> str:
    kept = summary["filters"]
    filt = "; ".join(f"`{f['expr']}` {f['before']} -> {f['after']}" for f in kept)
    lines = [
        "",
        f"Model: {summary['model_dir']}  (a Hugging Face folder: transformers, vLLM and jobs.generate load it)",
        f"Data: {summary['rows_read']} rows read from {summary['data_path']}; {filt}; "
        f"{summary['examples']} examples ({summary['dropped_too_long']} dropped as too long), "
        f"{summary['response_tokens']} response tokens.",
        f"Training: {summary['steps']} steps ({summary['steps_per_epoch']}/epoch x {summary['epochs']}), "
        f"ZeRO-{summary['zero_stage']} {summary['precision']}{_lora_note(summary)}, "
        f"{summary['num_workers']} worker(s); loss "
        f"{summary['first_loss']:.4f} -> {summary['final_loss']:.4f}; {summary['train/tokens_per_s']} tok/s.",
        f"Files: {summary['output_dir']}/metrics.jsonl (per step), loss.png, checkpoints/ (resumable), "
        "summary.json.",
    ]
    if summary.get("skipped"):
        lines.insert(1, "Already complete for this config: nothing to do.")
    return "\n".join(lines)
