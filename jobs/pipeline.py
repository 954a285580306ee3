"""The whole experiment: teacher, cold start, generation per method, distillation, evaluation, report.

    python -m jobs.pipeline [--config conf/pipeline.yaml] key=value ...      # make run
    ray job submit --working-dir . -- python -m jobs.pipeline --config conf/pipeline_gsm8k.yaml

Every stage is resumable: re-running the same command skips finished stages and continues the
interrupted one (gen_ssd_ray.pipeline). Every key, its default and doc: `python -m jobs.pipeline --help`;
the resolved config: `--print-config`. Exit codes: 0 done, 2 bad config or a stage's bad input
(nothing of that stage started), 1 a stage failed or a full disk (re-run to continue), 130
interrupted (re-run to continue).
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from gen_ssd_ray.common.cli import Job, run_job
    from gen_ssd_ray.pipeline.config import PipelineConfig
    from gen_ssd_ray.pipeline.run import format_summary, run_pipeline, summary_json

    job = Job(
        name="pipeline",
        schema=PipelineConfig,
        prepare=lambda cfg: None,  # every stage checks its own input before it starts
        run=lambda cfg, _: run_pipeline(cfg),
        format_summary=format_summary,
        example="generate.data.limit=64",
        summary_json=summary_json,
        bad_input=(ValueError, OSError),  # each stage checks its input when it starts
    )
    return run_job(job, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
