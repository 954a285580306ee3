"""Student evaluation: accuracy of any model folder on a problem set (default: GSM8K test).

    python -m jobs.evaluate [--config conf/evaluate.yaml] key=value ...
    ray job submit --working-dir . -- python -m jobs.evaluate model.model=/models/student model.num_gpus=1

Parses the config, runs gen_ssd_ray.evaluate.run, prints the summary. Exit codes: 0 done (or already
evaluated: skipped), 2 bad config / model / input / output folder (nothing started), 1 engines
failed (nothing written: re-run), 130 interrupted (nothing written).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="YAML file (see conf/evaluate.yaml); key=value overrides win")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. model.model=DIR data.limit=100")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    from gen_ssd_ray.evaluate.run import EngineFailure, EvaluateConfig, evaluate, format_summary, prepare
    from gen_ssd_ray.generate.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides, schema_cls=EvaluateConfig)
        prepared = prepare(cfg)  # model, data, output folder, prompts: fail before any actor starts
    except (ConfigError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        summary = evaluate(cfg, prepared)
    except EngineFailure as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: engines stopped, nothing written; re-run the same command", file=sys.stderr)
        return 130
    print(format_summary(summary))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
