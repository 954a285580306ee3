"""Gen-SSD generation job.

    python -m jobs.generate [--config conf/default.yaml] key=value ...
    ray job submit --working-dir . -- python -m jobs.generate --config conf/gpu_cluster.yaml

Every key, its default and doc: `python -m jobs.generate --help`; the resolved config: `--print-config`.
Exit codes: 0 done, 2 bad config / model / input (nothing started), 1 some problems failed on engine
errors (not committed: re-run to retry them) or a full disk, 130 interrupted (finished problems
committed; re-run to continue).
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from gen_ssd_ray.common.cli import Job, run_job
    from gen_ssd_ray.generate.config import GenerateConfig
    from gen_ssd_ray.generate.driver import check_finished, format_summary, prepare, run_generate

    job = Job(
        name="generate",
        schema=GenerateConfig,
        prepare=prepare,  # models, data, output folder: fail before any actor starts
        run=lambda cfg, prepared: check_finished(run_generate(cfg, prepared)),
        format_summary=format_summary,
        example="data.limit=100 teacher.num_engines=4",
    )
    return run_job(job, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
