"""Peak memory of the fine-tuning loss: full logits vs the sliced loss, on a large-vocabulary tiny model.

    python -m scripts.bench_loss_memory                          # vocab 150k, hidden 64, 4096 tokens, CPU
    python -m scripts.bench_loss_memory --tokens 2048 --slice-tokens 256
    python -m scripts.bench_loss_memory --device cuda --dtype bfloat16 --tokens 16384   # a GPU

For each path (`full`: `loss.slice_tokens=0`, the model's full logits upcast to fp32; `sliced`:
`loss.slice_tokens=N`, gen_ssd_ray.train.loss), a fresh subprocess builds a random 2-layer Llama with
`--vocab` tokens (untied LM head, like most large-vocabulary students), runs one forward + backward of
one packed micro-batch of `--tokens` tokens (examples of 512 tokens, the first quarter of each a prompt
that carries no loss) exactly as the worker does (`micro_batch_nll`, then backward of the normalised
loss), and reports the memory of that step: on the CPU the peak RSS (`resource.getrusage` ru_maxrss)
minus the RSS before the step; on a GPU `torch.cuda.max_memory_allocated` minus the memory allocated
before it. The summed NLLs of both paths are printed too (they must agree).

Prints one line per path and a closing JSON line.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MB = 1024 * 1024


def _rss_mb() -> float:
    """The current resident set size in MB (Linux /proc; 0 where unavailable)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0.0
    import os

    return pages * os.sysconf("SC_PAGE_SIZE") / MB


def child(args: argparse.Namespace) -> dict:
    """One forward+backward in this process; returns its memory figures."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from gen_ssd_ray.train.data import IGNORE_INDEX
    from gen_ssd_ray.train.loss import OutputHead, micro_batch_nll

    torch.manual_seed(0)
    torch.set_num_threads(max(1, args.threads))
    dtype = getattr(torch, args.dtype)
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=2 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 32),
        num_key_value_heads=max(1, args.hidden // 32),
        head_dim=32,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).to(device=args.device, dtype=dtype).train()
    n, example = args.tokens, 512
    ids = torch.randint(0, args.vocab, (1, n))
    pos = torch.arange(n) % example
    labels = ids.clone()
    labels[0, pos < example // 4] = IGNORE_INDEX
    batch = {"input_ids": ids.to(args.device), "position_ids": pos[None].to(args.device)}
    labels = labels.to(args.device)
    loss_tokens = int((labels[:, 1:] != IGNORE_INDEX).sum())
    slice_tokens = args.slice_tokens if args.mode == "sliced" else 0
    head = OutputHead(model) if slice_tokens else None

    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / MB
    else:
        before = _rss_mb()
    nll = micro_batch_nll(model, batch, labels, head, slice_tokens, "torch")
    (nll / loss_tokens).backward()
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / MB
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux
    return {
        "mode": args.mode,
        "slice_tokens": slice_tokens,
        "summed_nll": round(float(nll.detach()), 4),
        "loss_tokens": loss_tokens,
        "before_mb": round(before, 1),
        "peak_mb": round(peak, 1),
        "step_mb": round(peak - before, 1),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=150_000)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=4096, help="tokens in the micro-batch")
    ap.add_argument("--slice-tokens", type=int, default=1024, help="loss.slice_tokens of the sliced path")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", help="model dtype: float32 (CPU) or bfloat16 (GPU)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--mode", choices=["full", "sliced"], help=argparse.SUPPRESS)  # the child process
    args = ap.parse_args(argv)
    if args.mode:
        print(json.dumps(child(args)), flush=True)
        return 0

    results = {}
    base = [a for a in (argv if argv is not None else sys.argv[1:])]
    for mode in ("full", "sliced"):
        proc = subprocess.run(
            [sys.executable, "-m", "scripts.bench_loss_memory", *base, "--mode", mode],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            return proc.returncode
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        results[mode] = r
        print(
            f"{mode:>6} (slice_tokens={r['slice_tokens']}): step {r['step_mb']:.0f} MB over {r['before_mb']:.0f} MB "
            f"(peak {r['peak_mb']:.0f} MB), summed NLL {r['summed_nll']} over {r['loss_tokens']} tokens",
            flush=True,
        )
    full, sliced = results["full"], results["sliced"]
    logits_mb = args.tokens * args.vocab * 4 / MB
    print(f"one fp32 copy of the micro-batch's logits: {logits_mb:.0f} MB", flush=True)
    summary = {
        "vocab": args.vocab,
        "hidden": args.hidden,
        "layers": args.layers,
        "tokens": args.tokens,
        "device": args.device,
        "dtype": args.dtype,
        "fp32_logits_mb": round(logits_mb, 1),
        "full": full,
        "sliced": sliced,
        "step_mb_ratio": round(sliced["step_mb"] / full["step_mb"], 3) if full["step_mb"] > 0 else None,
        "nll_rel_diff": abs(full["summed_nll"] - sliced["summed_nll"]) / max(1e-9, abs(full["summed_nll"])),
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
