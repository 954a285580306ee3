"""The sliced loss (gen_ssd_ray.train.loss) equals the full-logits loss the worker used before: the summed
NLL and every parameter's gradient, on a tiny Llama built here, packed and padded, with ignored labels,
divided by the worker's normalisation; and it never holds more than one slice's logits."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

VOCAB = 503


class FakeEngine:
    """What the loss sees of a DeepSpeed engine: calling it runs the module."""

    def __init__(self, model):
        self.module = model

    def __call__(self, **kwargs):
        return self.module(**kwargs)


@pytest.fixture(scope="module")
def model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(cfg).float().eval()


def packed_batch(seed: int = 1):
    """Two examples packed in one row; each prompt (and its first token) labelled IGNORE_INDEX."""
    from gen_ssd_ray.train.data import IGNORE_INDEX

    g = torch.Generator().manual_seed(seed)
    lengths, prompts = [23, 18], [7, 5]
    ids = torch.randint(0, VOCAB, (1, sum(lengths)), generator=g)
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    labels = ids.clone()
    start = 0
    for n, p in zip(lengths, prompts, strict=True):
        labels[0, start : start + p] = IGNORE_INDEX
        start += n
    return {"input_ids": ids, "position_ids": pos}, labels


def padded_batch(seed: int = 2):
    from gen_ssd_ray.train.data import IGNORE_INDEX

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (2, 16), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 11:] = 0
    labels = ids.clone()
    labels[:, :4] = IGNORE_INDEX
    labels[1, 11:] = IGNORE_INDEX
    return {"input_ids": ids, "attention_mask": mask}, labels


def loss_and_grads(model, batch, labels, slice_tokens: int, norm: float):
    from gen_ssd_ray.train.loss import OutputHead, micro_batch_nll

    model.zero_grad(set_to_none=True)
    head = OutputHead(model)
    nll = micro_batch_nll(FakeEngine(model), batch, labels, head, slice_tokens, "torch")
    (nll / norm).backward()  # the worker's normalisation: global loss tokens / (world * grad_accum)
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    return nll.detach(), grads


@pytest.mark.parametrize("make_batch", [packed_batch, padded_batch])
@pytest.mark.parametrize("slice_tokens", [5, 4096])
def test_sliced_loss_equals_full_loss_and_grads(model, make_batch, slice_tokens):
    from gen_ssd_ray.train.data import IGNORE_INDEX

    batch, labels = make_batch()
    loss_tokens = int((labels[:, 1:] != IGNORE_INDEX).sum())
    norm = loss_tokens / 2.0
    full, g_full = loss_and_grads(model, batch, labels, 0, norm)
    sliced, g_sliced = loss_and_grads(model, batch, labels, slice_tokens, norm)
    assert full.dtype == sliced.dtype == torch.float32
    # a random model: about log(VOCAB) nats per scored token
    assert 0.8 * loss_tokens * 6.2 < float(full) < 1.2 * loss_tokens * 6.2
    torch.testing.assert_close(sliced, full, rtol=1e-5, atol=1e-4)
    assert g_full.keys() == g_sliced.keys()
    for name, g in g_full.items():
        assert g.abs().sum() > 0, name  # every weight (embeddings/LM head included) gets a gradient
        torch.testing.assert_close(g_sliced[name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_only_one_slice_of_logits_exists_at_a_time(model):
    """The LM head sees loss-carrying positions only, at most `slice_tokens` of them per call, in the
    forward and in the (recomputing) backward pass."""
    from gen_ssd_ray.train.data import IGNORE_INDEX
    from gen_ssd_ray.train.loss import OutputHead, micro_batch_nll

    batch, labels = packed_batch()
    scored = int((labels[:, 1:] != IGNORE_INDEX).sum())
    head = OutputHead(model)
    rows: list[int] = []
    handle = head.module.register_forward_hook(
        lambda m, args, out: rows.append(out.reshape(-1, VOCAB).shape[0])
    )
    try:
        model.zero_grad(set_to_none=True)
        nll = micro_batch_nll(FakeEngine(model), batch, labels, head, 8, "torch")
        forward_rows = list(rows)
        nll.backward()
    finally:
        handle.remove()
    # forward: the model's own single position, the check's, then the slices of the scored positions
    assert forward_rows[:2] == [1, 1]
    assert forward_rows[2:] == [8] * (scored // 8) + ([scored % 8] if scored % 8 else [])
    assert rows[len(forward_rows) :] and max(rows) <= 8  # the backward recomputed slice by slice
    assert sum(rows[len(forward_rows) :]) == scored


def test_nothing_to_score_is_a_zero_in_the_graph(model):
    from gen_ssd_ray.train.data import IGNORE_INDEX
    from gen_ssd_ray.train.loss import OutputHead, micro_batch_nll

    batch, labels = packed_batch()
    labels[:] = IGNORE_INDEX
    nll = micro_batch_nll(FakeEngine(model), batch, labels, OutputHead(model), 8, "torch")
    assert float(nll.detach()) == 0.0 and nll.requires_grad
    nll.backward()


def test_a_head_that_is_not_the_models_logits_is_refused(model):
    """A model whose logits are more than its LM head (a logit scale) fails naming loss.slice_tokens=0."""
    from gen_ssd_ray.train.loss import OutputHead, micro_batch_nll

    class Scaled(FakeEngine):
        def __call__(self, **kwargs):
            out = self.module(**kwargs)
            out.logits = out.logits * 3.0
            return out

    batch, labels = packed_batch()
    with pytest.raises(RuntimeError, match=r"loss\.slice_tokens=0"):
        micro_batch_nll(Scaled(model), batch, labels, OutputHead(model), 8, "torch")


def test_softcapped_head_matches_the_models_logits():
    """A Gemma-2-style final logit soft-cap is applied by the head as by the model."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from gen_ssd_ray.train.loss import OutputHead

    torch.manual_seed(0)
    cfg = Gemma2Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        final_logit_softcapping=2.0,
    )
    m = Gemma2ForCausalLM(cfg).eval()
    ids = torch.randint(0, VOCAB, (1, 9))
    out = m(input_ids=ids, output_hidden_states=True)
    head = OutputHead(m)
    assert head.softcap == 2.0
    torch.testing.assert_close(head(out.hidden_states[-1]), out.logits)


@pytest.mark.gpu
def test_liger_kernel_equals_full_loss(model):
    """Liger-Kernel's fused linear cross-entropy (loss.kernel=liger) on a GPU: same value and grads."""
    pytest.importorskip("liger_kernel")
    from gen_ssd_ray.train.data import IGNORE_INDEX
    from gen_ssd_ray.train.loss import OutputHead, liger_summed_nll

    gpu_model = model.to("cuda")
    batch, labels = packed_batch()
    batch = {k: v.cuda() for k, v in batch.items()}
    labels = labels.cuda()
    norm = float((labels[:, 1:] != IGNORE_INDEX).sum())
    full, g_full = loss_and_grads(gpu_model, batch, labels, 0, norm)
    gpu_model.zero_grad(set_to_none=True)
    hidden = gpu_model(**batch, output_hidden_states=True, logits_to_keep=1).hidden_states[-1]
    fused = liger_summed_nll(hidden, labels, OutputHead(gpu_model))
    (fused / norm).backward()
    torch.testing.assert_close(fused.float(), full, rtol=1e-4, atol=1e-3)
    for name, p in gpu_model.named_parameters():
        torch.testing.assert_close(p.grad, g_full[name], rtol=1e-3, atol=1e-5, msg=name)
    model.to("cpu")
