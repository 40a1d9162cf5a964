"""Per-epoch fixed cost on small data: training from memory vs streaming, against a plain loop.

A small dataset's epoch is a few milliseconds of compute; what a Ray Train epoch costs on top
is pipeline start-up (streaming: Ray Data re-reads and re-preprocesses the files and starts a
split coordinator every epoch), the validation pass, the report and the checkpoint. In one
run, on scikit-learn's bundled diabetes data (442 rows, 10 numeric features; 309 training
rows by the hash split), 2 workers, batch 32:

- ``memory``: the preprocessed split in Ray's object store, iterated in memory each epoch;
- ``stream``: the same job with ``data.ingest: stream``;
- baseline: a plain PyTorch loop in this process over the same preprocessed rows (shuffle,
  the same steps, a validation pass), per epoch.

Prints the median epoch wall time of each (epoch end to epoch end, the first epoch left out)
and the ratios; the target for small data is under 0.3 s an epoch.

    python benchmarks/epoch_overhead.py [--epochs 12] [--out benchmarks/results/epoch_overhead.json]
"""

from __future__ import annotations

import argparse
import itertools
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

import pyarrow as pa
import pyarrow.parquet as pq

from runtime.training import Callback, LoopState

FEATURES = ["age", "sex", "bmi", "bp", "s1", "s2", "s3", "s4", "s5", "s6"]
BATCH, WORKERS = 32, 2


class EpochTimer(Callback):
    """Rank 0 appends the wall time of each epoch end to a file."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_epoch_end(self, state: LoopState) -> None:
        if state.rank == 0:
            with open(self.path, "a") as f:
                f.write(f"{time.perf_counter()}\n")


def _epoch_s(stamps: list[float]) -> float:
    return statistics.median(b - a for a, b in itertools.pairwise(stamps[1:]))  # the first epoch left out


def diabetes(path: Path) -> Path:
    from sklearn.datasets import load_diabetes

    frame = load_diabetes(as_frame=True, scaled=False).frame.rename(columns={"target": "progression"})
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), path)
    return path


def _config(data: Path, ingest: str, epochs: int) -> Any:
    from runtime.training import TrainJobConfig

    return TrainJobConfig.model_validate(
        {
            "data": {"path": str(data), "ingest": ingest},
            "features": {
                "label": {"name": "progression", "task": "regression"},
                "features": [{"name": n, "type": "numeric"} for n in FEATURES],
            },
            "model": {"hidden": [32]},
            "training": {"epochs": epochs, "batch_size": BATCH, "num_workers": WORKERS},
            "registry": {"model_name": f"bench-epoch-{ingest}", "promote": False},
        }
    )


def ray_epochs(data: Path, ingest: str, epochs: int, workdir: Path) -> tuple[float, float]:
    from runtime.training import run_training

    stamps = workdir / f"epochs-{ingest}.txt"
    t0 = time.perf_counter()
    run_training(
        _config(data, ingest, epochs),
        progress=lambda m: None,
        callbacks=[EpochTimer(str(stamps))],
        storage_path=str(workdir / "results"),
    )
    total = time.perf_counter() - t0
    return _epoch_s([float(x) for x in stamps.read_text().split()]), total


def plain_epochs(data: Path, epochs: int) -> float:
    """The same rows, model and steps in a plain loop: shuffle, train, validate, per epoch."""
    import numpy as np
    import torch

    from runtime.data import split_unit
    from runtime.models import MLPConfig, build_model
    from runtime.preprocessing import FeatureSpec, features_and_labels, fit
    from runtime.registry import model_json
    from runtime.tasks import Head, task_for
    from runtime.training import LoopState, TabularObjective, train_step

    table = pq.read_table(data)
    u = split_unit(table, [*FEATURES, "progression"], seed=0)
    train, valid = table.filter(pa.array(u >= 0.3)), table.filter(pa.array((u >= 0.2) & (u < 0.3)))
    spec = FeatureSpec.model_validate(_config(data, "memory", 1).features)
    prep = fit(spec, train)
    task = task_for("regression")
    y = prep.transform_label(train)
    head = Head(None, task.target_scale(y))
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_model(model_json(MLPConfig(hidden=[32]), prep, task, head.target_scale))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    state = LoopState(rank=0, world_size=1, epochs=epochs, batch_size=BATCH, micro_batch_size=BATCH, model=model,
                      optimizer=opt)  # fmt: skip
    objective = TabularObjective("regression", head)
    rows, held = features_and_labels(prep, train), features_and_labels(prep, valid)
    stamps = []
    for epoch in range(epochs):
        order = np.random.default_rng([0, epoch]).permutation(len(rows["y"]))
        for start in range(0, len(order), BATCH):
            idx = order[start : start + BATCH]
            train_step(state, {k: v[idx] for k, v in rows.items()}, objective, torch.device("cpu"))
        with torch.inference_mode():
            objective.eval_sums(model, held, torch.device("cpu"))
        stamps.append(time.perf_counter())
    return _epoch_s(stamps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "epoch_overhead.json"))
    args = parser.parse_args()
    os.environ.setdefault("SKEWLESS_HOME", tempfile.mkdtemp(prefix="skewless-bench-home-"))
    os.environ.setdefault("RAY_ADDRESS", "local")
    from runtime.connect import connect

    workdir = Path(tempfile.mkdtemp(prefix="skewless-epoch-bench-"))
    data = diabetes(workdir / "diabetes.parquet")
    connect(min_cpus=8)
    plain = plain_epochs(data, args.epochs)
    memory, memory_total = ray_epochs(data, "memory", args.epochs, workdir)
    stream, stream_total = ray_epochs(data, "stream", args.epochs, workdir)
    result = {
        "rows": pq.read_metadata(data).num_rows,
        "workers": WORKERS,
        "batch_size": BATCH,
        "epochs": args.epochs,
        "epoch_s": {"memory": memory, "stream": stream, "plain_loop": plain},
        "run_s": {"memory": memory_total, "stream": stream_total},
        "stream_over_memory": stream / memory,
        "memory_minus_plain_s": memory - plain,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
    }
    print(
        f"per epoch ({result['rows']} rows, {WORKERS} workers, batch {BATCH}): from memory {memory:.3f} s, "
        f"streamed {stream:.3f} s ({stream / memory:.1f}x), plain loop {plain * 1e3:.1f} ms; "
        f"fixed cost from memory {memory - plain:.3f} s (target < 0.3 s)"
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
