"""Ray Tune over the real training driver: child runs with lineage, best trial registered."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
import pytest
import yaml

from runtime import registry
from runtime.data import SyntheticConfig, generate_synthetic, synthetic_feature_spec
from runtime.training._tune import run_tune

pytestmark = pytest.mark.integration


def _write(tmp_path: Path, data: Path, space: dict[str, Any]) -> Path:
    base = {
        "data": {"path": str(data)},
        "features": synthetic_feature_spec(),
        "model": {"hidden": [16]},
        "training": {"epochs": 2, "batch_size": 128, "num_workers": 1},
        "registry": {"model_name": "itest-tune"},
    }
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    tune_cfg = {
        "base": "base.yaml",
        "search_space": space,
        "num_samples": 1,
        "max_concurrent_trials": 2,
        "scheduler": {"grace_period": 1},
    }
    path = tmp_path / "tune.yaml"
    path.write_text(yaml.safe_dump(tune_cfg))
    return path


def test_tune_registers_best_trial_with_lineage(ray_session: Any, tmp_path: Path) -> None:
    data = Path(generate_synthetic(tmp_path / "d.parquet", SyntheticConfig(rows=2000, seed=6)))
    path = _write(tmp_path, data, {"optimizer.lr": {"grid": [0.0003, 0.01]}})
    outcome = run_tune(path, progress=lambda m: None)

    parent_id = mlflow.MlflowClient().get_run(outcome.run_id).data.tags["mlflow.parentRunId"]
    children = mlflow.search_runs(
        search_all_experiments=True, output_format="list", filter_string=f"tags.mlflow.parentRunId = '{parent_id}'"
    )
    assert len(children) == 2
    for child in children:
        assert child.data.tags["skewless.dataset_sha256"] and child.data.tags["skewless.preprocessing_fingerprint"]
    best = max(children, key=lambda r: r.data.metrics.get("holdout_accuracy", -1.0))
    assert outcome.run_id == best.info.run_id
    candidate = registry.resolve("models:/itest-tune@candidate")
    assert candidate.version == outcome.version and candidate.run_id == best.info.run_id
