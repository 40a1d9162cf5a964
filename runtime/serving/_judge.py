"""The automated canary judge: one analysis window of a baseline and a canary arm in, a verdict out.

Pure statistics (SciPy), no Ray and no I/O: the rollout controller collects an
:class:`ArmWindow` per arm (and, from shadow or paired traffic, a :class:`Disagreement`),
calls :func:`judge` with :class:`JudgeThresholds`, and acts on :attr:`Verdict.outcome`, the
way an Argo Rollouts analysis step acts on its AnalysisRun (Kayenta plays the judge there).
Unlike an infrastructure-only judge it also judges the *model*: what it predicts, and how
often it disagrees with the baseline on the same rows.

The checks, each a :class:`Check` named here:

``error_rate``
    canary error rate - baseline error rate (absolute). Fails only when the increase is above
    ``max_error_rate_increase`` *and* Fisher's exact test (one-sided, canary worse) is
    significant at ``alpha``, so a few errors on small counts do not fail a rollout: 3 errors
    in 200 canary requests against none in the baseline (+1.5 points) gives p=0.12 and passes;
    30 errors in 1,000 against none in 1,000 (+3 points) gives p~1e-9 and fails.
``latency_p99``
    canary p99 / baseline p99. Fails when above ``max_p99_ratio`` *and* a one-sided
    Mann–Whitney U test (canary latencies stochastically greater) is significant. The ratio
    looks at the tail, the test at the whole distribution: a canary slower in its slowest 1%
    only may pass.
``prediction_divergence``
    Jensen–Shannon distance (base 2, in [0, 1]) between the arms' predicted-label
    distributions over the union of labels; for regression (float predictions) between
    histograms over shared bins cut at the pooled quantiles. Fails when above
    ``max_prediction_divergence`` *and* a chi-square test of homogeneity on the same counts is
    significant: the plug-in distance is biased upward on small samples (identical arms of 200
    requests over 20 bins score ~0.18), so a threshold alone would fail healthy canaries.
``disagreement`` and ``mean_prob_delta`` (only with a :class:`Disagreement`)
    the share of paired rows whose label flipped, and the mean |p_live - p_shadow|; each fails
    when above its threshold.

A check with fewer than ``min_requests`` samples in an arm is inconclusive (``passed is
None``), never passed. The verdict fails if any check failed, is inconclusive if none failed
but one was inconclusive, and passes otherwise.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from pydantic import Field

from runtime.config import StrictModel, validate

Outcome = Literal["pass", "fail", "inconclusive"]


class JudgeThresholds(StrictModel):
    """What a canary must hold to pass one analysis window; every default lives here."""

    min_requests: int = Field(
        default=200, ge=1, description="Samples per arm a check needs; fewer makes it inconclusive, never a pass."
    )
    alpha: float = Field(default=0.05, gt=0, lt=1, description="Significance level of the tests that gate failures.")
    max_error_rate_increase: float = Field(
        default=0.01, ge=0, le=1, description="Largest allowed canary error rate minus baseline error rate (absolute)."
    )
    max_p99_ratio: float = Field(default=1.5, ge=1, description="Largest allowed canary p99 / baseline p99 latency.")
    max_prediction_divergence: float = Field(
        default=0.1, ge=0, le=1, description="Largest allowed Jensen–Shannon distance (base 2) between predictions."
    )
    regression_bins: int = Field(
        default=20, ge=2, le=1000, description="Histogram bins (pooled quantiles) for float predictions."
    )
    max_disagreement: float = Field(
        default=0.05, ge=0, le=1, description="Largest allowed share of paired rows whose predicted label flipped."
    )
    max_mean_prob_delta: float = Field(
        default=0.1, ge=0, le=1, description="Largest allowed mean |p_live - p_shadow| over paired rows."
    )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "judge thresholds") -> JudgeThresholds:
        """Validate user-written thresholds; a :class:`~runtime.errors.ConfigError` names a bad
        or unknown key (with a did-you-mean hint)."""
        return validate(cls, data, source)


@dataclass(frozen=True, eq=False)
class ArmWindow:
    """One arm over one analysis window. ``errors`` are 5xx answers and failed calls (4xx are the
    client's fault); ``predictions`` are labels (ints or strings) or floats (regression);
    ``probabilities`` the positive/top-class probability, when the model has one."""

    latencies_ms: npt.NDArray[np.float64]
    errors: int
    requests: int
    predictions: np.ndarray = field(default_factory=lambda: np.empty(0))
    probabilities: npt.NDArray[np.float64] | None = None

    def __post_init__(self) -> None:
        if self.requests < 0 or not 0 <= self.errors <= self.requests:
            raise ValueError(f"errors ({self.errors}) must be between 0 and requests ({self.requests})")
        object.__setattr__(self, "latencies_ms", np.asarray(self.latencies_ms, dtype=np.float64).ravel())
        object.__setattr__(self, "predictions", np.asarray(self.predictions).ravel())
        if self.probabilities is not None:
            object.__setattr__(self, "probabilities", np.asarray(self.probabilities, dtype=np.float64).ravel())

    @classmethod
    def from_records(cls, records: Iterable[Mapping[str, Any]]) -> ArmWindow:
        """From per-request records ``{"latency_ms", "status", "prediction"?, "probability"?}``.
        A status >= 500, or below 100 (0: the call got no answer), is an error; predictions and
        probabilities are kept from 2xx answers only; a ``latency_ms`` of None is skipped."""
        latencies: list[float] = []
        predictions: list[Any] = []
        probabilities: list[float] = []
        requests = errors = 0
        for record in records:
            requests += 1
            status = int(record["status"])
            errors += status >= 500 or status < 100
            if record.get("latency_ms") is not None:
                latencies.append(float(record["latency_ms"]))
            if 200 <= status < 300:
                if record.get("prediction") is not None:
                    predictions.append(record["prediction"])
                if record.get("probability") is not None:
                    probabilities.append(float(record["probability"]))
        return cls(
            latencies_ms=np.asarray(latencies, dtype=np.float64),
            errors=errors,
            requests=requests,
            predictions=np.asarray(predictions) if predictions else np.empty(0),
            probabilities=np.asarray(probabilities, dtype=np.float64) if probabilities else None,
        )


@dataclass(frozen=True, eq=False)
class Disagreement:
    """Shadow or paired traffic: the same rows scored by both models. ``prob_deltas`` are the
    per-row |p_live - p_shadow|; None when the model has no probabilities (that check is skipped)."""

    pairs: int
    label_flips: int
    prob_deltas: npt.NDArray[np.float64] | None = None

    def __post_init__(self) -> None:
        if self.pairs < 0 or not 0 <= self.label_flips <= self.pairs:
            raise ValueError(f"label_flips ({self.label_flips}) must be between 0 and pairs ({self.pairs})")
        if self.prob_deltas is not None:
            object.__setattr__(self, "prob_deltas", np.abs(np.asarray(self.prob_deltas, dtype=np.float64).ravel()))


@dataclass(frozen=True)
class Check:
    """One check's result: ``passed`` is None when inconclusive; ``value`` None when it could not
    be computed at all; ``p_value`` the gating test's, where there is one."""

    name: str
    value: float | None
    threshold: float
    passed: bool | None
    detail: str
    p_value: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: non-finite numbers become None (the detail still says them)."""
        return {
            "name": self.name,
            "value": _finite(self.value),
            "threshold": _finite(self.threshold),
            "passed": self.passed,
            "p_value": _finite(self.p_value),
            "detail": self.detail,
        }


@dataclass(frozen=True)
class Verdict:
    """The judge's answer for one window; ``outcome`` follows from ``checks`` (see :func:`judge`)."""

    outcome: Outcome
    checks: tuple[Check, ...]

    def summary(self) -> str:
        """A few readable lines: the outcome, then one line per check."""
        failed = sum(c.passed is False for c in self.checks)
        unknown = sum(c.passed is None for c in self.checks)
        head = (
            f"canary verdict: {self.outcome.upper()} ({failed} failed, {unknown} inconclusive, "
            f"{len(self.checks) - failed - unknown} passed)"
        )
        marks = {True: "pass", False: "FAIL", None: "inconclusive"}
        return "\n".join([head, *(f"  {marks[c.passed]:<12} {c.name}: {c.detail}" for c in self.checks)])

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable (strict JSON: no NaN or Infinity), for an MLflow artifact or a report."""
        return {"outcome": self.outcome, "checks": [c.to_dict() for c in self.checks]}


def judge(
    baseline: ArmWindow,
    canary: ArmWindow,
    thresholds: JudgeThresholds | None = None,
    disagreement: Disagreement | None = None,
) -> Verdict:
    """Run every check on one analysis window and combine them: fail if any failed, else
    inconclusive if any was inconclusive, else pass."""
    t = thresholds if thresholds is not None else JudgeThresholds()
    checks = [check_error_rate(baseline, canary, t), check_latency(baseline, canary, t)]
    checks.append(check_prediction_divergence(baseline, canary, t))
    if disagreement is not None:
        checks.extend(check_disagreement(disagreement, t))
    if any(c.passed is False for c in checks):
        outcome: Outcome = "fail"
    elif any(c.passed is None for c in checks):
        outcome = "inconclusive"
    else:
        outcome = "pass"
    return Verdict(outcome, tuple(checks))


def window_metrics(arm: ArmWindow) -> dict[str, float]:
    """``requests``, ``error_rate``, ``p50_ms``, ``p99_ms`` of one arm (NaN where there is no data)."""
    latencies = _finite_values(arm.latencies_ms)
    return {
        "requests": float(arm.requests),
        "error_rate": arm.errors / arm.requests if arm.requests else math.nan,
        "p50_ms": float(np.percentile(latencies, 50)) if latencies.size else math.nan,
        "p99_ms": float(np.percentile(latencies, 99)) if latencies.size else math.nan,
    }


def check_error_rate(baseline: ArmWindow, canary: ArmWindow, t: JudgeThresholds) -> Check:
    from scipy import stats

    name, limit = "error_rate", t.max_error_rate_increase
    if baseline.requests == 0 or canary.requests == 0:
        return Check(name, None, limit, None, f"no requests (baseline {baseline.requests}, canary {canary.requests})")
    rate_b, rate_c = baseline.errors / baseline.requests, canary.errors / canary.requests
    increase = rate_c - rate_b
    table = [[canary.errors, canary.requests - canary.errors], [baseline.errors, baseline.requests - baseline.errors]]
    p = float(stats.fisher_exact(table, alternative="greater").pvalue)
    detail = (
        f"canary error rate {rate_c:.2%} ({canary.errors}/{canary.requests}) vs baseline {rate_b:.2%} "
        f"({baseline.errors}/{baseline.requests}): {increase * 100:+.2f} pts {_cmp(increase, limit)} "
        f"+{limit * 100:.2f} pts, Fisher p={p:.2g}"
    )
    return _gated(name, increase, limit, p, t, detail, min(baseline.requests, canary.requests), "requests")


def check_latency(baseline: ArmWindow, canary: ArmWindow, t: JudgeThresholds) -> Check:
    name, limit = "latency_p99", t.max_p99_ratio
    lat_b, lat_c = _finite_values(baseline.latencies_ms), _finite_values(canary.latencies_ms)
    if lat_b.size == 0 or lat_c.size == 0:
        return Check(name, None, limit, None, f"no latencies (baseline {lat_b.size}, canary {lat_c.size})")
    p99_b, p99_c = float(np.percentile(lat_b, 99)), float(np.percentile(lat_c, 99))
    ratio = p99_c / p99_b if p99_b > 0 else (1.0 if p99_c <= 0 else math.inf)
    p = _mann_whitney_greater(lat_c, lat_b)
    detail = (
        f"canary p99 {p99_c:.1f} ms vs baseline {p99_b:.1f} ms (x{ratio:.2f} {_cmp(ratio, limit)} x{limit:g}), "
        f"Mann–Whitney p={p:.2g}"
    )
    return _gated(name, ratio, limit, p, t, detail, min(lat_b.size, lat_c.size), "latencies")


def check_prediction_divergence(baseline: ArmWindow, canary: ArmWindow, t: JudgeThresholds) -> Check:
    from scipy import stats
    from scipy.spatial.distance import jensenshannon

    name, limit = "prediction_divergence", t.max_prediction_divergence
    pred_b, pred_c = baseline.predictions, canary.predictions
    regression = _is_regression(pred_b, pred_c)
    if regression:
        pred_b, pred_c = _finite_values(pred_b.astype(np.float64)), _finite_values(pred_c.astype(np.float64))
    if pred_b.size == 0 or pred_c.size == 0:
        return Check(name, None, limit, None, f"no predictions (baseline {pred_b.size}, canary {pred_c.size})")
    if regression:
        counts_b, counts_c, what = _binned(pred_b, pred_c, t.regression_bins)
        shift = f"mean prediction {pred_c.mean():.4g} vs {pred_b.mean():.4g}"
    else:
        counts_b, counts_c, labels = _label_counts(pred_b, pred_c)
        what = f"predicted-label distributions ({len(labels)} labels)"
        share_b, share_c = counts_b / counts_b.sum(), counts_c / counts_c.sum()
        i = int(np.argmax(np.abs(share_c - share_b)))
        shift = f"largest shift: label {labels[i]!r} {share_c[i]:.1%} in canary vs {share_b[i]:.1%} in baseline"
    if counts_b.size < 2:  # one label (or one value) in both arms: identical distributions
        distance, p = 0.0, 1.0
    else:
        distance = float(jensenshannon(counts_b / counts_b.sum(), counts_c / counts_c.sum(), base=2))
        distance = 0.0 if math.isnan(distance) else distance
        p = float(stats.chi2_contingency(np.vstack([counts_c, counts_b])).pvalue)
    detail = (
        f"Jensen–Shannon distance {distance:.3f} {_cmp(distance, limit)} {limit:g} between {what}; "
        f"{shift}; chi-square p={p:.2g}"
    )
    return _gated(name, distance, limit, p, t, detail, min(pred_b.size, pred_c.size), "predictions")


def check_disagreement(disagreement: Disagreement, t: JudgeThresholds) -> list[Check]:
    """The label-flip check, and the mean |Δp| check when ``prob_deltas`` is given."""
    checks = []
    d, enough = disagreement, disagreement.pairs >= t.min_requests
    too_few = "" if enough else f"too few pairs for a verdict ({d.pairs} < min_requests {t.min_requests}); "
    limit = t.max_disagreement
    if d.pairs == 0:
        checks.append(Check("disagreement", None, limit, None, "no paired rows"))
    else:
        rate = d.label_flips / d.pairs
        detail = f"{too_few}{rate:.1%} of {d.pairs} paired rows changed label ({d.label_flips}; {_cmp(rate, limit)} {limit:.1%})"
        checks.append(Check("disagreement", rate, limit, (rate <= limit) if enough else None, detail))
    if d.prob_deltas is not None:
        deltas, limit = _finite_values(d.prob_deltas), t.max_mean_prob_delta
        if deltas.size == 0:
            checks.append(Check("mean_prob_delta", None, limit, None, "no probability deltas"))
        else:
            mean = float(deltas.mean())
            ok: bool | None = mean <= limit if deltas.size >= t.min_requests else None
            pre = (
                ""
                if ok is not None
                else f"too few deltas for a verdict ({deltas.size} < min_requests {t.min_requests}); "
            )
            detail = (
                f"{pre}mean |Δp| {mean:.3f} {_cmp(mean, limit)} {limit:g} over {deltas.size} paired rows, "
                f"p95 {float(np.percentile(deltas, 95)):.3f}"
            )
            checks.append(Check("mean_prob_delta", mean, limit, ok, detail))
    return checks


def _gated(
    name: str, value: float, limit: float, p: float, t: JudgeThresholds, detail: str, n: int, unit: str
) -> Check:
    """Fail when ``value`` is above ``limit`` and the test is significant; inconclusive when an
    arm has fewer than ``min_requests`` samples."""
    if n < t.min_requests:
        detail = f"too few {unit} for a verdict ({n} < min_requests {t.min_requests}); {detail}"
        return Check(name, value, limit, None, detail, p)
    if value > limit and p >= t.alpha:
        detail += f"; not significant at alpha={t.alpha:g}, so not failed"
    return Check(name, value, limit, not (value > limit and p < t.alpha), detail, p)


def _mann_whitney_greater(canary: np.ndarray, baseline: np.ndarray) -> float:
    """One-sided p-value that canary latencies are stochastically greater; 1.0 when all values
    are equal or the test cannot be computed."""
    from scipy import stats

    if np.ptp(np.concatenate([canary, baseline])) == 0:
        return 1.0
    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            p = float(stats.mannwhitneyu(canary, baseline, alternative="greater").pvalue)
    except ValueError:
        return 1.0
    return 1.0 if math.isnan(p) else p


def _is_regression(a: np.ndarray, b: np.ndarray) -> bool:
    """Float predictions (in either arm, both numeric) are a regressor's; ints, bools, strings labels."""
    kinds = {x.dtype.kind for x in (a, b) if x.size}
    return bool(kinds) and kinds <= set("fiub") and "f" in kinds


def _label_counts(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[Any]]:
    """Counts of each label over the union of both arms' labels."""
    count_a, count_b = Counter(a.tolist()), Counter(b.tolist())
    labels = sorted(set(count_a) | set(count_b), key=repr)
    return (
        np.array([count_a[k] for k in labels], dtype=np.float64),
        np.array([count_b[k] for k in labels], dtype=np.float64),
        labels,
    )


def _binned(a: np.ndarray, b: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray, str]:
    """Histograms over shared bins cut at the pooled quantiles; bins empty in both arms dropped."""
    edges = np.unique(np.quantile(np.concatenate([a, b]), np.linspace(0.0, 1.0, bins + 1)))
    if edges.size < 2:
        return np.array([a.size], dtype=np.float64), np.array([b.size], dtype=np.float64), "predictions (one value)"
    count_a = np.histogram(a, edges)[0].astype(np.float64)
    count_b = np.histogram(b, edges)[0].astype(np.float64)
    keep = (count_a + count_b) > 0
    return count_a[keep], count_b[keep], f"prediction histograms ({int(keep.sum())} bins at pooled quantiles)"


def _finite_values(x: np.ndarray) -> np.ndarray:
    return x[np.isfinite(x)]


def _cmp(value: float, limit: float) -> str:
    return ">" if value > limit else "<="


def _finite(x: float | None) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None
