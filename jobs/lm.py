"""Ray job entrypoint: ``python -m jobs.lm --config jobs/configs/lm_tiny.yaml``.

Trains the byte-level transformer language model (the GPU-shaped workload) on Ray Train.
Works on a laptop (starts or joins a local Ray instance) and under
``ray job submit --working-dir . -- python -m jobs.lm --config jobs/configs/lm_gpu.yaml``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from jobs._entry import run_job


def _lm(config: Path) -> str:
    from runtime.config import load_config
    from runtime.training import LMJobConfig, run_lm

    outcome = run_lm(load_config(LMJobConfig, config), progress=print)
    mfu = f"{outcome.mfu:.1%}" if outcome.mfu is not None else "n/a (peak unknown on this device)"
    return (
        f"eval loss {outcome.initial_loss:.4f} -> {outcome.final_loss:.4f}; "
        f"{outcome.tokens_per_s:,.0f} tokens/s; MFU {mfu}; {outcome.n_params:,} parameters on {outcome.device}"
        + (f"; MLflow run {outcome.run_id}" if outcome.run_id else "")
        + (f"; registered {outcome.model_uri}" if outcome.model_uri else "")
    )


def main(argv: list[str] | None = None) -> int:
    return run_job("python -m jobs.lm", __doc__, "language-model job YAML (see jobs/configs/lm_*.yaml)", _lm, argv)


if __name__ == "__main__":
    sys.exit(main())
