"""Ray job entrypoint: ``python -m jobs.train --config jobs/configs/<name>.yaml``.

Works on a laptop (starts or joins a local Ray instance) and under
``ray job submit --working-dir . -- python -m jobs.train --config ...``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from jobs._entry import run_job


def _train(config: Path) -> str:
    from runtime.training import load_train_config, run_training

    cfg = load_train_config(config)
    outcome = run_training(cfg, config_dir=config.resolve().parent, progress=print)
    return f"run {outcome.run_id}: models:/{outcome.model_name}/{outcome.version} — {outcome.decision}"


def main(argv: list[str] | None = None) -> int:
    return run_job("python -m jobs.train", __doc__, "training job YAML (see jobs/configs/)", _train, argv)


if __name__ == "__main__":
    sys.exit(main())
