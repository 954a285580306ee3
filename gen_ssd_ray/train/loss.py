"""The fine-tuning loss of one micro-batch: the sum of next-token NLLs over the response tokens, in fp32.

Three ways to compute the same number (the worker divides it by the global response-token count):

- `summed_nll(logits, labels)` (`loss.slice_tokens=0`): from the model's full logits, upcast to fp32 for
  the whole micro-batch. Memory: micro-batch tokens x vocabulary x 4 bytes (a 16k-token micro-batch of a
  150k-vocabulary model: about 10 GB), plus as much again for their gradient.
- `sliced_summed_nll(hidden, labels, head, slice_tokens)` (the default): from the final hidden states. Only
  the positions that carry loss go through the LM head, `slice_tokens` of them at a time, each slice's
  logits upcast, scored and dropped; every slice runs under `torch.utils.checkpoint`, so the backward pass
  recomputes one slice's logits at a time too. Peak memory: one slice's logits, whatever the vocabulary
  and micro-batch size. Values and gradients equal the full path's (to fp rounding).
- `liger_summed_nll(...)` (`loss.kernel=liger`): Liger-Kernel's fused linear cross-entropy (Triton, GPU
  only, chunked by its own rule). Needs the LM head's full weight outside its module's forward, so not
  under ZeRO-3 (refused by the config). Untested here: no GPU on the development machines.

`micro_batch_nll` runs the engine and picks the path. The hidden states come from the engine's own
forward (so DeepSpeed's backward hooks on the outputs fire): `output_hidden_states=True` and
`logits_to_keep=1`, which leaves the model computing a single position's logits; `OutputHead` checks once,
on that position, that its LM head reproduces the model's own logits (a model whose logits are more than
`lm_head` plus `final_logit_softcapping` is refused, naming `loss.slice_tokens=0`).

Under ZeRO-3 each slice calls the LM head module, so DeepSpeed gathers its weight through its usual
module hooks, in the forward pass and in the backward recomputation (its parameter trace keeps a weight
that is reused soon; the extra call of the first step's check re-records that trace once). The
recomputation's shape check is off for a partitioned head (`sliced_summed_nll` says why: a frozen LM
head, as with LoRA, would fail it). Not measured on GPUs here.

Knows nothing about data, DeepSpeed's configuration or checkpoints.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

from gen_ssd_ray.train.data import IGNORE_INDEX

log = logging.getLogger("gen_ssd_ray.train")


def summed_nll(logits, labels):
    """Sum of the next-token NLLs over the positions whose label is not IGNORE_INDEX (float32 math).

    Computed here rather than by the model's own loss, so that the normalisation does not depend on
    a model honouring transformers' `num_items_in_batch`."""
    import torch.nn.functional as F

    shift_logits = logits[..., :-1, :].float().reshape(-1, logits.shape[-1])
    shift_labels = labels[..., 1:].reshape(-1)
    return F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX, reduction="sum")


def scored_positions(hidden, labels):
    """(h, y): the hidden states (N, hidden) that predict a label and those labels (N,), IGNORE_INDEX
    positions dropped (the prompt and padding never reach the LM head)."""
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    y = labels[:, 1:].reshape(-1)
    keep = (y != IGNORE_INDEX).nonzero().squeeze(1)
    return h.index_select(0, keep), y.index_select(0, keep)


def _slice_nll(head, h, y):
    import torch.nn.functional as F

    return F.cross_entropy(head(h).float(), y, reduction="sum")


def sliced_summed_nll(hidden, labels, head, slice_tokens: int):
    """`summed_nll(head(hidden), labels)`, with at most `slice_tokens` positions' logits alive at once in
    the forward and the backward pass (see the module docstring). `head` maps hidden states to logits."""
    import torch
    from torch.utils.checkpoint import checkpoint

    h, y = scored_positions(hidden, labels)
    if h.shape[0] == 0:  # nothing to score: a zero that still reaches the model's outputs
        return hidden.sum().float() * 0.0
    # A ZeRO-3 LM head's weight is released (emptied) by DeepSpeed's post-forward hook when the
    # recomputation ends and gathered again by its pre-backward hook before the weight is used, so torch's
    # check of the recomputed tensors' shapes would see an empty weight (a frozen head, as with LoRA:
    # DeepSpeed keeps a frozen weight gathered only for a module already in its backward pass, and the
    # loss slices are the first thing the backward pass reaches). The slice itself is deterministic.
    check = "none" if _zero3_partitioned(head) else "default"
    total = None
    for start in range(0, h.shape[0], slice_tokens):
        hs, ys = h[start : start + slice_tokens], y[start : start + slice_tokens]
        if torch.is_grad_enabled() and hs.requires_grad:
            part = checkpoint(_slice_nll, head, hs, ys, use_reentrant=False, determinism_check=check)
        else:
            part = _slice_nll(head, hs, ys)
        total = part if total is None else total + part
    return total


def _zero3_partitioned(head) -> bool:
    """Whether `head` (an OutputHead) holds a ZeRO-3 partitioned parameter (DeepSpeed tags them `ds_id`)."""
    module = getattr(head, "module", None)
    return module is not None and any(hasattr(p, "ds_id") for p in module.parameters())


def liger_summed_nll(hidden, labels, head):
    """The same sum through Liger-Kernel's fused linear cross-entropy (GPU; `head` an `OutputHead` whose
    module is a plain nn.Linear with its full weight on this rank)."""
    import torch
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    if type(head.module) is not torch.nn.Linear:  # e.g. an LM head with a LoRA adapter of its own
        raise RuntimeError(
            f"loss.kernel=liger needs a plain linear LM head, this model's is {type(head.module).__name__}: "
            "use loss.kernel=torch"
        )
    h, y = scored_positions(hidden, labels)
    if h.shape[0] == 0:
        return hidden.sum().float() * 0.0
    weight, bias = head.module.weight, head.module.bias
    return liger_fused_linear_cross_entropy(
        h, weight, y, bias=bias, ignore_index=IGNORE_INDEX, reduction="sum", softcap=head.softcap
    )


class OutputHead:
    """The model's hidden-states-to-logits map: its output embeddings, then its config's
    `final_logit_softcapping` if set. `check` compares it once with the model's own logits."""

    def __init__(self, model: Any):
        inner = unwrap(model)
        self.module = inner.get_output_embeddings()
        cap = getattr(inner.config.get_text_config(), "final_logit_softcapping", None)
        self.softcap = float(cap) if cap else None
        self.checked = False

    def __call__(self, h):
        import torch

        logits = self.module(h)
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def check(self, hidden, logits) -> None:
        """Raise RuntimeError unless this head maps the last position's hidden state to the model's logits
        for it (the engine's `logits_to_keep=1` output); once per process."""
        import torch

        if self.checked:
            return
        with torch.no_grad():
            mine = self(hidden[:, -1:]).float()
            theirs = logits[:, -1:].float()
            ok = mine.shape == theirs.shape and torch.allclose(mine, theirs, rtol=1e-2, atol=1e-2)
        if not ok:
            raise RuntimeError(
                "the model's logits are not its LM head applied to its last hidden state (an extra logit "
                "scale or transform): set loss.slice_tokens=0 to train it from its full logits"
            )
        self.checked = True


def unwrap(model: Any) -> Any:
    """The transformers model inside a peft wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def supports_hidden_path(model: Any) -> bool:
    """Whether the model's forward takes `logits_to_keep` (every causal LM of transformers 5 does)."""
    return "logits_to_keep" in inspect.signature(unwrap(model).forward).parameters


def micro_batch_nll(engine, batch: dict, labels, head: OutputHead | None, slice_tokens: int, kernel: str):
    """Run the engine on one micro-batch and return its summed NLL (a 0-dim fp32 tensor in the graph).

    `head` None (or `slice_tokens` 0): the full-logits path; otherwise the hidden-states path with the
    torch slices or Liger's kernel (`kernel`)."""
    if head is None or slice_tokens == 0:
        return summed_nll(engine(**batch, use_cache=False).logits, labels)
    out = engine(**batch, use_cache=False, output_hidden_states=True, logits_to_keep=1)
    hidden = out.hidden_states[-1]
    head.check(hidden, out.logits)
    if kernel == "liger":
        return liger_summed_nll(hidden, labels, head)
    return sliced_summed_nll(hidden, labels, head, slice_tokens)
