"""The canary judge: its statistics are SciPy's, healthy canaries pass, broken ones fail the
check that names what broke, and thin data is inconclusive, never a pass."""

from __future__ import annotations

import json
import warnings
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError
from scipy import stats
from scipy.spatial.distance import jensenshannon

from runtime.errors import ConfigError
from runtime.serving import (
    ArmWindow,
    Check,
    Disagreement,
    JudgeThresholds,
    Verdict,
    judge,
    window_metrics,
)


def arm(
    rng: np.random.Generator,
    n: int = 2000,
    error_rate: float = 0.005,
    slowdown: float = 1.0,
    flip: float = 0.0,
    regression: bool = False,
) -> ArmWindow:
    """One arm of a churn-like classifier (or a regressor): lognormal latencies around 20 ms,
    binomial errors, labels 0/1/2; ``flip`` of the rows predict another class."""
    latencies = rng.lognormal(np.log(20.0), 0.3, n) * slowdown
    errors = int(rng.binomial(n, error_rate))
    if regression:
        predictions = rng.normal(3.0, 1.0, n - errors)
    else:
        predictions = rng.choice([0, 1, 2], size=n - errors, p=[0.6, 0.3, 0.1])
        flipped = rng.random(predictions.size) < flip
        predictions[flipped] = (predictions[flipped] + 1) % 3
    return ArmWindow(latencies, errors, n, predictions, rng.random(n - errors))


def by_name(verdict: Verdict) -> dict[str, Check]:
    return {c.name: c for c in verdict.checks}


def test_statistics_are_scipys_on_the_same_samples() -> None:
    rng = np.random.default_rng(0)
    base, can = arm(rng), arm(rng, slowdown=1.05, flip=0.05, error_rate=0.01)
    checks = by_name(judge(base, can))

    labels = [0, 1, 2]
    pb = np.array([np.sum(base.predictions == k) for k in labels]) / base.predictions.size
    pc = np.array([np.sum(can.predictions == k) for k in labels]) / can.predictions.size
    assert checks["prediction_divergence"].value == pytest.approx(jensenshannon(pb, pc, base=2), rel=1e-12)

    mw = stats.mannwhitneyu(can.latencies_ms, base.latencies_ms, alternative="greater")
    assert checks["latency_p99"].p_value == pytest.approx(mw.pvalue, rel=1e-12)
    ratio = np.percentile(can.latencies_ms, 99) / np.percentile(base.latencies_ms, 99)
    assert checks["latency_p99"].value == pytest.approx(ratio, rel=1e-12)

    table = [[can.errors, can.requests - can.errors], [base.errors, base.requests - base.errors]]
    assert checks["error_rate"].p_value == pytest.approx(stats.fisher_exact(table, alternative="greater").pvalue)
    assert checks["error_rate"].value == pytest.approx(can.errors / can.requests - base.errors / base.requests)


def test_regression_divergence_is_jensen_shannon_over_pooled_quantile_bins() -> None:
    rng = np.random.default_rng(1)
    base, can = arm(rng, regression=True), arm(rng, regression=True)
    value = by_name(judge(base, can))["prediction_divergence"].value

    edges = np.quantile(np.concatenate([base.predictions, can.predictions]), np.linspace(0, 1, 21))
    hb, hc = np.histogram(base.predictions, edges)[0], np.histogram(can.predictions, edges)[0]
    assert value == pytest.approx(jensenshannon(hb / hb.sum(), hc / hc.sum(), base=2), rel=1e-12)


@pytest.mark.parametrize("regression", [False, True])
def test_an_identical_canary_passes(regression: bool) -> None:
    outcomes = []
    for seed in range(20):
        rng = np.random.default_rng(seed)
        verdict = judge(arm(rng, regression=regression), arm(rng, regression=regression))
        outcomes.append(verdict.outcome)
    assert outcomes.count("inconclusive") == 0
    assert outcomes.count("fail") <= 1, outcomes


def test_injected_errors_fail_the_error_check_and_the_verdict() -> None:
    rng = np.random.default_rng(2)
    base = ArmWindow(rng.lognormal(3, 0.3, 1000), 0, 1000, rng.choice([0, 1], 1000))
    can = ArmWindow(rng.lognormal(3, 0.3, 1000), 30, 1000, rng.choice([0, 1], 970))
    verdict = judge(base, can)
    check = by_name(verdict)["error_rate"]
    assert verdict.outcome == "fail"
    assert check.passed is False
    assert check.value == pytest.approx(0.03)
    assert check.p_value is not None and check.p_value < 1e-6
    assert "3.00% (30/1000)" in check.detail and "+3.00 pts > +1.00 pts" in check.detail


def test_a_few_errors_on_small_counts_do_not_fail() -> None:
    """+1.5 points, above the limit, but 3 errors in 200 is not significant (Fisher p=0.12)."""
    rng = np.random.default_rng(3)
    base = ArmWindow(rng.lognormal(3, 0.3, 200), 0, 200, rng.choice([0, 1], 200))
    can = ArmWindow(rng.lognormal(3, 0.3, 200), 3, 200, rng.choice([0, 1], 197))
    check = by_name(judge(base, can))["error_rate"]
    assert check.passed is True
    assert check.p_value == pytest.approx(0.1235, abs=1e-3)
    assert "not significant" in check.detail


@pytest.mark.parametrize(("slowdown", "passed"), [(3.0, False), (1.1, True)])
def test_a_slower_canary(slowdown: float, passed: bool) -> None:
    rng = np.random.default_rng(4)
    check = by_name(judge(arm(rng), arm(rng, slowdown=slowdown)))["latency_p99"]
    assert check.passed is passed
    if not passed:
        assert check.value is not None and check.value > 2.5
        assert "> x1.5" in check.detail and "Mann–Whitney p=" in check.detail


def test_a_canary_that_predicts_the_other_class_fails_divergence() -> None:
    rng = np.random.default_rng(5)
    base = ArmWindow(rng.lognormal(3, 0.3, 2000), 0, 2000, rng.choice(["stay", "churn"], 2000, p=[0.8, 0.2]))
    preds = rng.choice(["stay", "churn"], 2000, p=[0.8, 0.2])
    flipped = rng.random(2000) < 0.4
    preds[flipped] = np.where(preds[flipped] == "stay", "churn", "stay")
    can = ArmWindow(rng.lognormal(3, 0.3, 2000), 0, 2000, preds)
    verdict = judge(base, can)
    checks = by_name(verdict)
    assert checks["error_rate"].passed is True
    assert checks["prediction_divergence"].passed is False
    assert verdict.outcome == "fail"
    assert "% in canary vs " in checks["prediction_divergence"].detail


def test_shadow_disagreement_fails_its_checks() -> None:
    rng = np.random.default_rng(6)
    shadow = Disagreement(pairs=1000, label_flips=300, prob_deltas=rng.uniform(0, 0.4, 1000))
    verdict = judge(arm(rng), arm(rng), disagreement=shadow)
    checks = by_name(verdict)
    assert checks["disagreement"].passed is False and checks["disagreement"].value == pytest.approx(0.3)
    assert checks["mean_prob_delta"].passed is False
    assert verdict.outcome == "fail"

    calm = Disagreement(pairs=1000, label_flips=10, prob_deltas=rng.uniform(0, 0.02, 1000))
    assert judge(arm(rng), arm(rng), disagreement=calm).outcome == "pass"


def test_too_few_requests_is_inconclusive_never_pass() -> None:
    rng = np.random.default_rng(7)
    healthy = judge(arm(rng, n=50), arm(rng, n=50))
    assert healthy.outcome == "inconclusive"
    assert all(c.passed is None for c in healthy.checks)
    assert "too few requests for a verdict (50 < min_requests 200)" in by_name(healthy)["error_rate"].detail

    broken = judge(arm(rng, n=50), arm(rng, n=50, error_rate=0.5, slowdown=5), disagreement=Disagreement(50, 40))
    assert broken.outcome == "inconclusive"

    assert judge(arm(rng, n=150), arm(rng, n=150), JudgeThresholds(min_requests=100)).outcome == "pass"


def test_edge_cases_give_a_verdict_without_exceptions_or_warnings() -> None:
    empty = ArmWindow(np.array([]), 0, 0)
    flat = ArmWindow(np.full(500, 10.0), 0, 500, np.ones(500, dtype=int))
    zero = ArmWindow(np.zeros(500), 0, 500, np.full(500, "a"))
    slow = ArmWindow(np.full(500, 5.0), 0, 500, np.full(500, "a"))
    nan = ArmWindow(np.full(500, np.nan), 0, 500, np.full(500, np.nan))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert judge(empty, empty).outcome == "inconclusive"
        assert judge(flat, flat).outcome == "pass"  # all-equal latencies, a single label
        zero_baseline = by_name(judge(zero, slow))["latency_p99"]
        assert zero_baseline.value == np.inf and zero_baseline.passed is False
        assert judge(zero, zero).outcome == "pass"
        assert judge(nan, nan).outcome == "inconclusive"
        assert judge(flat, flat, disagreement=Disagreement(0, 0, np.array([]))).outcome == "inconclusive"
        assert np.isnan(window_metrics(empty)["p99_ms"])


def test_unknown_threshold_key_is_refused_by_name() -> None:
    with pytest.raises(ConfigError, match=r"unknown key 'max_p99_ration' \(did you mean 'max_p99_ratio'\?\)"):
        JudgeThresholds.from_dict({"max_p99_ration": 2.0})
    with pytest.raises(ValidationError, match="max_p99_ration"):
        JudgeThresholds(max_p99_ration=2.0)  # type: ignore[call-arg]
    with pytest.raises(ConfigError, match="alpha"):
        JudgeThresholds.from_dict({"alpha": 1.5})
    assert JudgeThresholds.from_dict({"max_p99_ratio": 2.0}).max_p99_ratio == 2.0


def test_verdict_to_dict_is_strict_json() -> None:
    rng = np.random.default_rng(8)
    zero = ArmWindow(np.zeros(300), 0, 300, np.zeros(300, dtype=int))
    for verdict in (
        judge(arm(rng), arm(rng, error_rate=0.05), disagreement=Disagreement(500, 5, rng.uniform(0, 0.1, 500))),
        judge(zero, ArmWindow(np.ones(300), 0, 300, np.zeros(300, dtype=int))),  # ratio inf
        judge(ArmWindow(np.array([]), 0, 0), ArmWindow(np.array([]), 0, 0)),  # values None
    ):
        doc = json.loads(json.dumps(verdict.to_dict(), allow_nan=False))
        assert doc["outcome"] == verdict.outcome
        assert [c["name"] for c in doc["checks"]] == [c.name for c in verdict.checks]


def test_summary_reads_as_a_report() -> None:
    rng = np.random.default_rng(9)
    text = judge(arm(rng), arm(rng, slowdown=3.0)).summary()
    lines = text.splitlines()
    assert lines[0].startswith("canary verdict: FAIL (1 failed, 0 inconclusive, 2 passed)")
    assert any(line.strip().startswith("FAIL") and "latency_p99: canary p99" in line for line in lines[1:])


def test_from_records_counts_5xx_and_dead_calls_as_errors_and_keeps_good_predictions() -> None:
    records: list[dict[str, Any]] = [
        {"latency_ms": 10.0, "status": 200, "prediction": 1, "probability": 0.9},
        {"latency_ms": 12.0, "status": 200, "prediction": 0, "probability": 0.2},
        {"latency_ms": 3.0, "status": 422},
        {"latency_ms": 30.0, "status": 503, "prediction": 1},
        {"latency_ms": None, "status": 0},
    ]
    window = ArmWindow.from_records(records)
    assert (window.requests, window.errors) == (5, 2)
    assert window.latencies_ms.tolist() == [10.0, 12.0, 3.0, 30.0]
    assert window.predictions.tolist() == [1, 0]
    assert window.probabilities is not None and window.probabilities.tolist() == [0.9, 0.2]
    metrics = window_metrics(window)
    assert metrics["requests"] == 5 and metrics["error_rate"] == pytest.approx(0.4)
    assert metrics["p50_ms"] == pytest.approx(11.0)

    with pytest.raises(ValueError, match=r"errors \(3\) must be between 0 and requests \(2\)"):
        ArmWindow(np.array([1.0]), 3, 2)
