"""LoRA fine-tuning (gen_ssd_ray.train.lora, the `lora.*` keys).

Fast tier: bad keys fail at config load naming the key; targets that match no layer fail in `prepare`
(exit 2, nothing written); the fingerprint changes with the adapter shape only when LoRA is on; a checkpoint's
module state holds no frozen weight (DeepSpeed's own method, a tied LM head); the worker's export of a peft
model (`_export` itself, on one gloo rank, no DeepSpeed) writes a merged plain transformers folder whose
logits are the adapted model's, with no peft leftovers, plus the adapter alone when asked.

Integration tier: vLLM loads the merged export; the worker's own load / wrap / save / resume / export
calls on one gloo rank (no Ray) under ZeRO-2 and ZeRO-3 (gradient checkpointing, the sliced loss over
the frozen tied LM head) save adapter-only checkpoints, resume exactly, and ZeRO-3 trains and exports
what ZeRO-2 does; a ZeRO-2 LoRA fine-tune through the real job (`python -m jobs.finetune`, Ray Train),
killed at step 3 and resumed from its adapter-only checkpoint, exports a merged folder that transformers
loads.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gen_ssd_ray.common.config import ConfigError, derive, load_config
from gen_ssd_ray.train.config import FinetuneConfig, train_fingerprint


@pytest.mark.parametrize(
    "override, key",
    [
        ("lora.r=0", "lora.r"),
        ("lora.alpha=0", "lora.alpha"),
        ("lora.dropout=1.0", "lora.dropout"),
        ("lora.target_modules=[]", "lora.target_modules"),
        ("lora.target_modules=[all-linear,q_proj]", "lora.target_modules"),
        ("lora.target_modules=['q proj;']", "lora.target_modules"),
        ("loss.slice_tokens=-1", "loss.slice_tokens"),
        ("loss.kernel=triton", "loss.kernel"),
        ("loss.kernel=liger", "loss.kernel"),  # CPU workers
    ],
)
def test_bad_lora_and_loss_keys_fail_at_load_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, ["lora.enabled=true", override], FinetuneConfig)


def test_liger_is_refused_under_zero3():
    over = ["loss.kernel=liger", "runtime.gpus_per_worker=1", "deepspeed.zero_stage=3"]
    with pytest.raises(ConfigError, match="ZeRO-3"):
        load_config(None, over, FinetuneConfig)
    cfg = load_config(None, [*over[:2], "deepspeed.zero_stage=2"], FinetuneConfig)
    assert cfg.loss.kernel == "liger"


def test_fingerprint_follows_the_adapter_shape_only_when_lora_is_on():
    cfg = load_config(None, [], FinetuneConfig)
    fp = train_fingerprint(cfg, "rev", "sig")
    # the loss implementation and LoRA keys of a disabled section change nothing
    same = derive(cfg, {"loss.slice_tokens": 0, "lora.r": 4})
    assert train_fingerprint(same, "rev", "sig") == fp
    on = derive(cfg, {"lora.enabled": True})
    fp_on = train_fingerprint(on, "rev", "sig")
    assert fp_on != fp
    assert train_fingerprint(derive(on, {"lora.r": 4}), "rev", "sig") != fp_on
    assert (
        train_fingerprint(derive(on, {"lora.save_adapter": True, "loss.slice_tokens": 64}), "rev", "sig")
        == fp_on
    )


def test_targets_that_match_no_layer_are_refused_listing_the_layers():
    pytest.importorskip("peft")
    from transformers import LlamaConfig

    from gen_ssd_ray.train.lora import check_targets

    mconfig = LlamaConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
    )
    ok = load_config(None, ["lora.enabled=true", "lora.target_modules=[q_proj,v_proj]"], FinetuneConfig)
    check_targets(mconfig, ok.lora, False)
    check_targets(mconfig, load_config(None, ["lora.enabled=true"], FinetuneConfig).lora, False)
    bad = load_config(None, ["lora.enabled=true", "lora.target_modules=[qkv_proj]"], FinetuneConfig)
    with pytest.raises(ConfigError, match=r"lora\.target_modules.*q_proj"):
        check_targets(mconfig, bad.lora, False)


def test_job_exits_2_on_unmatched_targets_before_anything_starts(tiny_model, tmp_path, capsys):
    pytest.importorskip("peft")
    from jobs.finetune import main

    out = tmp_path / "ft"
    args = [
        f"model.path={tiny_model}",
        f"output.dir={out}",
        "lora.enabled=true",
        "lora.target_modules=[wqkv]",
    ]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "lora.target_modules" in err and "q_proj" in err and "Traceback" not in err
    assert not out.exists()


@pytest.fixture
def gloo_rank(tmp_path):
    """A one-process gloo group (what `_export` all-reduces over)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


class FakeEngine:
    """The part of a ZeRO-2 DeepSpeed engine `_export` uses: the module, on the CPU."""

    def __init__(self, module):
        import torch

        self.module, self.device = module, torch.device("cpu")


def export_lora(tiny_model: str, out: Path, save_adapter: bool, save_dtype: str = "float32"):
    """Wrap the tiny model in adapters with non-zero (as if trained) weights and export it through the
    worker's `_export`; returns (logits of the adapted model on `ids`, ids, the untrained base's)."""
    import torch
    from transformers import AutoModelForCausalLM

    from gen_ssd_ray.train import worker
    from gen_ssd_ray.train.lora import wrap

    cfg = load_config(
        None,
        [
            "lora.enabled=true",
            "lora.r=4",
            "lora.dropout=0.0",
            f"lora.save_adapter={str(save_adapter).lower()}",
            "deepspeed.zero_stage=2",
        ],
        FinetuneConfig,
    )
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    ids = torch.randint(0, 1000, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        untrained = base(input_ids=ids).logits
    peft_model = wrap(base, cfg.lora, gradient_checkpointing=False)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    torch.manual_seed(0)
    with torch.no_grad():  # "trained" adapters: B is zero at init, which would merge to the base model
        for p in peft_model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    peft_model.eval()
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
    out.mkdir()
    config = {"model_path": tiny_model, "save_dtype": save_dtype, "fingerprint": "fp"}
    worker._export(FakeEngine(peft_model), cfg, config, out, rank=0)
    return expected, ids, untrained


@pytest.mark.parametrize("save_adapter", [False, True])
def test_export_of_a_lora_run_is_a_merged_plain_model(tiny_model, tmp_path, gloo_rank, save_adapter):
    pytest.importorskip("peft")
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    expected, ids, untrained = export_lora(tiny_model, out, save_adapter)

    folder = out / "model"
    assert (folder / ".complete").is_file() and not (out / ".tmp-model").exists()
    assert not (folder / "adapter_config.json").exists()  # transformers must not take it for an adapter
    weights = load_file(str(folder / "model.safetensors"))
    assert not [k for k in weights if "lora" in k or "base_layer" in k or k.startswith("base_model")]
    assert weights.keys() == load_file(str(Path(tiny_model) / "model.safetensors")).keys()
    assert "peft" not in (folder / "config.json").read_text()
    assert json.loads((folder / "config.json").read_text())["dtype"] == "float32"
    merged = AutoModelForCausalLM.from_pretrained(folder)
    assert type(merged).__name__ == "LlamaForCausalLM"
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(untrained, expected, atol=1e-3)  # the merge is not the base model
    assert (folder / "adapter").is_dir() == save_adapter
    if save_adapter:
        from peft import PeftModel

        base_again = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
        again = PeftModel.from_pretrained(base_again, folder / "adapter")
        with torch.no_grad():
            torch.testing.assert_close(again(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)


def test_checkpoint_module_state_holds_no_frozen_weight_not_even_a_tied_head():
    """`adapters_only_saves` around DeepSpeed's own `module_state_dict` (what `save_checkpoint` stores as
    the module): only the adapters remain, though the tied LM head is missing from `named_parameters()`."""
    pytest.importorskip("peft")
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.engine import DeepSpeedEngine
    from transformers import LlamaConfig, LlamaForCausalLM

    from gen_ssd_ray.train.lora import adapter_names, adapters_only_saves, frozen_names, wrap

    class Engine:  # the two attributes DeepSpeed's method reads, and the method itself
        module_state_dict = DeepSpeedEngine.module_state_dict

        def __init__(self, module):
            self.module = module

        def random_ltd_enabled(self):
            return False

    mconfig = LlamaConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        tie_word_embeddings=True,
    )
    lora = load_config(None, ["lora.enabled=true", "lora.r=2"], FinetuneConfig).lora
    model = wrap(LlamaForCausalLM(mconfig), lora, gradient_checkpointing=False)
    head = "base_model.model.lm_head.weight"
    assert head in frozen_names(model) and head not in dict(model.named_parameters())  # tied: listed once
    engine = Engine(model)
    with adapters_only_saves(engine):
        saved = engine.module_state_dict(exclude_frozen_parameters=True)
    assert saved and set(saved) == set(adapter_names(model))
    assert head in engine.module_state_dict()  # the engine's own method again after the block


# ---- integration: vLLM and the real job ----------------------------------------------------------------


@pytest.mark.integration
def test_merged_export_loads_in_vllm(tiny_model, tmp_path, gloo_rank):
    """The merged bf16 export (with adapter/ beside it) is a model folder vLLM loads and generates with."""
    pytest.importorskip("peft")
    pytest.importorskip("vllm")
    import os

    import torch.distributed as dist

    out = tmp_path / "run"
    export_lora(tiny_model, out, save_adapter=True, save_dtype="bfloat16")
    dist.destroy_process_group()  # vLLM sets up its own
    os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(out / "model"), dtype="bfloat16", max_model_len=256, enforce_eager=True)
    result = llm.generate(["Tom has 3 apples."], SamplingParams(max_tokens=4, temperature=0.0))
    assert len(result[0].outputs[0].token_ids) == 4


@pytest.mark.integration
@pytest.mark.parametrize("stage", [2])
def test_lora_finetune_crash_resume_export(tiny_model, tmp_path, stage):
    """A LoRA run through `python -m jobs.finetune` (one worker), killed at step 3 and resumed from its
    adapter-only checkpoint (smaller than the base model's weights: no frozen weight, not even the LM head
    tied to the embeddings), exports a merged folder that transformers loads, with no peft leftovers.
    (ZeRO-3's checkpoint and resume: test_lora_engines_resume_and_zero3_match_zero2.)"""
    pytest.importorskip("peft")
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from tests.test_finetune import _summary, base_args, finetune, write_pairs

    data = write_pairs(tmp_path / "pairs.jsonl")
    out = tmp_path / "ft"
    args = base_args(
        tiny_model,
        data,
        out,
        f"deepspeed.zero_stage={stage}",
        "lora.enabled=true",
        "lora.r=8",
        "lora.save_adapter=true",
        "loss.slice_tokens=64",
        "optim.lr=1e-2",
    )
    crashed = finetune(args, {"GEN_SSD_TRAIN_FAIL_AT_STEP": "3"})
    assert crashed.returncode == 1, crashed.stdout[-3000:] + crashed.stderr[-3000:]
    ckpt = out / "checkpoints" / "step-000002"
    ckpt_bytes = sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file())
    base_bytes = (Path(tiny_model) / "model.safetensors").stat().st_size
    # adapters and their optimizer state only (the tied LM head alone would be twice the bf16 base)
    assert ckpt_bytes < base_bytes / 10, (ckpt_bytes, base_bytes)
    before = (out / "metrics.jsonl").read_text().splitlines()[:2]

    done = finetune(args)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    s = _summary(done)
    assert s["resumed_from_step"] == 2 and s["lora"]["r"] == 8 and s["loss_slice_tokens"] == 64
    assert (out / "metrics.jsonl").read_text().splitlines()[:2] == before  # continued at step 3
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, s["steps"] + 1))
    assert s["final_loss"] < s["first_loss"], (s["first_loss"], s["final_loss"])

    folder = out / "model"
    new = load_file(str(folder / "model.safetensors"))
    old = load_file(str(Path(tiny_model) / "model.safetensors"))
    assert new.keys() == old.keys()  # the base model's names: no lora_A/B, no base_layer
    key = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(new[key].float(), old[key].float())  # the adapters were merged in
    assert (
        not (folder / "adapter_config.json").exists()
        and (folder / "adapter" / "adapter_config.json").is_file()
    )
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model(input_ids=torch.tensor([[1, 2, 3]])).logits.isfinite().all()


def test_lora_with_zero3_is_accepted():
    """ZeRO-3 + LoRA trains (test_lora_engines_resume_and_zero3_match_zero2): the config accepts it."""
    for stage in (2, 3):
        cfg = load_config(None, ["lora.enabled=true", f"deepspeed.zero_stage={stage}"], FinetuneConfig)
        assert cfg.lora.enabled and cfg.deepspeed.zero_stage == stage


def _engine_losses(
    model_path: str, out: Path, stage: int, steps: range, save: bool, export: bool = False
) -> list[float]:
    """The worker's own pieces on one gloo rank without Ray: load, wrap, `deepspeed.initialize`, resume
    from `out`'s newest checkpoint if any (as the worker does), run `steps` on fixed batches (the sliced
    loss, 3 slices each), save with the worker's `_save` after the last step if `save`, export with its
    `_export` (to `out/model`) if `export`. Returns the losses."""
    import deepspeed
    import torch

    from gen_ssd_ray.train import checkpoint as ck
    from gen_ssd_ray.train import worker
    from gen_ssd_ray.train.loss import micro_batch_nll

    cfg = load_config(
        None,
        [
            f"model.path={model_path}",
            f"deepspeed.zero_stage={stage}",
            "model.gradient_checkpointing=true",
            "lora.enabled=true",
            "lora.r=4",
            "lora.dropout=0.0",
            "loss.slice_tokens=12",
            "optim.lr=1e-2",
        ],
        FinetuneConfig,
    )
    ds_config = worker.deepspeed_config(cfg)
    model = worker._load_model(cfg, model_path, ds_config)
    from gen_ssd_ray.train.lora import wrap

    torch.manual_seed(0)  # the adapters' initial weights (random A), the same in every run
    model = wrap(model, cfg.lora, cfg.model.gradient_checkpointing)
    head = worker._loss_head(cfg, model, 0)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=worker._optimizer(cfg, [p for p in model.parameters() if p.requires_grad]),
        lr_scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0 / (1 + s)),
        config=ds_config,
    )
    tag = ck.latest_tag(out)
    if tag is not None:
        path, _ = engine.load_checkpoint(str(out / ck.CHECKPOINTS), tag=tag, load_module_strict=False)
        assert path is not None
    losses = []
    for step in steps:
        ids = torch.randint(0, 1000, (1, 40), generator=torch.Generator().manual_seed(step % 2))
        labels = ids.clone()
        labels[:, :8] = -100
        nll = micro_batch_nll(engine, {"input_ids": ids}, labels, head, cfg.loss.slice_tokens, "torch")
        engine.backward(nll / 31)
        engine.step()
        losses.append(float(nll.detach()) / 31)
    if save:
        worker._save(engine, out, steps[-1] + 1, 1, "fp", keep_last=2, rank=0, lora=True)
    if export:
        config = {"model_path": model_path, "save_dtype": "float32", "fingerprint": "fp"}
        worker._export(engine, cfg, config, out, rank=0)
    return losses


def engine_runs(model_path: str, root: str) -> dict:
    """For test_lora_engines_resume_and_zero3_match_zero2, in a fresh interpreter: per ZeRO stage, 4
    steps uninterrupted, and 2 steps, a checkpoint, then 2 more from it in a new engine; the checkpoint's
    size."""
    import torch.distributed as dist

    root_path = Path(root)
    dist.init_process_group("gloo", init_method=f"file://{root_path / 'store'}", rank=0, world_size=1)
    result = {}
    for stage in (2, 3):
        ref = _engine_losses(model_path, root_path / f"z{stage}-ref", stage, range(4), save=False)
        out = root_path / f"z{stage}"
        first = _engine_losses(model_path, out, stage, range(2), save=True)
        ckpt = out / "checkpoints" / "step-000002"
        size = sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file())
        resumed = _engine_losses(model_path, out, stage, range(2, 4), save=False, export=True)
        result[stage] = {"ref": ref, "resumed": first + resumed, "ckpt_bytes": size}
    dist.destroy_process_group()
    return result


@pytest.mark.integration
def test_lora_engines_resume_and_zero3_match_zero2(tiny_model, tmp_path):
    """LoRA under DeepSpeed ZeRO-2 and ZeRO-3 (gradient checkpointing, the sliced loss over a frozen tied
    LM head, which ZeRO-3 partitions): the checkpoint holds no base weight (well under the base model's
    size), a resume from it continues exactly where the uninterrupted run is, and ZeRO-3 trains and exports
    the same adapters as ZeRO-2. The worker's own load, wrap, save, resume and export calls, on one gloo
    rank (no Ray), in a fresh interpreter (DeepSpeed keeps global state)."""
    pytest.importorskip("peft")
    import os
    import subprocess
    import sys

    code = (
        "import json, sys; from tests.test_lora import engine_runs as r; print(json.dumps(r(*sys.argv[1:])))"
    )
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}  # what deepspeed checks
    proc = subprocess.run(
        [sys.executable, "-c", code, tiny_model, str(tmp_path)],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    runs = json.loads(proc.stdout.strip().splitlines()[-1])
    base_bytes = (Path(tiny_model) / "model.safetensors").stat().st_size
    for stage, run in runs.items():
        assert run["ckpt_bytes"] < base_bytes / 10, (stage, run["ckpt_bytes"], base_bytes)
        assert run["resumed"] == pytest.approx(run["ref"], rel=1e-5), stage  # the resume continues exactly
        assert run["ref"][2] < run["ref"][0] and run["ref"][3] < run["ref"][1], run["ref"]  # it trains
    assert runs["3"]["ref"] == pytest.approx(runs["2"]["ref"], rel=1e-3)  # ZeRO-3 trains what ZeRO-2 does

    # Both exports (ZeRO-3's adapters gathered from their partitions) are the same merged plain model.
    import torch
    from safetensors.torch import load_file

    z2, z3 = (load_file(str(tmp_path / f"z{stage}" / "model" / "model.safetensors")) for stage in (2, 3))
    base = load_file(str(Path(tiny_model) / "model.safetensors"))
    assert z2.keys() == z3.keys() == base.keys()
    key = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(z3[key], base[key].float())  # the adapters were merged in
    for name in z2:
        torch.testing.assert_close(z3[name], z2[name], rtol=1e-3, atol=1e-4)
