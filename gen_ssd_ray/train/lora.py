"""LoRA fine-tuning (`lora.enabled=true`) with peft: wrap the student, check the targets, export merged.

- `check_targets(model_config, lora, trust_remote_code)` (the driver, before anything starts): builds
  the model on the meta device (no weights, no memory) and wraps it, so that target names that match no
  layer are refused naming `lora.target_modules` and listing the model's linear layers.
- `wrap(model, lora, gradient_checkpointing)` (every worker, before `deepspeed.initialize`, which under
  ZeRO-3 then partitions the new adapter weights like the rest): freezes the base weights and adds the
  adapters; only the adapters are trainable, so only they reach the optimizer and the checkpoints.
- `adapters_only_saves(engine)` (every worker, around `save_checkpoint`, with
  `exclude_frozen_parameters`): a checkpoint holds the adapters, their optimizer state, the scheduler and
  the data position, never a frozen base weight, not even one tied to another (DeepSpeed's own exclusion
  keeps a tied LM head); a resume loads it non-strictly over the base loaded from `model.path`.
- `merged_model(model_path, adapters, lora, dtype, ...)` (rank 0, at export): the base model loaded
  afresh on the CPU in the export dtype, the trained adapter weights loaded into it, optionally saved
  alone (peft format), then merged with peft's `merge_and_unload`: a plain transformers model with no
  peft module, key or config left, which the worker saves exactly like a full fine-tune's export, so
  vLLM and the evaluation job load it unchanged.

Knows nothing about Ray or the job's folders, and of DeepSpeed only the engine's `module_state_dict`
(what `save_checkpoint` saves as the module); imports torch, transformers and peft lazily.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from gen_ssd_ray.common.config import ConfigError
from gen_ssd_ray.train.config import LoraConfig

log = logging.getLogger("gen_ssd_ray.train")

# Where the adapter alone is written inside the exported model folder (lora.save_adapter).
ADAPTER_DIR = "adapter"


def peft_config(lora: LoraConfig):
    """The peft LoraConfig of `lora` (causal LM, no bias training)."""
    from peft import LoraConfig as PeftLoraConfig

    targets = list(lora.target_modules)
    return PeftLoraConfig(
        task_type="CAUSAL_LM",
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules="all-linear" if targets == ["all-linear"] else targets,
        bias="none",
    )


def require_peft() -> None:
    """Raise ConfigError (exit 2) naming lora.enabled when peft is not installed."""
    try:
        import peft  # noqa: F401
    except ImportError:
        raise ConfigError(
            "lora.enabled: needs the peft package (a dependency of gen-ssd-ray: reinstall the project, or "
            "pip install peft), or set lora.enabled=false"
        ) from None


def check_targets(model_config: Any, lora: LoraConfig, trust_remote_code: bool) -> None:
    """Raise ConfigError unless `lora.target_modules` match layers of the model (built on the meta device)."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config, trust_remote_code=trust_remote_code)
    try:
        get_peft_model(model, peft_config(lora))
    except ValueError as e:
        linear = sorted(
            {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        )
        raise ConfigError(
            f"lora.target_modules: {list(lora.target_modules)} match no layer of this model ({e}); its "
            f"linear layers are {linear}: pick some, or use [all-linear]"
        ) from None


def wrap(model: Any, lora: LoraConfig, gradient_checkpointing: bool) -> Any:
    """The peft model of `model` with `lora`'s adapters (the base frozen); logs the trainable share."""
    from peft import get_peft_model

    if gradient_checkpointing:
        # With the embeddings frozen, checkpointed layers would see inputs that need no gradient.
        model.enable_input_require_grads()
    peft_model = get_peft_model(model, peft_config(lora))
    trainable, total = peft_model.get_nb_trainable_parameters()
    log.info(
        "LoRA: %d of %d parameters trainable (%.3f%%)", trainable, total, 100 * trainable / max(1, total)
    )
    return peft_model


def adapter_names(peft_model: Any) -> list[str]:
    """The trainable (adapter) parameter names of a peft model, as its state_dict names them."""
    return [n for n, p in peft_model.named_parameters() if p.requires_grad]


def frozen_names(model: Any) -> set[str]:
    """Every state-dict name of a frozen parameter of `model`, a weight tied to another under each of its
    names (`named_parameters()` lists a tied weight once: the LM head tied to the embeddings is only
    `...embed_tokens.weight` there)."""
    return {n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}


@contextmanager
def adapters_only_saves(engine: Any) -> Iterator[None]:
    """While it is open, `engine.save_checkpoint` writes no frozen weight into the module state.

    DeepSpeed's `exclude_frozen_parameters=True` (which the caller passes too) removes the frozen weights
    by their `named_parameters()` names, so a frozen weight tied to another one stays in the checkpoint
    (the tied LM head: vocabulary x hidden fp32, as large as the embeddings). Here the engine's
    `module_state_dict`, which `save_checkpoint` calls, drops every name of `frozen_names` for the length
    of the block; the adapters, the optimizer state, the scheduler and the client state are saved as
    before, and a resume takes the base weights from `model.path`."""
    full = engine.module_state_dict
    frozen = frozen_names(engine.module)

    def adapters(*args: Any, **kwargs: Any):
        state = full(*args, **kwargs)
        for name in frozen.intersection(state):
            del state[name]
        return state

    engine.module_state_dict = adapters
    try:
        yield
    finally:
        del engine.module_state_dict  # the class's method again


def merged_model(
    model_path: str,
    adapters: dict[str, Any],
    lora: LoraConfig,
    dtype: Any,
    attn_implementation: str,
    trust_remote_code: bool,
    adapter_dir: Path | None = None,
) -> Any:
    """The base model at `model_path` with the trained `adapters` (peft state-dict names -> tensors)
    merged in, as a plain transformers model in `dtype` on the CPU. With `adapter_dir`, the adapter alone
    is saved there first (peft format). Raises RuntimeError if `adapters` does not cover every adapter
    weight of a freshly wrapped model (a mismatch between training and export)."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(
        model_path,
        dtype=dtype,
        attn_implementation=attn_implementation,
        trust_remote_code=trust_remote_code,
        use_safetensors=True,
    )
    peft_model = get_peft_model(base, peft_config(lora))
    expected = set(adapter_names(peft_model))
    missing, extra = expected - set(adapters), set(adapters) - expected
    if missing or extra:
        raise RuntimeError(
            f"the trained adapters do not fit the model: missing {sorted(missing)[:3]}, unexpected "
            f"{sorted(extra)[:3]}"
        )
    peft_model.load_state_dict({k: v.to(dtype) for k, v in adapters.items()}, strict=False)
    if adapter_dir is not None:
        peft_model.save_pretrained(adapter_dir, safe_serialization=True)
    return peft_model.merge_and_unload()
