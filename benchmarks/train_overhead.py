"""Ray Train overhead vs a plain PyTorch loop.

Same model, same data, same per-step work on the training process (a batch of feature arrays
-> forward/backward/step: in the Ray job the shared transform is a Ray Data stage ahead of the
worker, so the plain loop gets its features computed ahead too), same torch thread count, in
one run:

steady-state seconds per step: skewless's Ray Train job (1 worker, its real worker loop, timed
by a step-end callback) vs a plain loop in this process; prints the ratio. (The data stage's
own throughput against one process is ``ingest_bench.py``.)

    python benchmarks/train_overhead.py [--rows 200000] [--out ...json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import pyarrow.parquet as pq

from runtime.training import Callback, LoopState

WARMUP = 20
# (batch size, hidden widths): a small step where fixed per-step costs show, and a larger one.
SIZES = [(256, [256, 256]), (1024, [1024, 1024])]


class StepTimer(Callback):
    """Rank 0 appends the wall time of each step end to a file."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_step_end(self, state: LoopState) -> None:
        if state.rank == 0:
            with open(self.path, "a") as f:
                f.write(f"{time.perf_counter()}\n")


def steady_step_s(stamps: list[float]) -> float:
    gaps = [b - a for a, b in zip(stamps[WARMUP:], stamps[WARMUP + 1 :], strict=False)]
    return statistics.median(gaps)


def plain_loop(
    table: Any, prep: Any, steps: int, threads: int, batch_size: int, hidden: list[int], inline: bool = False
) -> float:
    """Median step of a plain loop. ``inline=False``: features computed ahead (the same work
    the Ray worker does per step: the strict overhead baseline); ``inline=True``: the loop
    transforms each batch itself, as a hand-written loop without a data pipeline would."""
    import torch

    from runtime.models import build_model
    from runtime.preprocessing import features_and_labels
    from runtime.tasks import Head
    from runtime.training import TabularObjective, train_step

    cpu = torch.device("cpu")

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_model({"architecture": "mlp", "input_dim": prep.output_dim, "output_dim": 1, "hidden": hidden})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    state = LoopState(
        rank=0, world_size=1, epochs=1, batch_size=batch_size, micro_batch_size=batch_size, model=model, optimizer=opt
    )
    objective = TabularObjective("binary", Head((0, 1)))
    stamps = []
    rng = np.random.default_rng(0)
    n = table.num_rows
    features = None if inline else features_and_labels(prep, table)  # what the Ray pipeline does ahead
    window = batch_size * 8  # the Ray loop's local shuffle buffer: a random take from 8 batches' rows
    for i in range(steps):
        start = (i * batch_size) % (n - window)
        rows = start + rng.integers(0, window, batch_size)
        if features is None:
            batch = features_and_labels(prep, table.take(rows))
        else:
            batch = {k: v[rows] for k, v in features.items()}
        train_step(state, batch, objective, cpu)
        stamps.append(time.perf_counter())
    return steady_step_s(stamps)


def ray_train(data: Path, workdir: Path, batch_size: int, hidden: list[int]) -> tuple[float, int]:
    from runtime.data import synthetic_feature_spec
    from runtime.training import TrainJobConfig, run_training

    stamps_path = workdir / f"stamps-{batch_size}.txt"
    cfg = TrainJobConfig.model_validate(
        {
            "data": {"path": str(data), "test_fraction": 0.05, "validation_fraction": 0.05, "ingest": "stream"},
            "features": synthetic_feature_spec(),
            "model": {"hidden": hidden},
            "training": {"epochs": 1, "batch_size": batch_size, "num_workers": 1},
            "registry": {"model_name": "bench-train-overhead", "promote": False},
        }
    )
    run_training(
        cfg, progress=lambda m: None, callbacks=[StepTimer(str(stamps_path))], storage_path=str(workdir / "results")
    )
    stamps = [float(x) for x in stamps_path.read_text().split()]
    return steady_step_s(stamps), len(stamps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rows", type=int, default=200_000, help="rows of the training-step dataset")
    parser.add_argument("--out", default="benchmarks/results/train_overhead.json")
    args = parser.parse_args()

    from runtime.connect import connect
    from runtime.data import SyntheticConfig, generate_synthetic, synthetic_feature_spec
    from runtime.preprocessing import FeatureSpec, fit

    os.environ.setdefault("SKEWLESS_HOME", tempfile.mkdtemp(prefix="skewless-bench-"))
    work = Path(tempfile.mkdtemp(prefix="train-overhead-"))
    data = Path(generate_synthetic(work / "d.parquet", SyntheticConfig(rows=args.rows, seed=1)))
    table = pq.read_table(data)
    prep = fit(FeatureSpec.model_validate(synthetic_feature_spec()), table)

    connect()
    threads = 1  # Ray sets OMP_NUM_THREADS=1 for a 1-CPU worker; the baseline matches it
    steps_results = []
    for batch_size, hidden in SIZES:
        ray_step, steps = ray_train(data, work, batch_size, hidden)
        plain_step = plain_loop(table, prep, steps, threads, batch_size, hidden)
        inline_step = plain_loop(table, prep, steps, threads, batch_size, hidden, inline=True)
        steps_results.append(
            {
                "batch_size": batch_size,
                "hidden": hidden,
                "steps": steps,
                "plain_pytorch_step_ms": plain_step * 1e3,
                "plain_pytorch_inline_transform_step_ms": inline_step * 1e3,
                "ray_train_step_ms": ray_step * 1e3,
                "ray_train_over_plain": ray_step / plain_step,
                "ray_train_over_plain_inline_transform": ray_step / inline_step,
            }
        )
        print(
            f"steady-state step (batch {batch_size}, hidden {hidden}): Ray Train {ray_step * 1e3:.2f} ms; "
            f"plain PyTorch, features ahead {plain_step * 1e3:.2f} ms -> ratio {ray_step / plain_step:.3f} "
            f"(target <= 1.05); plain PyTorch transforming inline {inline_step * 1e3:.2f} ms -> ratio "
            f"{ray_step / inline_step:.3f}"
        )
    result = {
        "benchmark": "train_overhead",
        "rows": args.rows,
        "torch_threads": threads,
        "step_time": steps_results,
        "machine": {"cpu_count": os.cpu_count(), "python": platform.python_version()},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
