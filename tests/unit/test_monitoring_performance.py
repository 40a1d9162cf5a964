"""Performance without labels (CBPE) and with them (runtime.monitoring).

The estimates are checked against the accuracy and AUC realised on data nobody here wrote
(scikit-learn's bundled breast-cancer and digits sets, models fitted by scikit-learn), on a
random test split and on covariate-shifted subsets of it; scikit-learn is the oracle for the
isotonic fit and the metrics. Pure: fixed seeds, no Ray, no network."""

from __future__ import annotations

import json
from collections.abc import Callable

import numpy as np
import pytest
from sklearn.datasets import load_breast_cancer, load_digits
from sklearn.isotonic import IsotonicRegression
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, mean_absolute_error, mean_squared_error, r2_score, roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from runtime.errors import ConfigError, DataError
from runtime.monitoring import Calibration, estimate_performance, realised_performance
from runtime.monitoring._performance import MIN_CALIBRATION_ROWS, expected_auc

SPLITS = 20  # random train / calibration / test splits per real-data check


def _calibrated(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Positive probabilities ``p`` and labels drawn from them: calibrated by construction."""
    p = rng.beta(2.0, 2.0, n)
    return p, (rng.random(n) < p).astype(np.int64)


def _binary(p: np.ndarray) -> np.ndarray:
    return np.stack([1.0 - p, p], axis=1)


# ------------------------------------------------------------------ the calibration map


def test_calibration_is_scikit_learns_isotonic_map_and_round_trips_through_json() -> None:
    rng = np.random.default_rng(0)
    p, y = _calibrated(rng, 5_000)
    scores = np.round(p**2, 3)  # miscalibrated, and with ties
    calibration = Calibration.fit(scores, y)
    oracle = IsotonicRegression(out_of_bounds="clip", y_min=0.0, y_max=1.0).fit(scores, y)
    grid = np.concatenate([np.linspace(-0.5, 1.5, 2_001), scores[:500]])
    np.testing.assert_allclose(calibration.apply(grid), oracle.predict(grid), atol=1e-12)

    y = calibration.y
    assert len(y) <= 2 * len(set(y))  # each step kept as its two ends at most
    assert not any(a == b == c for a, b, c in zip(y[:-2], y[1:-1], y[2:], strict=True))  # nothing inside a step
    assert len(y) < len(set(scores.tolist())) / 5  # compact: a few dozen points for 1,000 distinct scores
    again = Calibration.from_dict(json.loads(json.dumps(calibration.to_dict())))
    assert again == calibration
    np.testing.assert_array_equal(again.apply(grid), calibration.apply(grid))
    assert calibration.rows == 5_000 and calibration.score == "positive"


def test_a_cubed_score_is_corrected_by_the_fit() -> None:
    rng = np.random.default_rng(1)
    p, y = _calibrated(rng, 20_000)
    calibration = Calibration.fit(p**3, y)
    live_p, _ = _calibrated(rng, 20_000)
    corrected = calibration.apply(live_p**3)
    assert np.abs(corrected - live_p).mean() < 0.02
    assert np.abs(live_p**3 - live_p).mean() > 0.15  # what it corrected


def test_the_estimate_of_a_miscalibrated_model_needs_the_calibration() -> None:
    rng = np.random.default_rng(2)
    p, y = _calibrated(rng, 20_000)
    calibration = Calibration.fit(p**3, y)
    live_p, live_y = _calibrated(rng, 50_000)
    probabilities = _binary(live_p**3)  # what the model serves
    realised = realised_performance("binary", probabilities.argmax(axis=1), live_y, probabilities)
    estimated = estimate_performance(probabilities, [0, 1], calibration)
    uncalibrated = estimate_performance(probabilities, [0, 1], None)
    assert abs(estimated["accuracy"] - realised["accuracy"]) < 0.01
    assert abs(estimated["auc"] - realised["auc"]) < 0.01
    assert abs(uncalibrated["accuracy"] - realised["accuracy"]) > 0.05


@pytest.mark.parametrize(
    ("scores", "labels", "message"),
    [
        (np.linspace(0, 1, MIN_CALIBRATION_ROWS - 1), np.arange(MIN_CALIBRATION_ROWS - 1) % 2, ">= 50 holdout rows"),
        (np.linspace(0, 1, 100), np.ones(100), "both outcomes"),
        (np.linspace(0, 1, 100), np.arange(100) % 3, "0/1 outcomes"),
        (np.linspace(0, 1, 100), np.arange(99) % 2, "one per score"),
        (np.r_[np.linspace(0, 1, 99), np.nan], np.arange(100) % 2, "finite"),
    ],
)
def test_calibration_refuses_what_it_cannot_fit(scores: np.ndarray, labels: np.ndarray, message: str) -> None:
    with pytest.raises(DataError, match=message):
        Calibration.fit(scores, labels)


def test_a_calibration_from_a_broken_dict_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="keys score, rows, x, y"):
        Calibration.from_dict({"x": [0.0, 1.0]})
    with pytest.raises(ConfigError, match="non-decreasing"):
        Calibration.from_dict({"x": [0.0, 1.0], "y": [0.9, 0.1], "rows": 100})
    with pytest.raises(ConfigError, match="score"):
        Calibration.from_dict({"x": [0.0], "y": [0.5], "rows": 100, "score": "max"})


# ------------------------------------------------------------------ CBPE, synthetic


def test_on_calibrated_scores_the_estimate_is_the_realised_accuracy_and_auc() -> None:
    """50k rows whose labels are drawn from their scores: the estimate is within 0.01 of what
    the labels give (measured: 0.0003..0.004 for accuracy, 0.0006..0.003 for AUC over five
    seeds)."""
    p, y = _calibrated(np.random.default_rng(3), 50_000)
    probabilities = _binary(p)
    estimated = estimate_performance(probabilities, ["no", "yes"], None)
    realised = realised_performance("binary", probabilities.argmax(axis=1), y, probabilities)
    assert estimated["rows"] == realised["rows"] == 50_000
    assert abs(estimated["accuracy"] - realised["accuracy"]) < 0.01
    assert abs(estimated["auc"] - realised["auc"]) < 0.01


def test_expected_auc_with_the_labels_as_probabilities_is_the_realised_auc() -> None:
    rng = np.random.default_rng(4)
    score = np.round(rng.random(2_000), 2)  # many ties
    labels = (rng.random(2_000) < score).astype(np.float64)
    assert expected_auc(score, labels) == pytest.approx(roc_auc_score(labels, score), abs=1e-12)
    assert np.isnan(expected_auc(score, np.zeros(2_000)))


def test_the_prediction_is_the_served_argmax_not_the_calibrated_side_of_one_half() -> None:
    """An under-confident model: raw 0.4 means 0.8 positive. It predicted negative, so a row is
    right with probability 0.2, not 0.8."""
    calibration = Calibration(x=(0.0, 0.4, 1.0), y=(0.0, 0.8, 1.0), rows=1_000)
    estimated = estimate_performance(_binary(np.full(10, 0.4)), [0, 1], calibration)
    assert estimated["accuracy"] == pytest.approx(0.2)


def test_estimate_refuses_empty_or_mismatched_input() -> None:
    with pytest.raises(DataError, match="no rows"):
        estimate_performance(np.empty((0, 2)), [0, 1], None)
    with pytest.raises(DataError, match="3 columns for 2 classes"):
        estimate_performance(np.full((4, 3), 1 / 3), [0, 1], None)
    with pytest.raises(DataError, match=r"in \[0, 1\]"):
        estimate_performance(np.array([[1.5, -0.5]]), [0, 1], None)
    binary = Calibration.fit(np.linspace(0, 1, 100), np.arange(100) >= 50)
    with pytest.raises(ConfigError, match="fit_probabilities"):
        estimate_performance(np.full((4, 3), 1 / 3), [0, 1, 2], binary)


# ------------------------------------------------------------------ CBPE on real data


def _errors(
    load: Callable[[], tuple[np.ndarray, np.ndarray]],
    sizes: tuple[int, int],
    c: float,
    windows: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]],
) -> dict[str, np.ndarray]:
    """For each window and each of :data:`SPLITS` random splits: (estimated - realised
    accuracy, uncalibrated estimate - realised accuracy, estimated - realised AUC)."""
    x, y = load()
    classes = sorted(set(y.tolist()))
    out: dict[str, list[tuple[float, float, float]]] = {name: [] for name in windows}
    for seed in range(SPLITS):
        order = np.random.default_rng(seed).permutation(len(y))
        train, held, test = order[: sizes[0]], order[sizes[0] : sizes[1]], order[sizes[1] :]
        model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2_000)).fit(x[train], y[train])
        calibration = Calibration.fit_probabilities(model.predict_proba(x[held]), y[held])
        for name, select in windows.items():
            rows = select(x, test)
            probabilities = model.predict_proba(x[rows])
            kind = "binary" if len(classes) == 2 else "multiclass"
            realised = realised_performance(kind, probabilities.argmax(axis=1), y[rows], probabilities)
            estimated = estimate_performance(probabilities, classes, calibration)
            raw = estimate_performance(probabilities, classes, None)
            auc = estimated.get("auc", np.nan) - realised.get("auc", np.nan)
            accuracy = realised["accuracy"]
            out[name].append((estimated["accuracy"] - accuracy, raw["accuracy"] - accuracy, auc))
    return {name: np.array(rows) for name, rows in out.items()}


def _quantile(feature: int, low: float, high: float) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """The test rows whose ``feature`` lies between two quantiles of the whole set: a covariate shift."""

    def select(x: np.ndarray, test: np.ndarray) -> np.ndarray:
        a, b = np.quantile(x[:, feature], [low, high])
        return test[(x[test, feature] >= a) & (x[test, feature] <= b)]

    return select


def test_cbpe_tracks_a_breast_cancer_classifier_on_a_test_split_and_under_covariate_shift() -> None:
    """Breast cancer (569 rows): logistic regression on 190 rows, regularised until it is
    under-confident (C=0.05), calibrated on 190 others, estimated on the remaining 189 and on
    the test rows with a mean texture above the median (~95 rows; 40% benign against 63%
    overall) or a mean smoothness above it. Measured over the 20 splits, the estimated
    accuracy is off by 0.013 (test), 0.019 (texture) and 0.016 (smoothness) on average, with
    a bias of +0.005, +0.015 and -0.002, and by 0.031, 0.041 and 0.054 at worst for one
    window (a ~95-row window's realised accuracy itself has a standard error near 0.025).
    Asserted: <= 0.03 on average, a bias <= 0.025, <= 0.07 for every window. The expected
    AUC is off by 0.005-0.006 on average and 0.015 at worst (asserted <= 0.02 and <= 0.03).
    Uncalibrated scores miss the accuracy by 0.06-0.08 on average."""
    names = list(load_breast_cancer().feature_names)
    errors = _errors(
        lambda: load_breast_cancer(return_X_y=True),
        (190, 380),
        0.05,
        {
            "test": lambda x, test: test,
            "texture": _quantile(names.index("mean texture"), 0.5, 1.0),
            "smoothness": _quantile(names.index("mean smoothness"), 0.5, 1.0),
        },
    )
    for name, e in errors.items():
        assert np.abs(e[:, 0]).mean() <= 0.03, name
        assert abs(e[:, 0].mean()) <= 0.025, name
        assert np.abs(e[:, 0]).max() <= 0.07, name
        assert np.abs(e[:, 2]).mean() <= 0.02, name
        assert np.abs(e[:, 2]).max() <= 0.03, name
        assert np.abs(e[:, 1]).mean() > 2 * np.abs(e[:, 0]).mean(), name  # the calibration is what makes it work


def test_cbpe_tracks_a_digits_classifier_on_a_test_split_and_under_covariate_shift() -> None:
    """Digits (1,797 rows, 10 classes): logistic regression on 300 rows (C=0.01: its top-class
    probabilities are far too low), calibrated on 600, estimated on the other 897 and on the
    test rows whose pixel 36 is at or above its median, or pixel 20 at or below it (~460 rows
    each). Measured over the 20 splits, the estimated accuracy is off by 0.012, 0.016 and
    0.021 on average (bias -0.004, -0.010, -0.015) and by 0.031, 0.047 and 0.049 at worst for
    one window. Asserted: <= 0.03 on average, <= 0.06 for every window. Uncalibrated, the
    top-class probability misses by ~0.41."""
    errors = _errors(
        lambda: load_digits(return_X_y=True),
        (300, 900),
        0.01,
        {
            "test": lambda x, test: test,
            "pixel 36 high": _quantile(36, 0.5, 1.0),
            "pixel 20 low": _quantile(20, 0.0, 0.5),
        },
    )
    for name, e in errors.items():
        assert np.abs(e[:, 0]).mean() <= 0.03, name
        assert np.abs(e[:, 0]).max() <= 0.06, name
        assert np.abs(e[:, 1]).mean() > 0.3, name
        assert np.isnan(e[:, 2]).all(), name  # no AUC for a multiclass model


def test_a_multiclass_calibration_is_of_the_top_class() -> None:
    x, y = load_digits(return_X_y=True)
    model = make_pipeline(StandardScaler(), LogisticRegression(C=0.01, max_iter=2_000)).fit(x[:900], y[:900])
    calibration = Calibration.fit_probabilities(model.predict_proba(x[900:]), y[900:])
    assert calibration.score == "top_class"
    with pytest.raises(DataError, match="label index 10 is not a column of the 10 class probabilities"):
        Calibration.fit_probabilities(model.predict_proba(x[900:]), np.r_[y[901:], 10])
    with pytest.raises(ConfigError, match="'top_class' score cannot estimate a 2-class model"):
        estimate_performance(_binary(np.full(3, 0.7)), [0, 1], calibration)


# ------------------------------------------------------------------ realised performance


def test_realised_binary_performance_is_scikit_learns() -> None:
    rng = np.random.default_rng(5)
    p, y = _calibrated(rng, 3_000)
    classes = np.array(["healthy", "sick"])
    probabilities = _binary(p)
    predictions, labels = classes[probabilities.argmax(axis=1)], classes[y]
    realised = realised_performance("binary", predictions, labels, probabilities, classes=list(classes))
    assert realised["accuracy"] == pytest.approx(accuracy_score(labels, predictions), abs=1e-12)
    assert realised["auc"] == pytest.approx(roc_auc_score(y, probabilities[:, 1].astype(np.float32)), abs=1e-12)
    assert realised["rows"] == 3_000
    one_class = realised_performance(
        "binary", predictions[y == 1], labels[y == 1], probabilities[y == 1], classes=list(classes)
    )
    assert "auc" not in one_class and one_class["rows"] == (y == 1).sum()
    with pytest.raises(ConfigError, match="pass classes="):
        realised_performance("binary", predictions, labels, probabilities)


def test_realised_multiclass_and_regression_performance_are_scikit_learns() -> None:
    rng = np.random.default_rng(6)
    labels = rng.integers(0, 5, 1_000)
    predictions = np.where(rng.random(1_000) < 0.7, labels, rng.integers(0, 5, 1_000))
    realised = realised_performance("multiclass", predictions, labels)
    assert realised == {"accuracy": pytest.approx(accuracy_score(labels, predictions)), "rows": 1_000.0}

    y = rng.normal(50.0, 10.0, 1_000)
    guess = y + rng.normal(0.0, 3.0, 1_000)
    realised = realised_performance("regression", guess, y)
    assert realised["rmse"] == pytest.approx(np.sqrt(mean_squared_error(y, guess)), rel=1e-9)
    assert realised["mae"] == pytest.approx(mean_absolute_error(y, guess), rel=1e-9)
    assert realised["r2"] == pytest.approx(r2_score(y, guess), rel=1e-6)
    assert realised["rows"] == 1_000


def test_realised_performance_refuses_what_it_cannot_measure() -> None:
    with pytest.raises(ConfigError, match="did you mean 'binary'"):
        realised_performance("binray", [1], [1])
    with pytest.raises(DataError, match="no labelled rows"):
        realised_performance("binary", [], [])
    with pytest.raises(DataError, match="as long"):
        realised_performance("regression", [1.0, 2.0], [1.0])
    with pytest.raises(DataError, match="finite"):
        realised_performance("regression", [1.0, 2.0], [1.0, np.nan])
