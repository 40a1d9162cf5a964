from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from runtime.training._evaluate import _auc, primary_metric


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auc_matches_sklearn_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 500)
    scores = np.round(rng.random(500) + 0.3 * y, 1)  # rounding makes many ties
    assert _auc(scores, y) == pytest.approx(roc_auc_score(y, scores), abs=1e-12)


def test_auc_undefined_for_one_class() -> None:
    assert np.isnan(_auc(np.array([0.1, 0.2]), np.array([1, 1])))


def test_primary_metric_direction() -> None:
    acc, rmse = primary_metric("binary"), primary_metric("regression")
    assert acc.better(0.8, 0.7) and not acc.better(0.7, 0.7)
    assert rmse.better(1.0, 2.0) and not rmse.better(2.0, 1.0)
