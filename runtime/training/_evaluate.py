"""Holdout metrics, computed on the packaged model exactly as it will be served."""

from __future__ import annotations

from collections.abc import Iterable
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


class HoldoutMetrics:
    """Holdout metrics accumulated batch by batch, so the holdout is never held whole.

    Sums are kept in float64; binary AUC keeps one float32 score and one label byte per
    row (the rank statistic needs them all).
    """

    def __init__(self, task: str) -> None:
        self.task = task
        self.rows = 0
        self._sum_sq = self._sum_abs = self._correct = self._log_loss = 0.0
        self._scores: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []

    def add(self, model: LoadedModel, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        prep = model.preprocessor
        preds = model.predict_table(table)
        self.rows += table.num_rows
        if self.task == "regression":
            err = np.asarray(preds.values, dtype=np.float64) - prep.transform_label(table).astype(np.float64)
            self._sum_sq += float(np.sum(err**2))
            self._sum_abs += float(np.sum(np.abs(err)))
            return
        assert preds.probabilities is not None
        idx = prep.transform_label(table).astype(np.int64)
        probs = preds.probabilities.astype(np.float64)
        picked = np.clip(probs[np.arange(len(idx)), idx], 1e-12, 1.0)
        self._correct += float(np.sum(probs.argmax(axis=1) == idx))
        self._log_loss -= float(np.sum(np.log(picked)))
        if self.task == "binary":
            self._scores.append(probs[:, 1].astype(np.float32))
            self._labels.append(idx.astype(np.int8))

    def result(self) -> dict[str, float]:
        n = max(self.rows, 1)
        if self.task == "regression":
            return {"holdout_rmse": float(np.sqrt(self._sum_sq / n)), "holdout_mae": self._sum_abs / n}
        metrics = {"holdout_accuracy": self._correct / n, "holdout_log_loss": self._log_loss / n}
        if self.task == "binary":
            scores = np.concatenate(self._scores) if self._scores else np.zeros(0, np.float32)
            labels = np.concatenate(self._labels) if self._labels else np.zeros(0, np.int8)
            metrics["holdout_auc"] = _auc(scores, labels)
        return metrics


def evaluate(model: LoadedModel, data: pa.Table | Iterable[pa.Table]) -> dict[str, float]:
    """Score raw holdout rows (features + label) with ``model``; keys are ``holdout_*``.

    ``data`` is a table or an iterable of tables (batches streamed from Ray Data).
    """
    acc = HoldoutMetrics(model.task)
    for batch in [data] if isinstance(data, pa.Table) else data:
        acc.add(model, batch)
    return acc.result()
