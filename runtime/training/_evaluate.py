"""Holdout metrics, computed on the packaged model exactly as it will be served."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from runtime.registry import LoadedModel


@dataclass(frozen=True)
class PrimaryMetric:
    name: str
    higher_is_better: bool

    def better(self, candidate: float, incumbent: float) -> bool:
        return candidate > incumbent if self.higher_is_better else candidate < incumbent


def primary_metric(task: str) -> PrimaryMetric:
    """The metric that decides whether a candidate replaces the champion."""
    if task == "regression":
        return PrimaryMetric("holdout_rmse", higher_is_better=False)
    return PrimaryMetric("holdout_accuracy", higher_is_better=True)


def _auc(scores: np.ndarray, positives: np.ndarray) -> float:
    """ROC AUC by the rank statistic (ties get their average rank)."""
    n_pos = int(positives.sum())
    n_neg = len(positives) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    # average ranks over ties
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[positives.astype(bool)].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def evaluate(model: LoadedModel, table: pa.Table) -> dict[str, float]:
    """Score raw holdout rows (features + label) with ``model``; keys are ``holdout_*``."""
    prep = model.preprocessor
    preds = model.predict_table(table)
    if model.task == "regression":
        y = prep.transform_label(table).astype(np.float64)
        err = np.asarray(preds.values, dtype=np.float64) - y
        return {"holdout_rmse": float(np.sqrt(np.mean(err**2))), "holdout_mae": float(np.mean(np.abs(err)))}
    assert preds.probabilities is not None
    idx = prep.transform_label(table).astype(np.int64)
    probs = preds.probabilities.astype(np.float64)
    picked = np.clip(probs[np.arange(len(idx)), idx], 1e-12, 1.0)
    metrics = {
        "holdout_accuracy": float(np.mean(probs.argmax(axis=1) == idx)),
        "holdout_log_loss": float(-np.mean(np.log(picked))),
    }
    if model.task == "binary":
        metrics["holdout_auc"] = _auc(probs[:, 1], idx)
    return metrics
