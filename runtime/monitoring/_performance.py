"""A classifier's performance before its labels arrive (CBPE), and once they have.

Confidence-based performance estimation (NannyML's CBPE): if the model's scores, once
calibrated, are the probability that a row is positive (that its top class is right), then the
expected number of correct predictions in a window is the sum of those probabilities, and the
expected ROC curve follows by counting each row as ``p`` of a positive and ``1 - p`` of a
negative. No label is needed, only a :class:`Calibration` fitted on the holdout's scores and
labels.

What CBPE assumes, and where it breaks:

- **the calibration still holds on the live window**: ``P(y | score)`` is what it was on the
  holdout. Covariate shift (the inputs move, the relation of label to input does not) keeps
  it, and CBPE then tracks the accuracy the shift costs;
- **no concept drift**: when the label's relation to the inputs changes, the scores look the
  same and the estimate stays where it was while the realised accuracy falls. Only labels
  (:func:`realised_performance`) see that, so the estimate is a stand-in until they come;
- the calibration was fitted on rows the model did not train on (training rows are
  over-confident), and enough of them: :meth:`Calibration.fit` refuses fewer than
  :data:`MIN_CALIBRATION_ROWS`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any, ClassVar

import numpy as np
from numpy.typing import ArrayLike

from runtime.errors import ConfigError, DataError
from runtime.tasks import Predictions, task_for

MIN_CALIBRATION_ROWS = 50
_ROUNDING = 1e-6  # float32 probabilities may stray this far past 0 or 1
POSITIVE = "positive"  # the score is P(positive class): binary classifiers
TOP_CLASS = "top_class"  # the score is the top class's probability, the event "top class right": multiclass


@dataclass(frozen=True)
class Calibration:
    """An isotonic map from a classifier's score to the observed rate of its event.

    Fitted by isotonic regression (pool adjacent violators; SciPy's ``isotonic_regression``)
    of 0/1 outcomes on scores, and kept as the ends of its steps: ``x`` the scores where a step
    starts and ends, ``y`` the rate on it (a step holding one score keeps one point, equal
    consecutive rates are one step). :meth:`apply` interpolates between them (flat on a step,
    linear across the gap between two steps, flat beyond either end), as scikit-learn's
    ``IsotonicRegression`` does.

    ``score`` says what was calibrated. Binary (``"positive"``): the positive class's
    probability (column 1) against "the label is the positive class". Multiclass
    (``"top_class"``): one calibration of the top class's probability (the row's max) against
    "the top class was right", not one per class; it estimates accuracy, which is all a
    multiclass window needs. :meth:`fit_probabilities` picks the right one.
    """

    x: tuple[float, ...]
    y: tuple[float, ...]
    rows: int
    score: str = POSITIVE

    SCORES: ClassVar[tuple[str, ...]] = (POSITIVE, TOP_CLASS)

    def __post_init__(self) -> None:
        if self.score not in self.SCORES:
            raise ConfigError(f"calibration score ({self.score!r}) must be one of {list(self.SCORES)}")
        if not self.x or len(self.x) != len(self.y):
            raise ConfigError(
                f"calibration needs as many x as y breakpoints, >= 1 (got {len(self.x)} and {len(self.y)})"
            )
        if any(b < a for a, b in pairwise(self.x)) or any(b < a for a, b in pairwise(self.y)):
            raise ConfigError("calibration breakpoints must be non-decreasing in x and in y (an isotonic map)")
        if not all(0.0 <= v <= 1.0 for v in self.y):
            raise ConfigError(f"calibration rates (y) must lie in [0, 1], got {min(self.y)}..{max(self.y)}")

    @classmethod
    def fit(cls, scores: ArrayLike, labels: ArrayLike, *, score: str = POSITIVE) -> Calibration:
        """Fit on holdout ``scores`` and their 0/1 (or boolean) outcomes.

        Needs at least :data:`MIN_CALIBRATION_ROWS` rows and both outcomes; rows with the same
        score are pooled first, so ties get one rate.
        """
        s = _vector(scores, "scores")
        labels_array = np.asarray(labels)
        if labels_array.ndim != 1 or len(labels_array) != len(s):
            raise DataError(
                f"calibration labels must be one per score: {labels_array.shape} labels for {len(s)} scores"
            )
        if len(labels_array) and not np.isin(labels_array, (0, 1)).all():
            bad = labels_array[~np.isin(labels_array, (0, 1))][0]
            raise DataError(f"calibration labels must be 0/1 outcomes, found {bad!r}")
        y = labels_array.astype(np.float64)
        if len(s) < MIN_CALIBRATION_ROWS:
            raise DataError(
                f"calibration needs >= {MIN_CALIBRATION_ROWS} holdout rows, got {len(s)}: "
                "fit it on a larger holdout (rows the model did not train on)"
            )
        if y.min() == y.max():
            raise DataError(
                f"calibration needs both outcomes, all {len(s)} holdout labels are {int(y[0])}: "
                "an isotonic map from one outcome is a constant; use a holdout with both"
            )
        from scipy.optimize import isotonic_regression  # SciPy >= 1.12

        unique, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
        rates = np.bincount(inverse, weights=y) / counts
        fitted = isotonic_regression(rates, weights=counts.astype(np.float64), increasing=True).x
        return cls(*_breakpoints(unique, np.clip(fitted, 0.0, 1.0)), rows=len(s), score=score)

    @classmethod
    def fit_probabilities(cls, probabilities: ArrayLike, labels: ArrayLike) -> Calibration:
        """Fit on a classifier's holdout probabilities ``(n, classes)`` and its labels as class
        indices (0..classes-1, the columns' order): the positive class's probability for two
        classes, the top class's for more."""
        probs = _probabilities(probabilities, None)
        idx = np.asarray(labels)
        if idx.shape != (len(probs),) or not np.issubdtype(idx.dtype, np.integer):
            raise DataError(
                f"labels must be one class index per row: got {idx.shape} {idx.dtype} for {len(probs)} rows"
            )
        if len(idx) and (idx.min() < 0 or idx.max() >= probs.shape[1]):
            bad = idx[(idx < 0) | (idx >= probs.shape[1])][0]
            raise DataError(f"label index {bad} is not a column of the {probs.shape[1]} class probabilities")
        if probs.shape[1] == 2:
            return cls.fit(probs[:, 1], idx == 1, score=POSITIVE)
        return cls.fit(probs.max(axis=1), probs.argmax(axis=1) == idx, score=TOP_CLASS)

    def apply(self, scores: ArrayLike) -> np.ndarray:
        """The calibrated rate of each score, in [0, 1]."""
        s = np.asarray(scores, dtype=np.float64)
        return np.clip(np.interp(s, self.x, self.y), 0.0, 1.0)

    def to_dict(self) -> dict[str, Any]:
        return {"score": self.score, "rows": self.rows, "x": list(self.x), "y": list(self.y)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Calibration:
        try:
            return cls(
                tuple(float(v) for v in data["x"]),
                tuple(float(v) for v in data["y"]),
                int(data["rows"]),
                str(data.get("score", POSITIVE)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"not a calibration (keys score, rows, x, y): {exc!r}") from None


def estimate_performance(
    probabilities: ArrayLike, classes: Sequence[Any], calibration: Calibration | None
) -> dict[str, float]:
    """A classifier's expected accuracy (and ROC AUC, binary) on a window without labels.

    ``probabilities`` is ``(rows, len(classes))`` as the model served them; the prediction is
    their argmax (what :mod:`runtime.tasks` serves). With ``calibration=None`` the scores are
    taken as calibrated already. Binary: ``p`` is the calibrated positive probability, a row is
    right with probability ``p`` when it was predicted positive and ``1 - p`` otherwise, and
    the expected ROC curve ranks rows by the model's score (as the realised AUC does) with
    expected TPR(t) = sum of ``p`` over scores >= t / sum of ``p`` and FPR(t) likewise with
    ``1 - p``; AUC by trapezoids, tied scores one step. Multiclass: the mean calibrated
    top-class probability. Keys ``accuracy``, ``auc`` (binary; NaN when every ``p`` is 0 or
    every one is 1), ``rows``. See the module docstring for what this assumes.
    """
    probs = _probabilities(probabilities, classes)
    binary = probs.shape[1] == 2
    expected = POSITIVE if binary else TOP_CLASS
    if calibration is not None and calibration.score != expected:
        raise ConfigError(
            f"calibration of the {calibration.score!r} score cannot estimate a {len(classes)}-class model, "
            f"which needs one of the {expected!r} score: fit it with Calibration.fit_probabilities"
        )
    calibrate = calibration.apply if calibration is not None else (lambda s: np.clip(s, 0.0, 1.0))
    if not binary:
        return {"accuracy": float(calibrate(probs.max(axis=1)).mean()), "rows": float(len(probs))}
    score = probs[:, 1]
    p = calibrate(score)
    predicted_positive = probs.argmax(axis=1) == 1
    accuracy = float(np.where(predicted_positive, p, 1.0 - p).mean())
    return {"accuracy": accuracy, "auc": expected_auc(score, p), "rows": float(len(probs))}


def expected_auc(score: np.ndarray, p: np.ndarray) -> float:
    """ROC AUC expected when row ``i`` ranked by ``score`` is positive with probability ``p[i]``.

    With ``p`` the true 0/1 labels this is the realised AUC (ties counted half, as
    :func:`runtime.tasks.roc_auc`)."""
    order = np.argsort(-score, kind="mergesort")
    s, q = score[order], p[order]
    ends = np.append(np.flatnonzero(s[1:] != s[:-1]), len(s) - 1)  # the last row of each tied group
    tp, fp = np.cumsum(q)[ends], np.cumsum(1.0 - q)[ends]
    if tp[-1] <= 0 or fp[-1] <= 0:
        return float("nan")
    tpr = np.concatenate(([0.0], tp / tp[-1]))
    fpr = np.concatenate(([0.0], fp / fp[-1]))
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0))


def realised_performance(
    kind: str,
    predictions: ArrayLike,
    labels: ArrayLike,
    probabilities: ArrayLike | None = None,
    *,
    classes: Sequence[Any] | None = None,
) -> dict[str, float]:
    """The performance measured once labels arrived, with the training holdout's definitions.

    ``kind`` is a task's name (``binary``, ``multiclass``, ``regression``; :data:`runtime.tasks.TASKS`).
    Classification: ``accuracy`` of the served ``predictions`` against ``labels``, and for a
    binary task with ``probabilities`` ``(n, 2)`` the ``auc`` of column 1 (rank formula, ties
    half) when both classes are present; the positive class is ``classes[1]`` (the
    probabilities' column order), or ``1``/``True`` when ``classes`` is not given.
    Regression: ``rmse``, ``mae`` and ``r2`` as :class:`runtime.tasks.RegressionTask` computes
    them. Always ``rows``.
    """
    task = task_for(kind)
    preds = np.asarray(predictions)
    truth = np.asarray(labels)
    if preds.ndim != 1 or truth.shape != preds.shape:
        raise DataError(f"predictions and labels must be 1-D and as long: {preds.shape} and {truth.shape}")
    if not len(truth):
        raise DataError("no labelled rows: realised performance needs at least one label")
    if not task.classification:
        values, y = _vector(preds, "predictions"), _vector(truth, "labels")
        sums = task.metric_sums(Predictions(values.tolist(), None, None), y)
        return {**task.metrics_from_sums(sums), "rows": float(len(y))}
    out = {"accuracy": float(np.mean(preds == truth)), "rows": float(len(truth))}
    if probabilities is not None:
        probs = _probabilities(probabilities, classes)
        if len(probs) != len(truth):
            raise DataError(f"probabilities have {len(probs)} rows for {len(truth)} labels")
        score = task.ranked_score(Predictions(preds.tolist(), probs, list(classes or ())))
        if score is not None:
            auc = task.ranked_metrics(score.astype(np.float64), _positives(truth, classes)).get("auc", math.nan)
            if not math.isnan(auc):
                out["auc"] = auc
    return out


def _positives(truth: np.ndarray, classes: Sequence[Any] | None) -> np.ndarray:
    if classes is not None:
        if len(classes) != 2:
            raise ConfigError(f"a binary task has 2 classes, got classes={list(classes)!r}")
        return truth == classes[1]
    if not np.isin(truth, (0, 1)).all():
        raise ConfigError(
            f"labels are {truth[~np.isin(truth, (0, 1))][0]!r}, not 0/1: pass classes= (the probabilities' "
            "column order) to say which is the positive class"
        )
    return truth.astype(bool)


def _breakpoints(x: np.ndarray, y: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The first and last x of each run of equal y (one point when they coincide)."""
    starts = np.flatnonzero(np.r_[True, y[1:] != y[:-1]])
    ends = np.r_[starts[1:] - 1, len(y) - 1]
    keep = np.unique(np.concatenate((starts, ends)))
    return tuple(float(v) for v in x[keep]), tuple(float(v) for v in y[keep])


def _vector(values: ArrayLike, what: str) -> np.ndarray:
    try:
        v = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise DataError(f"{what} must be numbers") from None
    if v.ndim != 1:
        raise DataError(f"{what} must be one value per row, got shape {v.shape}")
    if not np.isfinite(v).all():
        raise DataError(
            f"{what} must be finite: row {int(np.flatnonzero(~np.isfinite(v))[0])} is {v[~np.isfinite(v)][0]}"
        )
    return v


def _probabilities(probabilities: ArrayLike, classes: Sequence[Any] | None) -> np.ndarray:
    probs = np.asarray(probabilities, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] < 2:
        raise DataError(f"probabilities must be (rows, classes) with >= 2 classes, got shape {probs.shape}")
    if classes is not None and probs.shape[1] != len(classes):
        raise DataError(f"probabilities have {probs.shape[1]} columns for {len(classes)} classes {list(classes)!r}")
    if not len(probs):
        raise DataError("no rows: performance needs at least one prediction")
    if not np.isfinite(probs).all() or probs.min() < -_ROUNDING or probs.max() > 1.0 + _ROUNDING:
        raise DataError("probabilities must be finite and in [0, 1]")
    return np.clip(probs, 0.0, 1.0)
