"""`run_job`: the one entry-point wrapper behind every `python -m jobs.<name>`.

It parses `--config FILE` and `key=value` overrides, loads the job's typed config, runs the job's
`prepare` (everything that can fail on bad input, before any actor starts) and then its `run`, prints
the human summary and a closing JSON line, and maps the failure model (gen_ssd_ray.common.errors) to
the documented exit codes (below).

The command line documents itself from the typed config (gen_ssd_ray.common.confdoc): `--help` lists
every key with its default and one-line doc; `--print-config` prints the resolved config as YAML
(defaults <- `--config FILE` <- overrides, validated: every key, loadable again with `--config`) and
exits 0 without running `prepare` or starting Ray; a bad key exits 2 naming the job, the nearest keys and
what the section holds (gen_ssd_ray.common.config.load_config). Exit codes:

    0    done (or nothing left to do)
    2    bad config, model, data or output folder: nothing started (`InputError`, any ValueError or
         OSError from loading or `prepare`); a job folder held by another job
         (`FolderLockedError`, wherever it is raised)
    1    the job failed (`JobFailed`): what finished is kept; re-run the same command to continue.
         Also a full disk or quota (ENOSPC / EDQUOT, at any phase, however wrapped): one line naming
         the file if known and "free space", never a traceback
    130  interrupted by SIGINT/SIGTERM (`JobInterrupted`): what finished is kept; re-run to continue

A failure or interrupt that carries the job's summary prints it first, so the log always ends with
what was done. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gen_ssd_ray.common.errors import (
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    InputError,
    JobFailed,
    JobInterrupted,
    chain,
    disk_full,
    disk_full_message,
)


@dataclass(frozen=True)
class Job:
    name: str  # python -m jobs.<name>
    schema: type  # the typed config
    prepare: Callable[[Any], Any]  # cfg -> prepared input; raises on bad input
    run: Callable[[Any, Any], dict[str, Any]]  # (cfg, prepared) -> summary
    format_summary: Callable[[dict[str, Any]], str]
    example: str = "data.limit=100"  # an override shown in --help
    # What the closing JSON line holds (default: the whole summary).
    summary_json: Callable[[dict[str, Any]], dict[str, Any]] = dict
    # Errors that mean bad input (exit 2) when `run` raises them, besides InputError. A job with
    # stages (the pipeline) checks each stage's input when the stage starts, so for it every
    # ValueError / OSError is one.
    bad_input: tuple[type[BaseException], ...] = (InputError,)


def _print_summary(job: Job, summary: dict[str, Any] | None) -> None:
    if summary is not None:
        print(job.format_summary(summary))
        print(json.dumps(job.summary_json(summary), default=str))


def run_job(job: Job, doc: str, argv: list[str] | None = None) -> int:
    """Run `job` as a command line program; returns the exit code (see the module docstring)."""
    from gen_ssd_ray.common.config import load_config
    from gen_ssd_ray.common.interrupts import raise_on_signals

    parser = _Parser(
        job,
        prog=f"python -m jobs.{job.name}",
        description=doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="YAML file (see conf/); key=value overrides win over it")
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config (every key, as YAML) and exit 0 without running anything",
    )
    parser.add_argument("overrides", nargs="*", help=f"config overrides, e.g. {job.example}")
    args = parser.parse_args(argv)
    if args.print_config:
        return _print_config(job, args.config, args.overrides)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        # Signals raise from the start: `prepare` can be long (a large data set, building a model).
        with raise_on_signals():
            try:
                cfg = load_config(args.config, args.overrides, schema_cls=job.schema, job=job.name)
                prepared = job.prepare(cfg)
            except (ValueError, OSError) as e:
                return _fail(job, e)
            summary = job.run(cfg, prepared)
    except (JobInterrupted, KeyboardInterrupt) as e:
        _print_summary(job, getattr(e, "summary", None))
        print(
            f"interrupted: {str(e) or 'stopped'}; what finished is kept, re-run the same command to continue",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    except Exception as e:
        if isinstance(e, (JobFailed, *job.bad_input)) or disk_full(e) or _locked(e):
            return _fail(job, e)
        raise
    _print_summary(job, summary)
    return EXIT_OK


class _Parser(argparse.ArgumentParser):
    """The job's parser; its `--help` ends with every config key, its default and one-line doc (read
    from the typed config only when help is asked for)."""

    def __init__(self, job: Job, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.job = job

    def format_help(self) -> str:
        from gen_ssd_ray.common.confdoc import format_keys

        preset = getattr(self.job.schema, "PRESET", None)
        head = "config keys (key=value overrides; default after '='"
        head += f"; a commented example: {preset})" if preset else ")"
        self.epilog = f"{head}:\n{format_keys(self.job.schema)}"
        return super().format_help()


def _print_config(job: Job, config_file: str | None, overrides: list[str]) -> int:
    """`--print-config`: the resolved, validated config as YAML on stdout; nothing is prepared or run."""
    from gen_ssd_ray.common.config import load_config, to_yaml

    try:
        cfg = load_config(config_file, overrides, schema_cls=job.schema, job=job.name)
    except (ValueError, OSError) as e:
        return _fail(job, e)
    source = " ".join([*(["--config", config_file] if config_file else []), *overrides])
    print(f"# python -m jobs.{job.name} {source}".rstrip() + ": the resolved config (every key)")
    print(to_yaml(cfg), end="")
    return EXIT_OK


def _locked(e: BaseException) -> BaseException | None:
    """The FolderLockedError behind `e`, if any (raised by a stage, or wrapped by one)."""
    from gen_ssd_ray.common.joblock import FolderLockedError

    return next((x for x in chain(e) if isinstance(x, FolderLockedError)), None)


def _fail(job: Job, e: BaseException) -> int:
    """Print the one line for a failure and return its exit code: a full disk 1, a locked folder 2,
    JobFailed 1 (after its summary), bad input 2."""
    _print_summary(job, getattr(e, "summary", None))
    full = disk_full(e)
    if full is not None:
        print(f"error: {disk_full_message(*full)}", file=sys.stderr)
        return EXIT_FAILED
    locked = _locked(e)
    if locked is not None:
        print(f"error: {locked}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"error: {e}", file=sys.stderr)
    return EXIT_FAILED if isinstance(e, JobFailed) else EXIT_BAD_INPUT
