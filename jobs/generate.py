"""Gen-SSD generation job.

    python -m jobs.generate [--config conf/default.yaml] key=value ...
    ray job submit --working-dir . -- python -m jobs.generate --config conf/gpu_cluster.yaml

Parses the config, runs the driver (gen_ssd_ray.generate.driver), prints the summary. Exit codes: 0 done,
2 bad config / model / input (nothing started), 1 some problems failed on engine errors
(not committed: re-run to retry them), 130 interrupted (finished problems committed).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="YAML file (see conf/); key=value overrides win over it")
    parser.add_argument(
        "overrides", nargs="*", help="config overrides, e.g. data.limit=100 teacher.num_engines=4"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    from gen_ssd_ray.generate.config import ConfigError, load_config
    from gen_ssd_ray.generate.driver import format_summary, prepare, run_generate

    try:
        cfg = load_config(args.config, args.overrides)
        prepared = prepare(cfg)  # models, data, output folder: fail before any actor starts
    except (ConfigError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary = run_generate(cfg, prepared)
    print(format_summary(summary))
    print(json.dumps(summary))
    if summary.get("interrupted"):
        return 130
    return 1 if summary.get("problems_failed_retry_later") else 0


if __name__ == "__main__":
    sys.exit(main())
