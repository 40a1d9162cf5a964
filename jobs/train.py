"""Ray job entrypoint: ``python -m jobs.train --config jobs/configs/<name>.yaml``.

Works on a laptop (starts or joins a local Ray instance) and under
``ray job submit --working-dir . -- python -m jobs.train --config ...``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="training job YAML (see jobs/configs/)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[skewless] %(message)s")

    from runtime.config import TrainJobConfig, load_config
    from runtime.errors import SkewlessError
    from runtime.training import run_training

    try:
        cfg = load_config(TrainJobConfig, args.config)
        outcome = run_training(cfg, config_dir=Path(args.config).resolve().parent, progress=print)
    except SkewlessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"run {outcome.run_id}: models:/{outcome.model_name}/{outcome.version} — {outcome.decision}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
