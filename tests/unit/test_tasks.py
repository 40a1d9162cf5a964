"""Tasks: the head, the targets, the predictions and the metrics, against scikit-learn's."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, log_loss, mean_absolute_error, r2_score, roc_auc_score

from runtime.errors import ConfigError
from runtime.tasks import TASKS, Head, Predictions, roc_auc, task_for


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auc_matches_sklearn_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 500)
    scores = np.round(rng.random(500) + 0.3 * y, 1)  # rounding makes many ties
    assert roc_auc(scores, y) == pytest.approx(roc_auc_score(y, scores), abs=1e-12)


def test_auc_undefined_for_one_class() -> None:
    assert np.isnan(roc_auc(np.array([0.1, 0.2]), np.array([1, 1])))


def test_primary_metric_direction() -> None:
    acc, rmse = task_for("binary").primary_metric(), task_for("regression").primary_metric()
    assert (acc.name, rmse.name) == ("holdout_accuracy", "holdout_rmse")
    assert acc.better(0.8, 0.7) and not acc.better(0.7, 0.7)
    assert rmse.better(1.0, 2.0) and not rmse.better(2.0, 1.0)
    assert task_for("regression").metric("valid_r2").higher_is_better
    assert not task_for("multiclass").metric("valid_loss").higher_is_better
    with pytest.raises(ConfigError, match="not one of task 'binary'"):
        task_for("binary").metric("valid_rmse")


def test_unknown_task_names_the_known_ones() -> None:
    with pytest.raises(
        ConfigError,
        match=r"task 'binry' is not one of 'binary', 'multiclass', 'regression' \(did you mean 'binary'\?\)",
    ):
        task_for("binry")
    assert set(TASKS) == {"binary", "multiclass", "regression"}


def test_regression_metrics_match_sklearn_and_add_up_over_batches() -> None:
    rng = np.random.default_rng(0)
    y = rng.normal(50, 10, 1000)
    outputs = ((y - 50) / 10 + rng.normal(0, 0.5, 1000))[:, None].astype(np.float32)
    task, head = task_for("regression"), Head(None, (50.0, 10.0))
    preds = task.predict(outputs, head)
    whole = task.accumulator()
    whole.add(preds, y)
    parts = task.accumulator()
    for start in range(0, 1000, 137):
        parts.add(preds.slice(start, start + 137), y[start : start + 137])
    got = whole.result()
    assert got == pytest.approx(parts.result(), rel=1e-12)
    p = np.asarray(preds.values)
    assert got["r2"] == pytest.approx(r2_score(y, p), rel=1e-9)
    assert got["mae"] == pytest.approx(mean_absolute_error(y, p), rel=1e-9)
    assert got["rmse"] == pytest.approx(np.sqrt(np.mean((y - p) ** 2)), rel=1e-9)
    # the targets the loss sees are the standardized labels
    assert np.allclose(task.targets(y, head).numpy()[:, 0], (y - 50) / 10, atol=1e-5)


@pytest.mark.parametrize("name", ["binary", "multiclass"])
def test_classification_metrics_match_sklearn(name: str) -> None:
    rng = np.random.default_rng(1)
    classes = (0, 1) if name == "binary" else ("a", "b", "c")
    task = task_for(name)
    head = Head(classes)
    outputs = rng.normal(size=(400, task.output_dim(classes))).astype(np.float32)
    y = rng.integers(0, len(classes), 400)
    preds = task.predict(outputs, head)
    assert preds.probabilities is not None and preds.probabilities.shape == (400, len(classes))
    assert np.allclose(preds.probabilities.sum(axis=1), 1.0, atol=1e-6)
    acc = task.accumulator()
    acc.add(preds, y)
    got = acc.result()
    assert got["accuracy"] == pytest.approx(accuracy_score(y, preds.probabilities.argmax(axis=1)))
    assert got["log_loss"] == pytest.approx(
        log_loss(y, preds.probabilities, labels=list(range(len(classes)))), rel=1e-5
    )
    assert [classes.index(v) for v in preds.values] == list(preds.probabilities.argmax(axis=1))
    if name == "binary":
        assert got["auc"] == pytest.approx(roc_auc_score(y, preds.probabilities[:, 1]))


def test_predictions_slice_and_json() -> None:
    preds = Predictions([0, 1, 1], np.array([[0.9, 0.1], [0.2, 0.8], [0.4, 0.6]], np.float32), [0, 1])
    assert preds.slice(1, 3).values == [1, 1] and len(preds.slice(1, 3)) == 2
    assert preds.to_json()["classes"] == [0, 1]
