"""The fine-tuning job as users run it: `python -m jobs.finetune ... key=value` on a tiny real model.

Real Ray Train workers (gloo), real DeepSpeed ZeRO-2 and ZeRO-3 at one and two workers. Each run is
killed mid-training (a worker exits abruptly), re-run with the same command, and must resume from the
last complete checkpoint, finish with a lower loss, and export a Hugging Face folder that transformers
loads and generates with. Bad input fails before anything starts (exit 2).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def write_pairs(path: Path, n: int = 24) -> Path:
    rows = []
    for i in range(n):
        a, b = 3 + i, 4 + i
        rows.append(
            {
                "question": f"Tom has {a} apples and buys {b} more. How many apples?",
                "response": f"Tom has {a} + {b} = {a + b} apples.\n#### {a + b}",
                "status": "completed",
                "correct": i % 4 != 0,
            }
        )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def finetune(
    args: list[str], env_extra: dict | None = None, timeout: int = 600
) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "RAY_AUTH_MODE": "disabled",
    }
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, "-m", "jobs.finetune", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def base_args(model: str, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        f"model.path={model}",
        f"data.path={data}",
        f"output.dir={out}",
        "optim.lr=3e-3",
        "optim.epochs=3",
        "optim.warmup_steps=1",
        "optim.max_seq_len=256",
        "optim.micro_batch_tokens=512",
        "output.save_every_steps=2",
        "runtime.local_num_cpus=2",
        *extra,
    ]


def _summary(proc) -> dict:
    """The job's closing JSON line (Ray may stream worker log lines after it)."""
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith('{"fingerprint"'):
            return json.loads(line)
    raise AssertionError(f"no summary line in the output: {proc.stdout[-2000:]}")


@pytest.mark.slow
@pytest.mark.parametrize(
    "stage, workers, offload",
    # ZeRO-2 on one worker also offloads the optimizer (DeepSpeed's CPU-Adam, its state in the checkpoint)
    [(2, 1, True), (3, 2, False), (3, 1, False), (2, 2, False)],
)
def test_train_crash_resume_export(tiny_model, tmp_path, stage, workers, offload):
    data = write_pairs(tmp_path / "pairs.jsonl")
    out = tmp_path / "ft"
    args = base_args(
        tiny_model,
        data,
        out,
        f"deepspeed.zero_stage={stage}",
        f"runtime.num_workers={workers}",
        f"deepspeed.offload_optimizer={str(offload).lower()}",
        "logging.backends=[tensorboard]",
        "logging.every_steps=2",
    )
    # 1. A worker dies at step 3: the job fails, naming the checkpoint it will resume from.
    crashed = finetune(args, {"GEN_SSD_TRAIN_FAIL_AT_STEP": "3"})
    assert crashed.returncode == 1, crashed.stdout[-3000:] + crashed.stderr[-3000:]
    assert "step-000002" in crashed.stderr and "re-run the same command" in crashed.stderr
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-000002"
    assert not (out / "model").exists() and not (out / "summary.json").exists()
    before = (out / "metrics.jsonl").read_text().splitlines()[:2]

    # 2. The same command resumes from step 2 and finishes.
    done = finetune(args)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    s = _summary(done)
    assert s["resumed_from_step"] == 2
    # the workers continued at step 3: the first two steps' log lines are the crashed run's own
    assert (out / "metrics.jsonl").read_text().splitlines()[:2] == before
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, s["steps"] + 1))  # each step logged once
    assert s["steps"] == 3 * s["steps_per_epoch"] and s["examples"] == 18  # 24 rows, 6 not correct
    assert s["rows_read"] == 24 and s["filters"][-1] == {"expr": "correct == True", "before": 24, "after": 18}
    assert s["final_loss"] < 0.8 * s["first_loss"], (s["first_loss"], s["final_loss"])
    assert s["zero_stage"] == stage and s["num_workers"] == workers and s["offload_optimizer"] == offload
    assert s["train/batch"]["nonpad_frac"] == 1.0
    assert (out / "loss.png").stat().st_size > 1000
    # Tracking (rank 0): one TensorBoard point per step and series, the crashed run's steps after its
    # checkpoint replaced by the resumed run's; and the progress line every logging.every_steps.
    from tests.test_tracking import tensorboard_scalars

    tb = tensorboard_scalars(out / "tracking" / "tensorboard" / "finetune-ft")
    for tag in ("train/loss", "train/lr", "train/tokens_per_s"):
        assert [step for step, _ in tb[tag]] == list(range(1, s["steps"] + 1)), (tag, tb[tag])
    assert [v for _, v in tb["train/loss"]] == pytest.approx([m["loss"] for m in metrics])
    assert [step for step, _ in tb["train/grad_norm"]] == [m["step"] for m in metrics if m["grad_norm"]]
    assert tb["train/grad_norm"] and all(v > 0 for _, v in tb["train/grad_norm"])
    logged = done.stdout + done.stderr
    assert f"[finetune] step 4/{s['steps']} loss " in logged and " ETA " in logged, logged[-3000:]

    # 3. The exported folder is a plain Hugging Face model that loads and generates, with new weights.
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = out / "model"
    tok = AutoTokenizer.from_pretrained(folder)
    assert tok.chat_template
    model = AutoModelForCausalLM.from_pretrained(folder)
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "Tom has 3 apples and buys 4 more. How many apples?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    gen = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert gen.shape[1] > ids["input_ids"].shape[1]
    new = load_file(str(folder / "model.safetensors"))
    old = load_file(str(Path(tiny_model) / "model.safetensors"))
    key = "model.layers.0.mlp.down_proj.weight"
    assert new[key].shape == old[key].shape and new[key].abs().sum() > 0  # ZeRO-3 gathered real weights
    assert not torch.equal(new[key], old[key])

    # 4. Re-running a complete run is a no-op.
    again = finetune(args)
    assert again.returncode == 0 and _summary(again)["skipped"] is True


@pytest.mark.integration
def test_bad_input_fails_before_training(tiny_model, tmp_path):
    data = write_pairs(tmp_path / "pairs.jsonl")
    out = tmp_path / "ft"

    empty = finetune(
        base_args(tiny_model, data, out, 'data.filters=["correct == True","status == \'pruned\'"]')
    )
    assert empty.returncode == 2
    assert "read 24 rows" in empty.stderr and "`status == 'pruned'` kept 0 of 18" in empty.stderr

    missing = finetune(base_args(str(tmp_path / "nope"), data, out))
    assert missing.returncode == 2 and "nope" in missing.stderr

    no_template = tmp_path / "no_template"
    import shutil

    shutil.copytree(tiny_model, no_template)
    cfg_path = no_template / "tokenizer_config.json"
    tok_cfg = json.loads(cfg_path.read_text())
    tok_cfg.pop("chat_template", None)
    cfg_path.write_text(json.dumps(tok_cfg))
    for f in no_template.glob("chat_template.*"):
        f.unlink()
    bad_model = finetune(base_args(str(no_template), data, out))
    assert bad_model.returncode == 2 and "no chat template" in bad_model.stderr

    bad_key = finetune(base_args(tiny_model, data, out, "deepspeed.offload_param=true"))
    assert bad_key.returncode == 2 and "deepspeed.offload_param" in bad_key.stderr

    (out).mkdir()
    (out / "_state.json").write_text(json.dumps({"fingerprint": "someone-else"}))
    other = finetune(base_args(tiny_model, data, out))
    assert other.returncode == 2 and "output.force=true" in other.stderr
    assert not (out / "checkpoints").exists()


@pytest.mark.integration
def test_nan_loss_fails_before_export_and_keeps_the_last_good_checkpoint(tiny_model, tmp_path):
    """ZeRO-0 fp32 (a plain torch optimizer: nothing in DeepSpeed skips a NaN step) with a NaN loss at
    step 3: the run fails (exit 1) before export, leaving step-000002; allowing one non-finite step,
    the same command resumes, skips step 3's update and exports finite weights."""
    import torch
    from safetensors.torch import load_file

    data = write_pairs(tmp_path / "pairs.jsonl")
    out = tmp_path / "ft"
    args = base_args(tiny_model, data, out, "deepspeed.zero_stage=0", "optim.epochs=2")
    nan = {"GEN_SSD_TRAIN_NAN_AT_STEPS": "3"}

    bad = finetune(args, nan)
    assert bad.returncode == 1, bad.stdout[-3000:] + bad.stderr[-3000:]
    line = next((x for x in bad.stderr.splitlines() if "training stopped" in x), "")  # the job's message
    assert "not finite" in line and "step-000002" in line and "runtime.max_nonfinite_steps=0" in line
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-000002"
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-000002"]
    assert not (out / "model").exists() and not (out / "summary.json").exists()

    done = finetune([*args, "runtime.max_nonfinite_steps=1"], nan)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    s = _summary(done)
    assert s["resumed_from_step"] == 2 and s["nonfinite_steps_skipped"] == [3]
    assert s["final_loss"] is not None and math.isfinite(s["final_loss"])
    weights = load_file(str(out / "model" / "model.safetensors"))
    assert all(bool(torch.isfinite(w).all()) for w in weights.values())


def test_nonfinite_guard_counts_and_fails_past_the_limit(tmp_path):
    from gen_ssd_ray.train.nonfinite import (
        NonFiniteGuard,
        NonFiniteLossError,
        NonFiniteWeightsError,
        check_weights_finite,
        failure_message,
        write_report,
    )

    guard = NonFiniteGuard(limit=2)
    assert guard.observe(1, 3.5) is True
    for step, loss in ((2, math.nan), (3, math.inf)):
        assert guard.observe(step, loss) is False  # skipped, within the limit
    assert guard.observe(4, 1.0) is True
    with pytest.raises(NonFiniteLossError, match=r"\[2, 3, 5\].*max_nonfinite_steps=2"):
        guard.observe(5, -math.inf)
    write_report(tmp_path, guard, "step-000004")
    from gen_ssd_ray.train.checkpoint import read_json

    msg = failure_message(tmp_path, read_json(tmp_path / "_nonfinite.json"))
    assert "\n" not in msg and "step-000004" in msg and "runtime.max_nonfinite_steps" in msg
    assert failure_message(tmp_path, None) is None
    with pytest.raises(NonFiniteLossError):
        NonFiniteGuard(limit=0).observe(1, math.nan)
    check_weights_finite(True, 3, "checkpoint")
    with pytest.raises(NonFiniteWeightsError, match="checkpoint was not written"):
        check_weights_finite(False, 3, "checkpoint")


@pytest.mark.parametrize("weights", ["pytorch_model.bin", "model.pt", None])
def test_model_without_safetensors_is_refused(tiny_model, tmp_path, weights):
    """Model weights are never unpickled: a folder with only pickle weights (or none) fails before
    anything starts (exit 2), naming the key and the conversion."""
    import shutil

    from gen_ssd_ray.train.run import ModelIncompatibleError, check_model

    folder = tmp_path / "pickled"
    shutil.copytree(tiny_model, folder)
    for f in folder.glob("*.safetensors"):
        f.unlink()
    if weights:
        (folder / weights).write_bytes(b"not loaded")
    with pytest.raises(ModelIncompatibleError, match=r"model.path=.*safetensors.*safe_serialization=True"):
        check_model(str(folder), trust_remote_code=False)
    check_model(tiny_model, trust_remote_code=False)


@pytest.mark.parametrize("stray", ["step-000010.bak", "old-run", "step-10"])
def test_stray_checkpoint_folder_exits_2_before_anything_starts(tiny_model, tmp_path, capsys, stray):
    """A name under checkpoints/ that is not a checkpoint (it crashed `step_of` before) is one line
    naming it and the fix, exit 2, before Ray starts; nothing is deleted."""
    from jobs.finetune import main

    data = write_pairs(tmp_path / "pairs.jsonl")
    out = tmp_path / "ft"
    (out / "checkpoints" / stray).mkdir(parents=True)
    (out / "checkpoints" / stray / "mp_rank_00_model_states.pt").write_bytes(b"x")
    assert main(base_args(tiny_model, data, out)) == 2
    err = capsys.readouterr().err
    line = next(x for x in err.splitlines() if stray in x)
    assert "not a checkpoint folder" in line and "move it out" in line and "Traceback" not in err
    assert (out / "checkpoints" / stray / "mp_rank_00_model_states.pt").exists()


def test_config_is_frozen_and_derivable():
    import dataclasses

    from gen_ssd_ray.common.config import ConfigError, derive, load_config
    from gen_ssd_ray.train.config import FinetuneConfig, train_fingerprint

    cfg = load_config(None, ["runtime.num_workers=2"], FinetuneConfig)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.optim.lr = 1.0  # type: ignore[misc]
    stage = derive(cfg, {"model.path": "/m", "data.filters": []})
    assert stage.model.path == "/m" and stage.data.filters == [] and cfg.model.path == "embedded:student"
    fp = train_fingerprint(cfg, "rev", "sig")
    # placement and resources do not change the fingerprint; the world size and the data do
    moved = derive(
        cfg, {"output.dir": "elsewhere", "runtime.cpus_per_worker": 4.0, "runtime.ray_address": "auto"}
    )
    assert train_fingerprint(moved, "rev", "sig") == fp
    assert train_fingerprint(derive(cfg, {"runtime.num_workers": 1}), "rev", "sig") != fp
    assert train_fingerprint(stage, "rev", "sig") != fp
    assert train_fingerprint(cfg, "rev", "other") != fp
    with pytest.raises(ConfigError, match="runtime.local_num_cpus"):
        load_config(None, ["runtime.local_num_cpus=0"], FinetuneConfig)


def test_input_errors_share_the_failure_model():
    from gen_ssd_ray.common.errors import InputError
    from gen_ssd_ray.train.data import EmptyTrainingSetError, TrainDataError
    from gen_ssd_ray.train.run import ModelIncompatibleError, TrainOutputExistsError

    for cls in (TrainDataError, EmptyTrainingSetError, ModelIncompatibleError, TrainOutputExistsError):
        assert issubclass(cls, InputError)


def test_bad_key_exits_2_before_anything_starts(capsys):
    from jobs.finetune import main

    assert main(["optim.nope=1"]) == 2
    err = capsys.readouterr().err
    assert "optim.nope" in err and "conf/finetune.yaml" in err
    assert main(["deepspeed.offload_param=true"]) == 2
    assert "deepspeed.offload_param" in capsys.readouterr().err


def test_unsafe_filter_exits_2_at_config_load(tmp_path, capsys):
    """A filter outside the safe language is refused when the config loads, before anything runs."""
    from jobs.finetune import main

    target = tmp_path / "pwned"
    attack = f"@Path({str(target)!r}).write_text('x') > 0"
    assert main([f'data.filters=["{attack}"]', f"output.dir={tmp_path / 'ft'}"]) == 2
    err = capsys.readouterr().err
    assert "data.filters[0]" in err and "not allowed" in err
    assert not target.exists() and not (tmp_path / "ft").exists()
