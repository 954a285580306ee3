"""Student evaluation: accuracy of any model folder on a problem set (default: GSM8K test).

    python -m jobs.evaluate [--config conf/evaluate.yaml] key=value ...
    ray job submit --working-dir . -- python -m jobs.evaluate model.model=/models/student model.num_gpus=1

Every key, its default and doc: `python -m jobs.evaluate --help`; the resolved config: `--print-config`.
Exit codes: 0 done (or already evaluated: skipped), 2 bad config / model / input / output folder, or an
answer checker (math-verify) that cannot run (nothing started), 1 engines failed or a full disk, 130
interrupted. Rows are committed as batches finish (output.dir/_partial): after 1 or 130, re-running the
same command resumes where it stopped.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from gen_ssd_ray.common.cli import Job, run_job
    from gen_ssd_ray.evaluate.config import EvaluateConfig
    from gen_ssd_ray.evaluate.run import evaluate, format_summary, prepare

    job = Job(
        name="evaluate",
        schema=EvaluateConfig,
        prepare=prepare,  # model, data, output folder, prompts: fail before any actor starts
        run=evaluate,
        format_summary=format_summary,
        example="model.model=DIR data.limit=100",
    )
    return run_job(job, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
