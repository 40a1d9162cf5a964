"""Tasks: what a label means, from the loss to the served prediction and the metrics.

A task is one :class:`Task` object in :data:`TASKS`; nothing else in skewless branches on the
task's name. It decides:

- the **output head**: how many outputs the model has (:meth:`Task.output_dim`);
- the **targets** and the **loss**: the encoded labels the training step compares the outputs
  with (regression standardizes them with the fit-time mean and std, :meth:`Task.target_scale`),
  and a summed loss;
- the **predictions**: raw outputs to labels, probabilities or values (:meth:`Task.predict`),
  the same function offline, in the holdout evaluation and in a Serve replica;
- the **metrics** (:meth:`Task.accumulator`): additive sums that add up across batches and
  ranks, the primary metric and its direction (which model is better), and the prediction
  buckets serving counts for drift.

Adding a task is one subclass and one entry in :data:`TASKS` (see the README's development
section). This module imports numpy only; torch is imported inside the loss and targets.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from runtime.errors import ConfigError

__all__ = [
    "PROBABILITY_BUCKETS",
    "TASKS",
    "Z_GRID",
    "BinaryTask",
    "Head",
    "Metric",
    "MetricAccumulator",
    "MulticlassTask",
    "Predictions",
    "RegressionTask",
    "Task",
    "roc_auc",
    "task_for",
]

PROBABILITY_BUCKETS = tuple(round(0.1 * i, 1) for i in range(11))  # 0.0 .. 1.0
Z_GRID = (-3.0, -2.0, -1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0, 3.0)  # in fit-time standard deviations


@dataclass(frozen=True)
class Predictions:
    """Model outputs for a batch of rows.

    ``values`` are the predicted labels (classification) or values (regression);
    ``probabilities`` is ``(n, len(classes))`` float32 for classification, else None.
    """

    values: list[Any]
    probabilities: np.ndarray | None
    classes: list[Any] | None

    def __len__(self) -> int:
        return len(self.values)

    def slice(self, start: int, stop: int) -> Predictions:
        """Rows ``start:stop`` (to answer each request of a batched model call)."""
        probs = None if self.probabilities is None else self.probabilities[start:stop]
        return Predictions(self.values[start:stop], probs, self.classes)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"predictions": self.values}
        if self.probabilities is not None:
            out["probabilities"] = self.probabilities.tolist()
            out["classes"] = self.classes
        return out


@dataclass(frozen=True)
class Head:
    """What a fitted model knows about its outputs: the classes, or the target's scale."""

    classes: tuple[Any, ...] | None = None
    target_scale: tuple[float, float] = (0.0, 1.0)  # (mean, std) of the training target

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Head:
        """From a packaged model's ``model.json`` (keys ``classes``, ``target_scale``)."""
        classes = config.get("classes")
        mean, std = config.get("target_scale") or (0.0, 1.0)
        return cls(tuple(classes) if classes is not None else None, (float(mean), float(std)))


@dataclass(frozen=True)
class Metric:
    """A metric and its direction: which of two values is the better model."""

    name: str
    higher_is_better: bool

    def better(self, candidate: float, incumbent: float) -> bool:
        return candidate > incumbent if self.higher_is_better else candidate < incumbent


class MetricAccumulator:
    """Metrics over batches: :meth:`add` each batch, :meth:`result` at the end.

    :meth:`sums` are additive (they add up across batches and across ranks, so a distributed
    evaluation all-reduces them and calls :meth:`result` with the total). Metrics that need
    every row together (binary AUC) are computed only from the rows this accumulator saw,
    when ``ranked`` is true.
    """

    def __init__(self, task: Task, ranked: bool = True) -> None:
        self.task = task
        self.ranked = ranked
        self._sums: dict[str, float] = {}
        self._scores: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []

    def add(self, preds: Predictions, labels: np.ndarray) -> None:
        if len(labels) == 0:
            return
        for key, value in self.task.metric_sums(preds, labels).items():
            self._sums[key] = self._sums.get(key, 0.0) + value
        if self.ranked and self.task.ranked_score(preds) is not None:
            self._scores.append(self.task.ranked_score(preds))  # type: ignore[arg-type]
            self._labels.append(np.asarray(labels, dtype=np.int8))

    def sums(self) -> dict[str, float]:
        return {"rows": 0.0, **self._sums}

    def result(self, sums: dict[str, float] | None = None) -> dict[str, float]:
        """Metric values (names without a prefix) from ``sums`` (default: this one's own)."""
        totals = self.sums() if sums is None else sums
        metrics = self.task.metrics_from_sums(totals)
        if self.ranked and self._scores and sums is None:
            metrics.update(self.task.ranked_metrics(np.concatenate(self._scores), np.concatenate(self._labels)))
        return metrics


class Task:
    """One kind of label. Subclasses set the class attributes and the methods below."""

    name: ClassVar[str]
    classification: ClassVar[bool]  # labels are classes (a fitted vocabulary), not numbers
    max_classes: ClassVar[int | None] = None
    # metric name (no prefix) -> higher is better
    metric_directions: ClassVar[dict[str, bool]]
    primary: ClassVar[str]
    # the additive sums :meth:`metric_sums` returns (a fixed list: ranks all-reduce them in order)
    sum_keys: ClassVar[tuple[str, ...]]
    # metrics that need every row at once (not from sums): holdout only, never per epoch
    ranked: ClassVar[frozenset[str]] = frozenset()

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    # ------------------------------------------------------------ the head and the loss

    def output_dim(self, classes: Sequence[Any] | None) -> int:
        return 1

    def target_scale(self, labels: np.ndarray) -> tuple[float, float]:
        """(mean, std) the training targets are standardized with; identity by default."""
        return (0.0, 1.0)

    def loss(self) -> Any:
        """A torch loss with ``reduction="sum"`` over (outputs, targets)."""
        raise NotImplementedError

    def targets(self, labels: np.ndarray, head: Head) -> Any:
        """The encoded labels as the tensor the loss compares the outputs with."""
        raise NotImplementedError

    # ------------------------------------------------------------ predictions

    def predict(self, outputs: np.ndarray, head: Head) -> Predictions:
        """Raw model outputs ``(rows, output_dim)`` to predictions."""
        raise NotImplementedError

    def prediction_buckets(self, head: Head) -> tuple[float, ...]:
        """Bounds serving counts the predictions in (class probabilities by default)."""
        return PROBABILITY_BUCKETS

    def prediction_outputs(self, preds: Predictions) -> list[tuple[str, np.ndarray]]:
        """The served quantities whose distribution is monitored: (name, values) pairs."""
        assert preds.probabilities is not None and preds.classes is not None
        return [(str(c), preds.probabilities[:, i]) for i, c in enumerate(preds.classes)]

    # ------------------------------------------------------------ metrics

    def metric(self, name: str) -> Metric:
        """The direction of a metric, with or without a split prefix (``valid_``, ``holdout_``)."""
        base = name.split("_", 1)[1] if name.split("_", 1)[0] in ("valid", "holdout", "train") else name
        if base == "loss":
            return Metric(name, higher_is_better=False)
        if base not in self.metric_directions:
            known = ["loss", *self.metric_directions]
            raise ConfigError(f"metric {name!r} is not one of task {self.name!r}'s: {', '.join(known)}")
        return Metric(name, self.metric_directions[base])

    def primary_metric(self, prefix: str = "holdout_") -> Metric:
        """The metric that decides which of two models is better (champion vs candidate)."""
        return self.metric(prefix + self.primary)

    def accumulator(self, ranked: bool = True) -> MetricAccumulator:
        return MetricAccumulator(self, ranked)

    def additive_metrics(self) -> list[str]:
        """The metrics computed from sums (what a distributed validation pass can report)."""
        return [m for m in self.metric_directions if m not in self.ranked]

    def metric_sums(self, preds: Predictions, labels: np.ndarray) -> dict[str, float]:
        raise NotImplementedError

    def metrics_from_sums(self, sums: dict[str, float]) -> dict[str, float]:
        raise NotImplementedError

    def ranked_score(self, preds: Predictions) -> np.ndarray | None:
        """A per-row score for metrics that need every row at once (None: no such metric)."""
        return None

    def ranked_metrics(self, scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        return {}


class _Classification(Task):
    classification = True
    metric_directions: ClassVar[dict[str, bool]] = {"accuracy": True, "log_loss": False}
    primary = "accuracy"
    sum_keys = ("rows", "correct", "log_loss")

    def targets(self, labels: np.ndarray, head: Head) -> Any:
        import torch

        return torch.from_numpy(labels.astype(np.int64))

    def _predictions(self, probs: np.ndarray, head: Head) -> Predictions:
        assert head.classes is not None, "a classifier's head has its classes"
        idx = probs.argmax(axis=1)
        classes = list(head.classes)
        return Predictions([classes[i] for i in idx], probs, classes)

    def metric_sums(self, preds: Predictions, labels: np.ndarray) -> dict[str, float]:
        assert preds.probabilities is not None
        idx = np.asarray(labels).astype(np.int64)
        probs = preds.probabilities.astype(np.float64)
        picked = np.clip(probs[np.arange(len(idx)), idx], 1e-12, 1.0)
        return {
            "rows": float(len(idx)),
            "correct": float(np.sum(probs.argmax(axis=1) == idx)),
            "log_loss": float(-np.sum(np.log(picked))),
        }

    def metrics_from_sums(self, sums: dict[str, float]) -> dict[str, float]:
        n = sums.get("rows", 0.0)
        if not n:  # no rows: no metric (NaN), never a perfect score
            return {"accuracy": float("nan"), "log_loss": float("nan")}
        return {"accuracy": sums.get("correct", 0.0) / n, "log_loss": sums.get("log_loss", 0.0) / n}


class BinaryTask(_Classification):
    """Two classes; one logit; sigmoid probabilities; accuracy, log loss and ROC AUC."""

    name = "binary"
    max_classes = 2
    metric_directions: ClassVar[dict[str, bool]] = {**_Classification.metric_directions, "auc": True}
    ranked = frozenset({"auc"})

    def loss(self) -> Any:
        from torch import nn

        return nn.BCEWithLogitsLoss(reduction="sum")

    def targets(self, labels: np.ndarray, head: Head) -> Any:
        import torch

        return torch.from_numpy(labels.astype(np.float32)).unsqueeze(1)

    def predict(self, outputs: np.ndarray, head: Head) -> Predictions:
        p1 = 1.0 / (1.0 + np.exp(-outputs[:, 0].astype(np.float64)))
        return self._predictions(np.stack([1.0 - p1, p1], axis=1).astype(np.float32), head)

    def prediction_outputs(self, preds: Predictions) -> list[tuple[str, np.ndarray]]:
        assert preds.probabilities is not None and preds.classes is not None
        return [(str(preds.classes[1]), preds.probabilities[:, 1])]  # the positive class only

    def ranked_score(self, preds: Predictions) -> np.ndarray | None:
        assert preds.probabilities is not None
        return preds.probabilities[:, 1].astype(np.float32)

    def ranked_metrics(self, scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        return {"auc": roc_auc(scores, labels)}


class MulticlassTask(_Classification):
    """Three or more classes; one logit per class; softmax probabilities."""

    name = "multiclass"

    def output_dim(self, classes: Sequence[Any] | None) -> int:
        if not classes or len(classes) < 2:
            raise ConfigError(f"a multiclass label needs >= 2 classes, the fit table has {len(classes or [])}")
        return len(classes)

    def loss(self) -> Any:
        from torch import nn

        return nn.CrossEntropyLoss(reduction="sum")

    def predict(self, outputs: np.ndarray, head: Head) -> Predictions:
        shifted = outputs.astype(np.float64) - outputs.max(axis=1, keepdims=True)
        e = np.exp(shifted)
        return self._predictions((e / e.sum(axis=1, keepdims=True)).astype(np.float32), head)


class RegressionTask(Task):
    """A number; the model predicts the standardized target; RMSE, MAE and R²."""

    name = "regression"
    classification = False
    metric_directions: ClassVar[dict[str, bool]] = {"rmse": False, "mae": False, "r2": True}
    primary = "rmse"
    sum_keys = ("rows", "sq_err", "abs_err", "y", "y2")

    def target_scale(self, labels: np.ndarray) -> tuple[float, float]:
        y = np.asarray(labels, dtype=np.float64)
        return (float(y.mean()), float(y.std() or 1.0))

    def loss(self) -> Any:
        from torch import nn

        return nn.MSELoss(reduction="sum")

    def targets(self, labels: np.ndarray, head: Head) -> Any:
        import torch

        mean, std = head.target_scale
        y = (labels.astype(np.float32) - np.float32(mean)) / np.float32(std)
        return torch.from_numpy(y).unsqueeze(1)

    def predict(self, outputs: np.ndarray, head: Head) -> Predictions:
        mean, std = head.target_scale
        return Predictions((outputs[:, 0].astype(np.float64) * std + mean).tolist(), None, None)

    def prediction_buckets(self, head: Head) -> tuple[float, ...]:
        mean, std = head.target_scale
        return tuple(mean + std * z for z in Z_GRID)

    def prediction_outputs(self, preds: Predictions) -> list[tuple[str, np.ndarray]]:
        return [("value", np.asarray(preds.values, dtype=np.float64))]

    def metric_sums(self, preds: Predictions, labels: np.ndarray) -> dict[str, float]:
        y = np.asarray(labels, dtype=np.float64)
        err = np.asarray(preds.values, dtype=np.float64) - y
        return {
            "rows": float(len(y)),
            "sq_err": float(np.sum(err**2)),
            "abs_err": float(np.sum(np.abs(err))),
            "y": float(np.sum(y)),
            "y2": float(np.sum(y**2)),
        }

    def metrics_from_sums(self, sums: dict[str, float]) -> dict[str, float]:
        n = sums.get("rows", 0.0)
        if not n:  # no rows: no metric (NaN), never a perfect score
            return {"rmse": float("nan"), "mae": float("nan"), "r2": float("nan")}
        sse = sums.get("sq_err", 0.0)
        sst = sums.get("y2", 0.0) - sums.get("y", 0.0) ** 2 / n  # total sum of squares about the mean
        return {
            "rmse": float(np.sqrt(sse / n)),
            "mae": sums.get("abs_err", 0.0) / n,
            "r2": float(1.0 - sse / sst) if sst > 0 else float("nan"),
        }


def roc_auc(scores: np.ndarray, positives: np.ndarray) -> float:
    """ROC AUC by the rank statistic (ties get their average rank); NaN with one class only."""
    n_pos = int(positives.sum())
    n_neg = len(positives) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    _, first, counts = np.unique(scores[order], return_index=True, return_counts=True)
    ranks[order] = np.repeat(first + (counts - 1) / 2.0 + 1.0, counts)
    return float((ranks[positives.astype(bool)].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


TASKS: dict[str, Task] = {t.name: t for t in (BinaryTask(), MulticlassTask(), RegressionTask())}


def task_for(name: str) -> Task:
    """The task registered as ``name``; a :class:`ConfigError` naming the known ones otherwise."""
    try:
        return TASKS[name]
    except KeyError:
        close = difflib.get_close_matches(str(name), list(TASKS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"task {name!r} is not one of {', '.join(map(repr, TASKS))}{hint}") from None
