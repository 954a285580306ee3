"""One Ray Train worker of the fine-tuning job: DeepSpeed ZeRO training of a Hugging Face causal LM.

`train_loop_per_worker(config)` is what `TorchTrainer` runs on every rank (torch.distributed is
already initialized by Ray Train: gloo on CPU, nccl on GPU). Step by step:

1. Load the model (under ZeRO-3 through `HfDeepSpeedConfig`, so weights are partitioned as they load),
   with `lora.enabled` wrap it in peft adapters (only they train: gen_ssd_ray.train.lora), build AdamW
   over the trainable weights (DeepSpeed CPU-Adam when the optimizer is offloaded) and the warm-up +
   decay schedule, and hand all three to `deepspeed.initialize`.
2. Resume from `checkpoints/latest` if there is one: model, optimizer and scheduler state come back
   from DeepSpeed; the data position is the global step, because the batch plan is a pure function
   of (epoch, seed, geometry).
3. Train: at every step each rank runs its `grad_accum_steps` micro-batches. The loss is the sum of
   token NLLs divided by the number of response tokens in the *global* batch (all ranks and
   micro-batches; one all-reduce per step), so every token weighs the same whatever the packing. The
   summed NLL comes from gen_ssd_ray.train.loss: by default from the final hidden states in slices of
   `loss.slice_tokens` (the micro-batch's full fp32 logits never exist). A step
   whose global loss is NaN/inf is skipped, never applied; more than `runtime.max_nonfinite_steps` of
   them fail the run (gen_ssd_ray.train.nonfinite), and a checkpoint or the exported model is written
   only from finite weights.
   Rank 0 appends each step's row to `metrics.jsonl`, logs it to `logging.backends` (train/loss,
   train/lr, train/tokens_per_s, train/grad_norm, ...; gen_ssd_ray.common.tracking) and prints a
   progress line with the ETA every `logging.every_steps` steps.
4. Every `save_every_steps` and at the end: a DeepSpeed checkpoint; every rank fsyncs it, then rank 0
   writes its completion marker and moves `latest` (see `gen_ssd_ray.train.checkpoint`).
5. Export: the full weights (gathered from the ZeRO-3 partitions if needed) as a Hugging Face folder
   with the tokenizer and chat template, renamed into place by rank 0. With LoRA: only the adapters are
   gathered and checkpointed; the export is the base model with them merged (the same kind of folder),
   plus `model/adapter/` with `lora.save_adapter`.

With an object-store `output.dir` (`config["remote"]`), `out_dir` is the local staging folder: a node
that lacks the newest complete checkpoint downloads it before the resume (its local rank 0), each
complete checkpoint is uploaded (every rank its own files, rank 0 the marker last) and so is the
exported model, each upload after checking the driver's lease (gen_ssd_ray.train.remote).

Knows nothing about where the data came from or how the job was configured beyond the plain dict it
receives (see `gen_ssd_ray.train.run`).
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

from gen_ssd_ray.common.fsio import fsync_dir
from gen_ssd_ray.train import checkpoint as ck
from gen_ssd_ray.train.config import FinetuneConfig
from gen_ssd_ray.train.data import (
    collate,
    plan_epoch,
    response_token_count,
    step_micro_batches,
    steps_per_epoch,
)
from gen_ssd_ray.train.loss import OutputHead, micro_batch_nll, supports_hidden_path
from gen_ssd_ray.train.nonfinite import (
    NonFiniteGuard,
    NonFiniteLossError,
    check_weights_finite,
    write_report,
)

log = logging.getLogger("gen_ssd_ray.train")

# Test hook: the last rank exits abruptly when it reaches this step (a crashed or preempted worker).
FAIL_AT_STEP_ENV = "GEN_SSD_TRAIN_FAIL_AT_STEP"
# Test hook: the last rank's loss is NaN at these steps (comma-separated, 1-based).
NAN_AT_STEPS_ENV = "GEN_SSD_TRAIN_NAN_AT_STEPS"
# The metrics row's columns each step's trackers get, as train/<column>.
TRACKED = ("loss", "lr", "tokens_per_s", "grad_norm", "epoch", "loss_tokens")


def lr_lambda(step: int, warmup: int, total: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the base learning rate at optimizer step `step` (0-based)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return 1.0 - (1.0 - min_ratio) * progress
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def deepspeed_config(cfg: FinetuneConfig) -> dict[str, Any]:
    z, o = cfg.deepspeed, cfg.optim
    zero: dict[str, Any] = {"stage": z.zero_stage}
    if z.zero_stage == 3:
        # Without it, save_16bit_model writes nothing under ZeRO-3 (the exported folder would be empty).
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if z.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cfg.runtime.gpus_per_worker > 0}
    if z.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": cfg.runtime.gpus_per_worker > 0}
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": o.grad_accum_steps,
        "gradient_clipping": o.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": z.precision == "bf16"},
        "fp16": {"enabled": z.precision == "fp16"},
        "steps_per_print": 1_000_000_000,
        "wall_clock_breakdown": False,
    }


def _loss_head(cfg: FinetuneConfig, model, rank: int) -> OutputHead | None:
    """The LM head for the hidden-states loss (gen_ssd_ray.train.loss), or None for the full-logits path
    (loss.slice_tokens=0, or a model whose forward cannot skip its logits)."""
    if cfg.loss.slice_tokens == 0:
        return None
    if not supports_hidden_path(model):
        if rank == 0:
            print(
                "[finetune] this model's forward takes no logits_to_keep: the loss is computed from its full "
                "logits (as with loss.slice_tokens=0)",
                flush=True,
            )
        return None
    return OutputHead(model)


def _optimizer(cfg: FinetuneConfig, params):
    o = cfg.optim
    kwargs = dict(lr=o.lr, betas=(o.adam_beta1, o.adam_beta2), weight_decay=o.weight_decay)
    if cfg.deepspeed.offload_optimizer:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(params, adamw_mode=True, **kwargs)
    import torch

    # A torch optimizer instance avoids DeepSpeed's FusedAdam, a CUDA extension it would otherwise
    # build at start-up.
    return torch.optim.AdamW(params, **kwargs)


def _load_model(cfg: FinetuneConfig, model_path: str, ds_config: dict):
    import torch
    from transformers import AutoModelForCausalLM

    keep = None
    if cfg.deepspeed.zero_stage == 3:
        from transformers.integrations import HfDeepSpeedConfig

        keep = HfDeepSpeedConfig(ds_config)  # must stay alive while from_pretrained runs
    model = AutoModelForCausalLM.from_pretrained(
        model_path,
        dtype=torch.float32,
        attn_implementation=cfg.model.attn_implementation,
        trust_remote_code=cfg.model.trust_remote_code,
        use_safetensors=True,  # never unpickle model weights (the driver checked they exist)
    )
    del keep
    model.config.use_cache = False
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point; `config` comes from `gen_ssd_ray.train.run.launch`."""
    import deepspeed
    import ray
    import ray.train
    import torch
    import torch.distributed as dist

    from gen_ssd_ray.common.models import localize_model

    cfg: FinetuneConfig = config["cfg"]
    out = Path(config["out_dir"])
    # A model from an object store: the driver's copy, downloaded on this node if it lacks it (once per
    # node: concurrent ranks wait on the cache's build lock).
    config = {**config, "model_path": localize_model(config["model_path"])}
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    threads = cfg.runtime.torch_threads or max(1, int(cfg.runtime.cpus_per_worker))
    torch.set_num_threads(threads)
    torch.manual_seed(cfg.optim.seed)
    examples = ray.get(config["examples_ref"])
    lengths = examples.lengths
    o = cfg.optim
    packing = o.packing

    # Every epoch's plan, identical on every rank; global step s runs epoch_of(s)'s plan.
    plans = [plan_epoch(lengths, e, o.seed, o.micro_batch_tokens, packing) for e in range(o.epochs)]
    starts = list(
        itertools.accumulate((steps_per_epoch(len(p), world, o.grad_accum_steps) for p in plans), initial=0)
    )
    total = starts[-1] if o.max_steps is None else min(o.max_steps, starts[-1])

    ds_config = deepspeed_config(cfg)
    model = _load_model(cfg, config["model_path"], ds_config)
    if cfg.lora.enabled:  # before deepspeed.initialize, which then partitions the adapters too (ZeRO-3)
        from gen_ssd_ray.train.lora import wrap

        model = wrap(model, cfg.lora, cfg.model.gradient_checkpointing)
    head = _loss_head(cfg, model, rank)
    warmup, sched, min_ratio = o.warmup_steps, o.schedule, o.min_lr_ratio

    def make_scheduler(optimizer):
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_lambda(s, warmup, total, sched, min_ratio)
        )

    engine, _, _, scheduler = deepspeed.initialize(
        model=model,
        optimizer=_optimizer(cfg, [p for p in model.parameters() if p.requires_grad]),
        lr_scheduler=make_scheduler,
        config=ds_config,
    )

    remote = None
    if config.get("remote"):
        from gen_ssd_ray.common.storage import Storage
        from gen_ssd_ray.train import remote as rm

        remote = Storage(config["remote"], key="output.dir")
        if ctx.get_local_rank() == 0:  # one download per node, if this node lacks the checkpoint
            out.mkdir(parents=True, exist_ok=True)
            rm.ensure_checkpoint(remote, out, config["fingerprint"])
        dist.barrier()

    # Resume.
    step = 0
    # The newest complete checkpoint, checked to be this run's (fingerprint, world size) and the job's
    # own (owner) before DeepSpeed unpickles it (the driver ran the same checks; a restarted worker
    # group may find a newer checkpoint).
    tag = ck.resume_tag(out, config["fingerprint"], world)
    if tag is not None:
        # A LoRA checkpoint holds the adapters only (the frozen base comes from model.path).
        load_path, client = engine.load_checkpoint(
            str(out / ck.CHECKPOINTS), tag=tag, load_module_strict=not cfg.lora.enabled
        )
        if load_path is None:
            raise RuntimeError(
                f"checkpoint {out / ck.CHECKPOINTS / tag} could not be loaded (see the log above): move "
                "that folder out of checkpoints/ to resume from the one before it"
            )
        step = int((client or {}).get("step", ck.step_of(tag)))
        if rank == 0:
            print(f"[finetune] resumed from {tag} at step {step} of {total}", flush=True)
    if rank == 0:  # a restart replays the steps after its checkpoint: log each step once
        ck.truncate_metrics(out, step)
    tracker = _open_tracker(cfg, config, out, step) if rank == 0 else None
    first_step, every = step, cfg.logging.every_steps

    fail_at = int(config.get("fail_at_step") or 0)
    nan_at = {int(x) for x in str(config.get("nan_at_steps") or "").split(",") if x.strip()}
    guard = NonFiniteGuard(cfg.runtime.max_nonfinite_steps)
    pad_id = int(config["pad_id"])
    device = engine.device
    save_every = cfg.output.save_every_steps
    t_start, tokens_done = time.perf_counter(), 0

    while step < total:
        epoch = bisect.bisect_right(starts, step) - 1
        micro = step_micro_batches(plans[epoch], step - starts[epoch], rank, world, o.grad_accum_steps)
        # Global number of loss tokens in this step: every token weighs the same. (On the engine's
        # device: an nccl group has no CPU backend.)
        counts = torch.tensor(
            [
                sum(response_token_count(examples, mb) for mb in micro),
                sum(int(lengths[i]) for mb in micro for i in mb),
            ],
            dtype=torch.float64,
            device=device,
        )
        dist.all_reduce(counts)
        loss_tokens, input_tokens = float(counts[0].item()), int(counts[1].item())
        norm = max(1.0, loss_tokens) / (world * o.grad_accum_steps)
        lr = scheduler.get_last_lr()[0]
        nll = torch.zeros((), dtype=torch.float64, device=device)
        for j, mb in enumerate(micro):
            batch = {key: v.to(device) for key, v in collate(examples, mb, packing, pad_id).items()}
            labels = batch.pop("labels")
            token_nll = micro_batch_nll(engine, batch, labels, head, cfg.loss.slice_tokens, cfg.loss.kernel)
            if step + 1 in nan_at and rank == world - 1 and j == 0:
                token_nll = token_nll * float("nan")  # test hook: a NaN loss on one rank
            engine.backward(token_nll / norm)
            nll += token_nll.detach().double()
            if j < len(micro) - 1:
                engine.step()  # before the accumulation boundary: bookkeeping only, no update
        # The step's global loss decides, identically on every rank, whether its update is applied.
        dist.all_reduce(nll)
        step += 1
        applied = _guarded_step(engine, guard, step, float(nll.item()), out, rank, cfg)
        tokens_done += input_tokens
        if fail_at and step == fail_at and rank == world - 1:
            os._exit(1)
        if rank == 0:
            elapsed = time.perf_counter() - t_start
            grad_norm = engine.get_global_grad_norm() if applied else None
            row = {
                "step": step,
                "epoch": epoch,
                "loss": float(nll.item()) / max(1.0, loss_tokens) if applied else None,
                "skipped_nonfinite": not applied,
                "lr": lr,
                "loss_tokens": int(loss_tokens),
                "input_tokens": input_tokens,
                "grad_norm": None if grad_norm is None or not math.isfinite(grad_norm) else float(grad_norm),
                "tokens_per_s": round(tokens_done / elapsed, 1) if elapsed > 0 else None,
                "elapsed_s": round(elapsed, 2),
            }
            with open(out / ck.METRICS, "a") as fh:
                fh.write(json.dumps(row) + "\n")
            tracker.log({f"train/{k}": row[k] for k in TRACKED}, step)
            if every and (step % every == 0 or step == total):
                print(progress_line(row, total, step - first_step), flush=True)
        if step == total or (save_every and step % save_every == 0):
            _save(
                engine, out, step, world, config["fingerprint"], cfg.output.keep_last, rank, cfg.lora.enabled
            )
            if remote is not None:
                _upload_checkpoint(remote, out, step, world, rank, cfg, config)
    if tracker is not None:
        tracker.close()
    _export(engine, cfg, config, out, rank)
    if remote is not None and rank == 0:
        from gen_ssd_ray.train.remote import push_model

        files, nbytes, seconds = push_model(remote, out, config.get("lease_id"))
        print(
            f"[finetune] uploaded the model to {remote.uri_of(ck.MODEL)}: {files} files, {nbytes} bytes "
            f"in {seconds:.2f} s",
            flush=True,
        )
    dist.barrier()


def _open_tracker(cfg: FinetuneConfig, config: dict[str, Any], out: Path, step: int):
    """Rank 0's trackers (gen_ssd_ray.common.tracking), in the folder the driver resolved; a resumed
    run's replayed steps replace the ones logged after its checkpoint."""
    from gen_ssd_ray.common.tracking import open_tracker

    where = config.get("remote") or str(out)
    return open_tracker(
        cfg.logging, "finetune", where, config=cfg, start_step=step + 1, root=config.get("tracking_dir")
    )


def progress_line(row: dict[str, Any], total: int, steps_run: int) -> str:
    """`[finetune] step 40/300 loss 1.234 lr 2.0e-05 tok/s 812 ETA 3m12s` for a metrics row; the ETA
    from the pace of the `steps_run` steps this run has done."""
    from gen_ssd_ray.common.tracking import format_duration

    eta = row["elapsed_s"] / steps_run * (total - row["step"]) if steps_run else None
    loss = f"{row['loss']:.3f}" if row["loss"] is not None else "skipped (not finite)"
    tps = f"{row['tokens_per_s']:.0f}" if row["tokens_per_s"] is not None else "?"
    return (
        f"[finetune] step {row['step']}/{total} loss {loss} lr {row['lr']:.1e} tok/s {tps} "
        f"ETA {format_duration(eta)}"
    )


def _upload_checkpoint(remote, out: Path, step: int, world: int, rank: int, cfg, config) -> None:
    """Upload the complete local checkpoint of `step` (every rank its own files; rank 0 the marker last,
    after every rank's upload; gen_ssd_ray.train.remote)."""
    import torch.distributed as dist

    from gen_ssd_ray.train import remote as rm

    tag, lease_id = ck.tag_for(step), config.get("lease_id")
    start = time.perf_counter()
    if rank == 0:  # an earlier save of this step (a resume from before it) is made incomplete first
        rm.clear_checkpoint(remote, tag)
    dist.barrier()
    files, nbytes = rm.push_checkpoint(remote, out, tag, rank, world, lease_id)
    dist.barrier()
    if rank == 0:
        rm.commit_checkpoint(remote, out, tag, world, config["fingerprint"], cfg.output.keep_last, lease_id)
        print(
            f"[finetune] uploaded {tag} to {remote.uri_of(ck.CHECKPOINTS)} (rank 0: {files} files, "
            f"{nbytes} bytes) in {time.perf_counter() - start:.2f} s",
            flush=True,
        )
    dist.barrier()


def _guarded_step(engine, guard: NonFiniteGuard, step: int, loss: float, out: Path, rank: int, cfg) -> bool:
    """Apply the step's update unless its global loss is not finite; True when applied.

    A non-finite step's gradients never reach the weights: under ZeRO 1-3 (and bf16) DeepSpeed finds the
    non-finite gradient norm and skips the update itself; a plain ZeRO-0 fp32 engine steps a torch
    optimizer, which skips every parameter whose gradient is None, so the gradients are dropped first
    (and the engine's clipping, which needs one, is skipped for that step).
    One step too many raises NonFiniteLossError (rank 0 first records it for the driver)."""
    try:
        ok = guard.observe(step, loss)
    except NonFiniteLossError:
        if rank == 0:
            write_report(out, guard, ck.latest_tag(out))
        raise
    if not ok:
        print(f"[finetune] step {step}: the loss is not finite; its update is skipped", flush=True)
        if not (engine.zero_optimization() or engine.bfloat16_enabled() or engine.fp16_enabled()):
            for p in engine.module.parameters():
                p.grad = None
            # (DeepSpeed's fp32 clipping indexes the first gradient: there is none to clip.)
            engine.clip_fp32_gradients = lambda: None
            try:
                engine.step()
            finally:
                del engine.clip_fp32_gradients
            return ok
    engine.step()
    return ok


def _weights_finite(engine) -> bool:
    """Whether every rank's weights (its ZeRO-3 partition, or the full module) are finite."""
    import torch
    import torch.distributed as dist

    ok = all(bool(torch.isfinite(getattr(p, "ds_tensor", p).data).all()) for p in engine.module.parameters())
    flag = torch.tensor([1.0 if ok else 0.0], device=engine.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item() == 1.0)


def _save(
    engine, out: Path, step: int, world: int, fingerprint: str, keep_last: int, rank: int, lora: bool
) -> None:
    import torch.distributed as dist

    check_weights_finite(_weights_finite(engine), step, "checkpoint")
    tag = ck.tag_for(step)
    if rank == 0:  # saving over an old folder of this step: it is incomplete until the new marker
        ck.clear_marker(out, tag)
    dist.barrier()
    client = {"step": step, "world_size": world, "fingerprint": fingerprint}
    from gen_ssd_ray.train.lora import adapters_only_saves

    # LoRA: the adapters and their optimizer state, no frozen base weight (a tied one included).
    with adapters_only_saves(engine) if lora else contextlib.nullcontext():
        engine.save_checkpoint(
            str(out / ck.CHECKPOINTS),
            tag=tag,
            client_state=client,
            save_latest=False,
            exclude_frozen_parameters=lora,
        )
    ck.sync_tree(out / ck.CHECKPOINTS / tag)  # this rank's files (and the others', cheaply) are durable
    dist.barrier()  # every rank's shards are on disk before the marker is written and `latest` moves
    if rank == 0:
        ck.write_marker(out, tag, world, fingerprint)
        ck.mark_latest(out, tag, keep_last)
    dist.barrier()


def _export(engine, cfg: FinetuneConfig, config: dict[str, Any], out: Path, rank: int) -> None:
    """Write the trained weights as a Hugging Face folder `out/model` (rank 0; gathers under ZeRO-3)."""
    import torch
    from transformers import AutoTokenizer

    check_weights_finite(_weights_finite(engine), -1, "model")
    lora = cfg.lora.enabled  # then only the adapters are gathered; the base comes from model.path
    if cfg.deepspeed.zero_stage == 3:  # collective: every rank calls it
        state = engine._zero3_consolidated_16bit_state_dict(exclude_frozen_parameters=lora)
    elif rank != 0:
        state = None
    elif lora:
        state = {n: p.detach() for n, p in engine.module.named_parameters() if p.requires_grad}
    else:
        state = engine.module.state_dict()
    if rank != 0:
        return
    dtype_name = config["save_dtype"]
    dtype = getattr(torch, dtype_name)
    dest = out / ck.MODEL
    tmp = out / f".tmp-{ck.MODEL}"
    shutil.rmtree(tmp, ignore_errors=True)
    model = engine.module
    if lora:
        from gen_ssd_ray.train.lora import ADAPTER_DIR, adapter_names, merged_model

        trained = set(adapter_names(engine.module))  # (ZeRO-3's gathered dict also holds any buffers)
        model = merged_model(
            config["model_path"],
            {k: v for k, v in state.items() if k in trained},
            cfg.lora,
            dtype,
            cfg.model.attn_implementation,
            cfg.model.trust_remote_code,
            adapter_dir=tmp / ADAPTER_DIR if cfg.lora.save_adapter else None,
        )
        state = model.state_dict()
    converted: dict[tuple, Any] = {}  # tied tensors (embeddings / LM head) stay one tensor
    state = {
        k: converted.setdefault((v.data_ptr(), tuple(v.shape)), v.detach().to("cpu", dtype))
        for k, v in state.items()
    }
    model.config.use_cache = True
    model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
    # save_pretrained records the in-memory module's dtype; the file holds `dtype`.
    cfg_path = tmp / "config.json"
    saved = json.loads(cfg_path.read_text())
    saved["dtype"] = dtype_name
    cfg_path.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
    tok = AutoTokenizer.from_pretrained(config["model_path"], trust_remote_code=cfg.model.trust_remote_code)
    tok.save_pretrained(tmp)
    gen_cfg = Path(config["model_path"]) / "generation_config.json"
    if gen_cfg.is_file() and not (tmp / "generation_config.json").exists():
        shutil.copyfile(gen_cfg, tmp / "generation_config.json")
    (tmp / ck.COMPLETE).write_text(json.dumps({"fingerprint": config["fingerprint"]}) + "\n")
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(tmp, dest)
    fsync_dir(out)
