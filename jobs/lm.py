"""Ray job entrypoint: ``python -m jobs.lm --config jobs/configs/lm_tiny.yaml``.

Trains the byte-level transformer language model (the GPU-shaped workload) on Ray Train.
Works on a laptop (starts or joins a local Ray instance) and under
``ray job submit --working-dir . -- python -m jobs.lm --config jobs/configs/lm_gpu.yaml``.
"""

from __future__ import annotations

import argparse
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.lm", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="language-model job YAML (see jobs/configs/lm_*.yaml)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[skewless] %(message)s")

    from runtime.config import load_config
    from runtime.errors import SkewlessError
    from runtime.training._lm import LMJobConfig
    from runtime.training._lm_driver import run_lm

    try:
        cfg = load_config(LMJobConfig, args.config)
        outcome = run_lm(cfg, progress=print)
    except SkewlessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    mfu = f"{outcome.mfu:.1%}" if outcome.mfu is not None else "n/a (peak unknown on this device)"
    print(
        f"eval loss {outcome.initial_loss:.4f} -> {outcome.final_loss:.4f}; "
        f"{outcome.tokens_per_s:,.0f} tokens/s; MFU {mfu}; {outcome.n_params:,} parameters on {outcome.device}"
        + (f"; MLflow run {outcome.run_id}" if outcome.run_id else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
