"""Ray job entrypoint: ``python -m jobs.tune --config jobs/configs/<name>_tune.yaml``.

Ray Tune over the training driver (ASHA early stopping); every trial is an MLflow child run
with full lineage; the best trial is registered as ``candidate``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.tune", description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--config", required=True, help="tune job YAML (see jobs/configs/churn_tune.yaml)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[skewless] %(message)s")

    from runtime.errors import SkewlessError
    from runtime.training._tune import run_tune

    try:
        outcome = run_tune(Path(args.config), progress=print)
    except SkewlessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"best trial run {outcome.run_id}: models:/{outcome.model_name}/{outcome.version} — {outcome.decision}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
