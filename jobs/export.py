"""Export generation output as a Hugging Face dataset that TRL's trainers take as is.

    python -m jobs.export --config conf/export.yaml inputs=[outputs/generate] output.dir=outputs/export
    python -m jobs.export inputs=[s3://bucket/gen-a,s3://bucket/gen-b] rows=correct output.dir=s3://bucket/sft

Writes <output.dir>/data/<split>-NNNNN-of-NNNNN.parquet (columns messages, prompt, completion and the
rows' metadata) and README.md (the dataset card: config, rows and costs per input folder). Every key and
its default: gen_ssd_ray/export/config.py. Exit codes: 0 done, 2 bad config, input or output folder
(nothing written).
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from gen_ssd_ray.common.cli import Job, run_job
    from gen_ssd_ray.export.config import ExportConfig
    from gen_ssd_ray.export.run import export, format_summary, prepare

    job = Job(
        name="export",
        schema=ExportConfig,
        prepare=prepare,  # reads and checks every input and the output folder before writing anything
        run=export,
        format_summary=format_summary,
        example="inputs=[outputs/generate] rows=correct",
    )
    return run_job(job, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
