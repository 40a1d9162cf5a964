"""The tabular training job (``jobs.train``'s driver) end to end on a GPU: Ray Data -> Ray
Train workers on CUDA (bf16 autocast, the OOM guard and the memory tracker on) -> MLflow ->
a packaged model; once with one worker on the whole GPU (NCCL), once with two workers
sharing it (0.5 each, collectives over gloo)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
import pyarrow.parquet as pq
import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.integration,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from runtime.data import SyntheticConfig, generate_synthetic

    path = tmp_path_factory.mktemp("data") / "churn.parquet"
    return Path(generate_synthetic(path, SyntheticConfig(rows=20_000, seed=5)))


@pytest.mark.parametrize(("workers", "share"), [(1, 1.0), (2, 0.5)])
def test_the_tabular_job_trains_on_the_gpu(ray_session: Any, dataset: Path, workers: int, share: float) -> None:
    from runtime.data import synthetic_feature_spec
    from runtime.registry import load_model_dir
    from runtime.training import TrainJobConfig, run_training

    cfg = TrainJobConfig.model_validate(
        {
            "data": {"path": str(dataset)},
            "features": synthetic_feature_spec("binary"),
            "model": {"hidden": [256, 256]},
            "optimizer": {"lr": 3e-3},
            "training": {
                "epochs": 3,
                "batch_size": 512,
                "num_workers": workers,
                "use_gpu": True,
                "gpus_per_worker": share,
                "precision": "bf16",
                "seed": 1,
            },
            "memory": {"sample_interval_s": 0.2},
            "registry": {"model_name": f"gpu-churn-{workers}"},
        }
    )
    outcome = run_training(cfg, progress=print)
    run = mlflow.MlflowClient().get_run(outcome.run_id)
    metrics = run.data.metrics
    for rank in range(workers):
        # the tracker saw this rank's CUDA allocator: the worker trained on the GPU
        peak = metrics.get(f"mem/rank{rank}/cuda0/peak_allocated_mb")
        assert peak is not None and peak > 0, sorted(k for k in metrics if k.startswith("mem/"))
    assert run.data.params["training.use_gpu"] == "True"
    assert metrics["holdout_auc"] > 0.7, metrics  # it learned
    # the packaged model predicts the same on the CPU as the GPU-trained weights say
    model = load_model_dir(outcome.model_dir)
    raw = pq.read_table(dataset).slice(0, 100).drop_columns(["churned"])
    assert model.predict_table(raw).probabilities is not None
    print(f"{workers} worker(s) x {share} GPU: holdout AUC {metrics['holdout_auc']:.4f}; "
          + ", ".join(f"rank {r} peak {metrics[f'mem/rank{r}/cuda0/peak_allocated_mb']:.1f} MiB" for r in range(workers)))  # fmt: skip
