"""Fine-tuning job: DeepSpeed ZeRO supervised fine-tuning of a student through Ray Train.

    python -m jobs.finetune [--config conf/finetune.yaml] key=value ...
    ray job submit --working-dir . -- python -m jobs.finetune --config conf/finetune.yaml runtime.num_workers=8

Every key, its default and doc: `python -m jobs.finetune --help`; the resolved config: `--print-config`.

Parses the config, checks model, data and output folder (gen_ssd_ray.train.run.prepare), trains or
resumes, prints the summary and a closing JSON line. Exit codes (gen_ssd_ray.common.cli): 0 done (or
already complete), 2 bad config / model / data / output folder (nothing started), 1 training failed (non-finite losses, a full disk),
130 interrupted by SIGINT/SIGTERM (either way, re-run the same command to resume from the last
checkpoint).
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from gen_ssd_ray.common.cli import Job, run_job
    from gen_ssd_ray.train.config import FinetuneConfig
    from gen_ssd_ray.train.run import format_summary, prepare, run_finetune

    job = Job(
        name="finetune",
        schema=FinetuneConfig,
        prepare=prepare,
        run=run_finetune,
        format_summary=format_summary,
        example="optim.lr=1e-5 runtime.num_workers=2",
    )
    return run_job(job, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
