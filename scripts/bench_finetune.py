"""`make bench` (second part): fine-tuning throughput and batch density, and the methods' teacher cost.

1. Fine-tuning: the real job (Ray Train + DeepSpeed) for a fixed number of optimizer steps on two
   workloads, with packing on and off: the lab task (lab:teacher from scratch on embedded:lab-sft) and
   the embedded SmolLM2 student on GSM8K reference solutions. Reports trained tokens per second (all
   tokens fed to the model, prompt included, steady state: the job's own per-step log after its first
   step), the fraction of non-padding tokens per batch (target >= 0.9) and how full each micro-batch's
   token budget is.
2. Methods: teacher tokens per kept trajectory, per method, from a finished pipeline run of the
   embedded default (`make run` writes outputs/pipeline; --pipeline-dir points elsewhere).

    python -m scripts.bench_finetune [--steps 40] [--pipeline-dir outputs/pipeline]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

WORKLOADS = {
    "lab": {
        "model.path": "lab:teacher",
        "data.path": "embedded:lab-sft/train",
        "optim.max_seq_len": "256",
        "optim.micro_batch_tokens": "1024",
        "optim.lr": "3e-3",
    },
    "smollm2_gsm8k": {
        "model.path": "embedded:student",
        "data.path": "embedded:gsm8k/train",
        "data.response_field": "answer",
        "optim.max_seq_len": "512",
        "optim.micro_batch_tokens": "2048",
        "optim.lr": "5e-5",
    },
}


def run_workload(name: str, packing: bool, steps: int, workdir: Path) -> dict:
    from gen_ssd_ray.generate.config import load_config
    from gen_ssd_ray.lab.models import build_lab_model
    from gen_ssd_ray.train import checkpoint as ck
    from gen_ssd_ray.train.config import FinetuneConfig
    from gen_ssd_ray.train.run import prepare, run_finetune

    opts = dict(WORKLOADS[name])
    if opts["model.path"].startswith("lab:"):
        opts["model.path"] = str(build_lab_model(workdir / f"{name}-init", size="teacher", seed=0))
    out = workdir / f"{name}-{'packed' if packing else 'padded'}"
    overrides = [f"{k}={v}" for k, v in opts.items()] + [
        "data.filters=[]",
        f"optim.max_steps={steps}",
        f"optim.packing={str(packing).lower()}",
        f"output.dir={out}",
        "output.save_every_steps=0",
        "runtime.cpus_per_worker=2",
        "runtime.local_num_cpus=2",
    ]
    cfg = load_config(None, overrides, schema_cls=FinetuneConfig)
    summary = run_finetune(cfg, prepare(cfg))
    metrics = ck.read_metrics(out)[1:]  # steady state: the first step pays for warm-up
    tokens = sum(m["input_tokens"] for m in metrics)
    seconds = metrics[-1]["elapsed_s"] - ck.read_metrics(out)[0]["elapsed_s"] if metrics else 0.0
    return {
        "steps": summary["steps"],
        "train/tokens_per_s": round(tokens / seconds, 1) if seconds else None,
        "train/nonpad_frac": summary["train/batch"]["nonpad_frac"],
        "train/fill_frac": summary["train/batch"]["fill_frac"],
        "loss_first_last": [round(summary["first_loss"], 3), round(summary["final_loss"], 3)],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.bench_finetune")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--workloads", default="lab,smollm2_gsm8k")
    parser.add_argument("--pipeline-dir", default="outputs/pipeline")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    result: dict = {"finetune": {}, "target/nonpad_frac": ">= 0.9"}
    with tempfile.TemporaryDirectory(prefix="gen-ssd-bench-ft-") as tmp:
        for name in args.workloads.split(","):
            for packing in (True, False):
                key = f"{name}/{'packed' if packing else 'padded'}"
                result["finetune"][key] = run_workload(name, packing, args.steps, Path(tmp))
    report = Path(args.pipeline_dir) / "report" / "metrics.json"
    if report.is_file():
        gen = json.loads(report.read_text())["generation"]
        result["methods/teacher_tokens_per_kept"] = {m: g["teacher_tokens_per_kept"] for m, g in gen.items()}
        result["methods/kept"] = {m: g["kept"] for m, g in gen.items()}
        result["methods/source"] = str(report)
    else:
        result["methods/teacher_tokens_per_kept"] = (
            f"no pipeline run at {args.pipeline_dir}: run `make run` first"
        )
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
