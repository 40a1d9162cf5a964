"""The drift statistics, one named entry each in :data:`STATISTICS`.

Every statistic reads a :class:`Comparison`: one feature's reference and window counts over
the same bins (numeric: the profile's quantile bins; categorical: the vocabulary plus one
out-of-vocabulary bucket). A new statistic is a new entry, never a new branch.

Numeric statistics from bins are approximations, documented where they are made:

- ``ks``: the two-sample Kolmogorov–Smirnov p-value. From bins, the ECDFs are known exactly
  at the bin edges only, so the statistic D is the largest gap *at the edges* — a lower bound
  of the exact D (so the p-value errs towards "no drift"), equal to it when the largest gap
  falls on an edge. The p-value is SciPy's asymptotic one (``kstwo.sf(D, round(n·m/(n+m)))``,
  what ``ks_2samp(method="asymp")`` does). Given raw samples it is ``ks_2samp`` itself.
- ``wasserstein``: W1 divided by the reference standard deviation. From bins, each inner bin's
  mass is taken as spread uniformly over the bin, and each unbounded outer bin's mass
  uniformly over the interval next to its edge whose mean is the bin's observed mean (the
  summaries keep the outer bins' sums). The CDFs are then piecewise linear and the integral
  of their gap is exact for those; what is lost is the shape inside a bin, so the error is at
  most about a bin's width times the difference in its mass, plus the tails' spread. Given
  raw samples it is ``wasserstein_distance`` itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats
from scipy.spatial import distance

PSI_FLOOR = 1e-4  # an empty bin's share in PSI (Evidently's choice), so log(0) never happens
CHI2_PSEUDOCOUNT = 0.5  # added to every reference bin when the window fills one the reference left empty


@dataclass(frozen=True)
class Comparison:
    """One feature's reference against one window, over the same bins."""

    reference: np.ndarray  # counts per bin
    window: np.ndarray
    edges: np.ndarray | None = None  # numeric: interior bin edges (len(reference) - 1 of them)
    reference_std: float = math.nan
    reference_tail_means: tuple[float, float] | None = None  # numeric: means of the two outer bins
    window_tail_means: tuple[float, float] | None = None
    reference_samples: np.ndarray | None = None  # raw values, when the caller has them
    window_samples: np.ndarray | None = None

    @property
    def has_samples(self) -> bool:
        return self.reference_samples is not None and self.window_samples is not None


@dataclass(frozen=True)
class Statistic:
    """A named drift statistic: ``p_value`` statistics flag drift below the threshold,
    ``distance`` statistics at or above it."""

    name: str
    kinds: frozenset[str]
    output: Literal["p_value", "distance"]
    threshold: float
    compute: Callable[[Comparison], float]
    description: str

    def drifted(self, value: float, threshold: float | None = None) -> bool:
        limit = self.threshold if threshold is None else threshold
        if math.isnan(value):
            return False
        return value < limit if self.output == "p_value" else value >= limit


def _ks(c: Comparison) -> float:
    if c.has_samples:
        return float(stats.ks_2samp(c.reference_samples, c.window_samples).pvalue)
    n, m = int(c.reference.sum()), int(c.window.sum())
    if not n or not m:
        return math.nan
    gap = np.abs(np.cumsum(c.reference) / n - np.cumsum(c.window) / m)
    return float(stats.kstwo.sf(float(gap.max()), round(n * m / (n + m))))


def _wasserstein(c: Comparison) -> float:
    if c.has_samples:
        w = float(stats.wasserstein_distance(c.reference_samples, c.window_samples))
    else:
        n, m = c.reference.sum(), c.window.sum()
        if not n or not m or c.edges is None or c.reference_tail_means is None or c.window_tail_means is None:
            return math.nan
        if c.edges.size == 0:  # one bin: all mass at its mean
            w = abs(c.reference_tail_means[0] - c.window_tail_means[0])
        else:
            knots_r, cdf_r = _piecewise_cdf(c.reference, c.edges, c.reference_tail_means)
            knots_w, cdf_w = _piecewise_cdf(c.window, c.edges, c.window_tail_means)
            grid = np.union1d(knots_r, knots_w)
            w = _integral_of_abs_linear(grid, np.interp(grid, knots_r, cdf_r) - np.interp(grid, knots_w, cdf_w))
    std = c.reference_std
    if std > 0:
        return w / std
    return 0.0 if w == 0 else math.inf


def _piecewise_cdf(
    counts: np.ndarray, edges: np.ndarray, tail_means: tuple[float, float]
) -> tuple[np.ndarray, np.ndarray]:
    """Knots and CDF values of the binned distribution: uniform within each inner bin, and
    uniform over ``[edge - 2·(edge - mean), edge]`` (resp. upwards) in each outer bin, so the
    outer bin's mean is the one observed."""
    scale = 1e-12 * (1.0 + float(np.max(np.abs(edges))))
    low = edges[0] - max(2.0 * (edges[0] - tail_means[0]), scale)
    high = edges[-1] + max(2.0 * (tail_means[1] - edges[-1]), scale)
    cdf = np.concatenate([[0.0], np.cumsum(counts)[:-1] / counts.sum(), [1.0]])
    return np.concatenate([[low], edges, [high]]), cdf


def _integral_of_abs_linear(x: np.ndarray, y: np.ndarray) -> float:
    """∫|f| for f piecewise linear through (x, y), exact also where f changes sign."""
    width, a, b = np.diff(x), np.abs(y[:-1]), np.abs(y[1:])
    same_sign = y[:-1] * y[1:] >= 0
    with np.errstate(invalid="ignore", divide="ignore"):
        crossing = np.where(a + b > 0, (a**2 + b**2) / (2 * (a + b)), 0.0)
    return float(np.sum(width * np.where(same_sign, (a + b) / 2, crossing)))


def _psi(c: Comparison) -> float:
    n, m = c.reference.sum(), c.window.sum()
    if not n or not m:
        return math.nan
    p = np.maximum(c.reference / n, PSI_FLOOR)
    q = np.maximum(c.window / m, PSI_FLOOR)
    return float(np.sum((q - p) * np.log(q / p)))


def _chi2(c: Comparison) -> float:
    seen = (c.reference > 0) | (c.window > 0)
    reference, window = c.reference[seen].astype(np.float64), c.window[seen].astype(np.float64)
    if reference.sum() == 0 or window.sum() == 0:
        return math.nan
    if reference.size < 2:
        return 1.0
    if np.any(reference == 0):  # the window fills a bin the reference never did: smooth, don't divide by 0
        reference = reference + CHI2_PSEUDOCOUNT
    expected = reference / reference.sum() * window.sum()
    return float(stats.chisquare(window, expected).pvalue)


def _jensen_shannon(c: Comparison) -> float:
    n, m = c.reference.sum(), c.window.sum()
    if not n or not m:
        return math.nan
    # natural log, as SciPy's default and Evidently's: its 0.1 threshold is on this scale (base 2 is 1.2x larger)
    return float(distance.jensenshannon(c.reference / n, c.window / m))


NUMERIC, CATEGORICAL = "numeric", "categorical"

STATISTICS: dict[str, Statistic] = {
    s.name: s
    for s in (
        Statistic("ks", frozenset({NUMERIC}), "p_value", 0.05, _ks, "two-sample Kolmogorov–Smirnov p-value"),
        Statistic("wasserstein", frozenset({NUMERIC}), "distance", 0.1, _wasserstein, "Wasserstein-1 / reference std"),
        Statistic("psi", frozenset({NUMERIC, CATEGORICAL}), "distance", 0.1, _psi, "population stability index"),
        Statistic("chi2", frozenset({CATEGORICAL}), "p_value", 0.05, _chi2, "chi-squared goodness-of-fit p-value"),
        Statistic(
            "jensen_shannon",
            frozenset({CATEGORICAL}),
            "distance",
            0.1,
            _jensen_shannon,
            "Jensen–Shannon distance, natural log",
        ),
    )
}


def benjamini_hochberg(p_values: ArrayLike) -> np.ndarray:
    """Benjamini–Hochberg adjusted p-values (SciPy's ``false_discovery_control`` when the
    installed SciPy has it, else the definition: ``min_{j>=i} p_(j)·m/j``, capped at 1)."""
    p = np.asarray(p_values, dtype=np.float64)
    if p.size == 0:
        return p
    control = getattr(stats, "false_discovery_control", None)
    if control is not None:
        return np.asarray(control(p, method="bh"), dtype=np.float64)
    return _bh(p)


def _bh(p: np.ndarray) -> np.ndarray:
    order = np.argsort(p)
    scaled = p[order] * p.size / np.arange(1, p.size + 1)
    adjusted = np.minimum(np.minimum.accumulate(scaled[::-1])[::-1], 1.0)
    out = np.empty_like(p)
    out[order] = adjusted
    return out
