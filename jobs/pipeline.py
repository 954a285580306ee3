"""The whole experiment: teacher, cold start, generation per method, distillation, evaluation, report.

    python -m jobs.pipeline [--config conf/pipeline.yaml] key=value ...      # make run
    ray job submit --working-dir . -- python -m jobs.pipeline --config conf/pipeline_gsm8k.yaml

Every stage is resumable: re-running the same command skips finished stages and continues the
interrupted one (gen_ssd_ray.pipeline.run). Exit codes: 0 done, 2 bad config (nothing started), 1 a stage
failed (re-run to continue), 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.pipeline", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="YAML file (see conf/); key=value overrides win over it")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. generate.data.limit=64")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    from gen_ssd_ray.generate.config import ConfigError, load_config
    from gen_ssd_ray.pipeline.run import (
        PipelineConfig,
        PipelineInterrupted,
        StageFailed,
        format_summary,
        run_pipeline,
    )

    try:
        cfg = load_config(args.config, args.overrides, schema_cls=PipelineConfig)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        state = run_pipeline(cfg)
    except (ValueError, OSError) as e:  # bad input found by a stage before it started anything
        print(f"error: {e}", file=sys.stderr)
        return 2
    except StageFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (PipelineInterrupted, KeyboardInterrupt) as e:
        print(
            f"interrupted: {e}; finished stages are kept, re-run the same command to continue",
            file=sys.stderr,
        )
        return 130
    print(format_summary(state))
    print(json.dumps({k: v for k, v in state.items() if k != "stages"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
