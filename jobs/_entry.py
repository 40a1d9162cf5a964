"""The shell every ``python -m jobs.<name> --config <file>`` entrypoint shares."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path


def run_job(prog: str, doc: str | None, config_help: str, job: Callable[[Path], str], argv: list[str] | None) -> int:
    """Parse ``--config``, run ``job`` (which returns a one-line summary), map user errors to exit 2."""
    parser = argparse.ArgumentParser(prog=prog, description=(doc or "").splitlines()[0])
    parser.add_argument("--config", required=True, help=config_help)
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="Show the engines' logs (Ray Data, Ray Train, the workers' output) here; by default they "
        "go to the job's log file ($SKEWLESS_HOME/logs) and its MLflow run.",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[skewless] %(message)s")
    if args.verbose:  # read where Ray is joined (runtime.connect) and where the logs are routed
        import os

        from runtime.connect import VERBOSE_ENV

        os.environ[VERBOSE_ENV] = "1"

    from runtime.errors import SkewlessError
    from runtime.redact import redact

    try:
        summary = job(Path(args.config))
    except SkewlessError as exc:
        print(f"error: {redact(str(exc))}", file=sys.stderr)
        return 2
    print(summary)
    return 0
