"""Ray job entrypoint: ``python -m jobs.tune --config jobs/configs/<name>_tune.yaml``.

Ray Tune over the training driver (ASHA early stopping); every trial is an MLflow child run
with full lineage; the best trial is registered as ``candidate``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from jobs._entry import run_job


def _tune(config: Path) -> str:
    from runtime.training import run_tune

    outcome = run_tune(config, progress=print)
    return f"best trial run {outcome.run_id}: models:/{outcome.model_name}/{outcome.version} — {outcome.decision}"


def main(argv: list[str] | None = None) -> int:
    return run_job("python -m jobs.tune", __doc__, "tune job YAML (see jobs/configs/churn_tune.yaml)", _tune, argv)


if __name__ == "__main__":
    sys.exit(main())
