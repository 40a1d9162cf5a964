"""What a model saw at training, stored with it: the reference every live window is judged by.

A :class:`ModelReference` is computed once, when the model is packaged, and written into the
model directory as ``reference.json`` (listed in its manifest, so it is verified with the
weights). It holds:

- the :class:`ReferenceProfile` of the training split (a uniform sample of it: the rows the
  preprocessing was fit on, at most ``REFERENCE_ROWS``) and of the model's predictions on it;
- for a classifier, a :class:`Calibration` fitted on the holdout split, which the live
  performance estimate (CBPE) applies;
- the holdout metrics, and the CBPE estimate on the holdout: the "no degradation" level an
  estimate is compared with (comparing an estimate with a realised figure would count the
  estimator's own bias as degradation).

:func:`prediction_values` is the one definition of "the prediction" whose distribution is
monitored, used at training and in the replicas alike: the positive class's probability for a
binary classifier, the predicted class for a multiclass one, the value for a regression.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from runtime.errors import DataError
from runtime.monitoring._performance import Calibration, estimate_performance
from runtime.monitoring._profile import ReferenceProfile

if TYPE_CHECKING:
    from runtime.registry import LoadedModel
    from runtime.tasks import Predictions

REFERENCE_FILE = "reference.json"
REFERENCE_ROWS = 100_000
FORMAT_VERSION = 1


def prediction_values(task: str, preds: Predictions) -> np.ndarray:
    """The monitored prediction of each row (see the module docstring)."""
    if task == "binary":
        assert preds.probabilities is not None
        return np.asarray(preds.probabilities[:, 1], dtype=np.float64)
    if task == "multiclass":
        return np.asarray([str(v) for v in preds.values], dtype=object)
    return np.asarray(preds.values, dtype=np.float64)


def prediction_scores(task: str, preds: Predictions) -> np.ndarray | None:
    """The score CBPE works from: P(positive) for a binary classifier, the top class's
    probability for a multiclass one; None for a regression."""
    if preds.probabilities is None:
        return None
    probs = np.asarray(preds.probabilities, dtype=np.float64)
    return probs[:, 1] if task == "binary" else probs.max(axis=1)


@dataclass(frozen=True)
class ModelReference:
    """The training-time reference of one model version (see the module docstring)."""

    task: str
    classes: list[Any] | None
    features: Mapping[str, str]  # name -> "numeric" | "categorical"
    profile: ReferenceProfile
    calibration: Calibration | None = None
    holdout: Mapping[str, float] = field(default_factory=dict)  # metric -> value, no prefix
    expected: Mapping[str, float] = field(default_factory=dict)  # CBPE on the holdout
    holdout_rows: int = 0  # the rows the holdout figures are over (their sampling noise)

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": FORMAT_VERSION,
            "task": self.task,
            "classes": self.classes,
            "features": dict(self.features),
            "profile": self.profile.to_dict(),
            "calibration": None if self.calibration is None else self.calibration.to_dict(),
            "holdout": dict(self.holdout),
            "expected": dict(self.expected),
            "holdout_rows": self.holdout_rows,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, allow_nan=False)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelReference:
        if data.get("version") != FORMAT_VERSION:
            raise DataError(
                f"reference format version {data.get('version')!r} is not {FORMAT_VERSION}; retrain the model "
                "with this skewless to get a reference it can read"
            )
        try:
            calibration = data.get("calibration")
            return cls(
                task=str(data["task"]),
                classes=data.get("classes"),
                features=dict(data["features"]),
                profile=ReferenceProfile.from_dict(data["profile"]),
                calibration=None if calibration is None else Calibration.from_dict(calibration),
                holdout={k: float(v) for k, v in data.get("holdout", {}).items()},
                expected={k: float(v) for k, v in data.get("expected", {}).items()},
                holdout_rows=int(data.get("holdout_rows", 0)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"the model's reference is malformed ({exc!r}); retrain to recompute it") from exc

    def estimate(self, scores: np.ndarray) -> dict[str, float]:
        """CBPE over a live window's logged scores (see :func:`prediction_scores`): expected
        accuracy (and AUC for a binary classifier); empty for a regression or no rows."""
        scores = np.asarray(scores, dtype=np.float64)
        if self.task not in ("binary", "multiclass") or len(scores) == 0:
            return {}
        if self.task == "binary":
            probabilities = np.stack([1.0 - scores, scores], axis=1)
            return estimate_performance(probabilities, self.classes or [0, 1], self.calibration)
        confident = self.calibration.apply(scores) if self.calibration is not None else np.clip(scores, 0.0, 1.0)
        return {"accuracy": float(confident.mean()), "rows": float(len(scores))}


def model_features(model: LoadedModel) -> dict[str, str]:
    """The raw input columns a model reads, by kind (a passthrough column is numeric)."""
    assert model.preprocessor is not None
    out: dict[str, str] = {}
    for feature in model.preprocessor.spec.features:
        out[feature.name] = "categorical" if feature.type == "categorical" else "numeric"
    return out


def build_reference(
    model: LoadedModel,
    train_sample: pa.Table,
    holdout_sample: pa.Table | None,
    holdout_metrics: Mapping[str, float],
    *,
    bins: int = 20,
    holdout_rows: int | None = None,
) -> ModelReference:
    """The reference of ``model``: its training split's profile (``train_sample``, a uniform
    sample, at most ``REFERENCE_ROWS`` rows used) and a calibration fitted on ``holdout_sample``."""
    if model.task is None or model.preprocessor is None:
        raise DataError(f"{model.directory}: only a model over rows of features has a monitoring reference")
    task = model.task.name
    features = model_features(model)
    sample = train_sample.slice(0, REFERENCE_ROWS)
    preds = model.predict_table(sample)
    profile = ReferenceProfile.from_table(
        sample,
        numeric=[n for n, k in features.items() if k == "numeric"],
        categorical=[n for n, k in features.items() if k == "categorical"],
        predictions=prediction_values(task, preds),
        bins=bins,
    )
    calibration, expected = None, {}
    if model.task.classification and holdout_sample is not None and holdout_sample.num_rows:
        probs = np.asarray(model.predict_table(holdout_sample).probabilities, dtype=np.float64)
        labels = model.preprocessor.transform_label(holdout_sample)  # class indices
        try:
            calibration = Calibration.fit_probabilities(probs, labels)
        except DataError:
            calibration = None  # too few holdout rows or one class: the raw probabilities are used
        expected = estimate_performance(probs, model.classes or list(range(probs.shape[1])), calibration)
    holdout = {k.removeprefix("holdout_"): float(v) for k, v in holdout_metrics.items() if math.isfinite(v)}
    expected = {k: float(v) for k, v in expected.items() if math.isfinite(v)}  # AUC of a one-class holdout: NaN
    rows = holdout_rows if holdout_rows is not None else (holdout_sample.num_rows if holdout_sample is not None else 0)
    return ModelReference(task, model.classes, features, profile, calibration, holdout, expected, rows)


def load_reference(model_dir: str | Path) -> ModelReference | None:
    """The reference stored with a (verified) model directory; None for a model packaged without one."""
    path = Path(model_dir) / REFERENCE_FILE
    if not path.exists():
        return None
    return ModelReference.from_dict(json.loads(path.read_text()))
