"""The shipped search, end to end: ``jobs/configs/churn_tune.yaml`` (4 trials, 2 at a time,
ASHA) on the session's real local Ray finishes; every trial is an MLflow child run with
lineage; the best trial by the *validation* metric is registered.

Before the fix this hung: a trial ASHA stopped left its Train worker group's placement group
reserved (Ray Train's cleaner asks the dashboard's state API, which was off), and the next
trials' Ray Data tasks starved for CPU."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import mlflow
import pytest

from runtime import registry
from runtime.data import SyntheticConfig, generate_synthetic
from runtime.registry import Tag
from runtime.training import run_tune

pytestmark = pytest.mark.integration
SHIPPED = Path(__file__).resolve().parents[2] / "jobs" / "configs" / "churn_tune.yaml"


def test_the_shipped_search_finishes_and_registers_the_best_trial(ray_session: Any) -> None:
    # the shipped training config reads ${SKEWLESS_HOME}/data/churn.parquet
    data = Path(os.environ["SKEWLESS_HOME"]) / "data" / "churn.parquet"
    generate_synthetic(data, SyntheticConfig(rows=6000, seed=7))
    messages: list[str] = []
    outcome = run_tune(SHIPPED, progress=messages.append)
    assert any("4 trial(s) done, 0 error(s)" in m for m in messages), messages

    parent_id = mlflow.MlflowClient().get_run(outcome.run_id).data.tags[Tag.PARENT_RUN]
    children = mlflow.search_runs(
        search_all_experiments=True, output_format="list", filter_string=f"tags.mlflow.parentRunId = '{parent_id}'"
    )
    assert len(children) == 4
    for child in children:
        assert child.data.tags[Tag.DATASET_SHA256] and child.data.tags[Tag.PREPROCESSING_FINGERPRINT]
        assert child.info.status in ("FINISHED", "KILLED")  # none left RUNNING
    finished = [c for c in children if "final_valid_loss" in c.data.metrics]
    assert finished, "at least one trial trained to the end and logged its model"
    best = min(finished, key=lambda r: r.data.metrics["final_valid_loss"])  # chosen on validation
    assert outcome.run_id == best.info.run_id
    candidate = registry.resolve("models:/churn@candidate")
    assert candidate.version == outcome.version and candidate.run_id == best.info.run_id
    assert "holdout_accuracy" in outcome.metrics  # the test split gives the final metrics
