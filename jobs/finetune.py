"""Fine-tuning job: DeepSpeed ZeRO supervised fine-tuning of a student through Ray Train.

    python -m jobs.finetune [--config conf/finetune.yaml] key=value ...
    ray job submit --working-dir . -- python -m jobs.finetune --config conf/finetune.yaml runtime.num_workers=8

Parses the config, checks model, data and output folder (gen_ssd_ray.train.run.prepare), trains or
resumes, prints the summary. Exit codes: 0 done (or already complete), 2 bad config / model / data
(nothing started), 1 training failed, 130 interrupted (either way, re-run the same command to resume
from the last checkpoint).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.finetune", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="YAML file (see conf/); key=value overrides win over it")
    parser.add_argument(
        "overrides", nargs="*", help="config overrides, e.g. optim.lr=1e-5 runtime.num_workers=2"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    from gen_ssd_ray.generate.config import ConfigError, load_config
    from gen_ssd_ray.train.config import FinetuneConfig
    from gen_ssd_ray.train.run import (
        TrainingFailed,
        TrainingInterrupted,
        format_summary,
        prepare,
        run_finetune,
    )

    try:
        cfg = load_config(args.config, args.overrides, schema_cls=FinetuneConfig)
        prepared = prepare(cfg)  # model, data, output folder: fail before any worker starts
    except (ConfigError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        summary = run_finetune(cfg, prepared)
    except TrainingFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except TrainingInterrupted as e:
        print(f"interrupted: {e}", file=sys.stderr)
        return 130
    print(format_summary(summary))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
