"""The drift report: one row per feature (and the predictions), and a dataset verdict.

Sample-size aware, as Evidently is: a window of fewer than ``small_window_rows`` rows (1,000)
gets p-value tests (KS for numeric, chi-squared for categorical; drift when p < 0.05 after
Benjamini–Hochberg across the columns tested), a larger one gets distances (Wasserstein over
the reference std for numeric, Jensen–Shannon for categorical; drift at >= 0.1), since on a
large window every p-value test flags differences too small to matter. Evidently switches on
the *reference* size; here the reference is the whole training split, so the switch is on the
window's rows, which is what decides how noisy the statistics are.

A feature with a data problem (unit change, rename, all-null; see ``_problems``) gets no
drift verdict: its row says ``data_problem`` and it stays out of the dataset share and of the
multiple-testing family. The prediction row is tested and corrected with the features but is
not one of the columns whose share decides the dataset verdict (drifting predictions follow
drifting inputs; counting them would count the same change twice).
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from runtime.errors import ConfigError, DataError
from runtime.monitoring._problems import DataProblem, data_problems
from runtime.monitoring._profile import ReferenceProfile, WindowSummary
from runtime.monitoring._statistics import STATISTICS, Comparison, Statistic, benjamini_hochberg
from runtime.monitoring._summary import CategoricalSummary, NumericSummary, Summary

PREDICTION = "prediction"


@dataclass(frozen=True)
class DriftConfig:
    """Which statistic runs when, and the thresholds (defaults are Evidently's)."""

    small_window_rows: int = 1000
    numeric_small: str = "ks"
    numeric_large: str = "wasserstein"
    categorical_small: str = "chi2"
    categorical_large: str = "jensen_shannon"
    thresholds: Mapping[str, float] = field(default_factory=dict)  # per statistic, over its default
    drift_share: float = 0.5
    correction: bool = True  # Benjamini–Hochberg across the p-value tests of one window

    def __post_init__(self) -> None:
        if self.small_window_rows < 0:
            raise ConfigError(f"small_window_rows ({self.small_window_rows}) must be >= 0")
        if not 0 < self.drift_share <= 1:
            raise ConfigError(f"drift_share ({self.drift_share}) must be in (0, 1]")
        for slot, kind in (
            ("numeric_small", "numeric"),
            ("numeric_large", "numeric"),
            ("categorical_small", "categorical"),
            ("categorical_large", "categorical"),
        ):
            name = getattr(self, slot)
            statistic = _statistic(name, slot)
            if kind not in statistic.kinds:
                fits = sorted(n for n, s in STATISTICS.items() if kind in s.kinds)
                raise ConfigError(f"{slot} ({name!r}) is not a {kind} statistic; use one of {fits}")
        for name in self.thresholds:
            _statistic(name, "thresholds")

    def statistic(self, kind: str, window_rows: int) -> Statistic:
        size = "small" if window_rows < self.small_window_rows else "large"
        return STATISTICS[getattr(self, f"{kind}_{size}")]

    def threshold(self, statistic: Statistic) -> float:
        return float(self.thresholds.get(statistic.name, statistic.threshold))


@dataclass(frozen=True)
class FeatureDrift:
    """One row of the report. ``value`` is the statistic; for p-value tests ``p_adjusted`` is
    the Benjamini–Hochberg p-value that the threshold is compared with."""

    feature: str
    kind: str
    statistic: str
    value: float
    threshold: float
    drifted: bool
    n_reference: int
    n_window: int
    p_adjusted: float | None = None
    data_problem: bool = False

    @property
    def verdict(self) -> str:
        if self.data_problem:
            return "data problem"
        if math.isnan(self.value):
            return "no data"
        return "DRIFT" if self.drifted else "ok"

    def to_dict(self) -> dict[str, Any]:
        return {f: _json_number(getattr(self, f)) for f in self.__dataclass_fields__} | {"verdict": self.verdict}


@dataclass(frozen=True)
class DriftReport:
    """Per-feature drift rows, the prediction's row, the data problems and the dataset verdict."""

    window_rows: int
    features: tuple[FeatureDrift, ...]
    prediction: FeatureDrift | None
    problems: tuple[DataProblem, ...]
    n_tested: int
    n_drifted: int
    drift_share: float  # the configured share at which the dataset drifts
    dataset_drift: bool
    correction: str

    @property
    def share(self) -> float:
        return self.n_drifted / self.n_tested if self.n_tested else 0.0

    @property
    def drifted_features(self) -> list[str]:
        return [row.feature for row in self.features if row.drifted]

    def to_dict(self) -> dict[str, Any]:
        return {
            "window_rows": self.window_rows,
            "dataset_drift": self.dataset_drift,
            "n_tested": self.n_tested,
            "n_drifted": self.n_drifted,
            "share": self.share,
            "drift_share": self.drift_share,
            "correction": self.correction,
            "features": [row.to_dict() for row in self.features],
            "prediction": None if self.prediction is None else self.prediction.to_dict(),
            "problems": [p.to_dict() for p in self.problems],
        }

    def table(self) -> str:
        """A plain-text table, one line per feature, then the verdict and the data problems."""
        header = ("feature", "kind", "statistic", "value", "p_adj", "threshold", "verdict", "n_ref", "n_window")
        rows = [header] + [
            (
                r.feature,
                r.kind,
                r.statistic,
                _fmt(r.value),
                "" if r.p_adjusted is None else _fmt(r.p_adjusted),
                _fmt(r.threshold),
                r.verdict,
                str(r.n_reference),
                str(r.n_window),
            )
            for r in (*self.features, *(() if self.prediction is None else (self.prediction,)))
        ]
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
        verdict = "DRIFT" if self.dataset_drift else "no drift"
        lines.append(
            f"dataset: {self.n_drifted} of {self.n_tested} features drifted ({self.share:.0%}; drift at "
            f">= {self.drift_share:.0%}): {verdict} — window of {self.window_rows} rows, correction: {self.correction}"
        )
        lines.extend(f"data problem: {p}" for p in self.problems)
        return "\n".join(lines)


def drift_report(
    profile: ReferenceProfile,
    window: WindowSummary,
    *,
    config: DriftConfig | None = None,
    samples: Mapping[str, tuple[ArrayLike, ArrayLike]] | None = None,
) -> DriftReport:
    """Compare ``window`` with ``profile``. ``samples`` maps a numeric feature to raw
    (reference, window) values; KS and Wasserstein then use them instead of the bins."""
    config = config or DriftConfig()
    problems = data_problems(profile, window)  # also checks the window belongs to the profile
    troubled = {p.feature for p in problems}
    samples = samples or {}

    rows = [
        _row(name, reference, window.numeric[name], config, window.n_rows, samples.get(name), name in troubled)
        for name, reference in profile.numeric.items()
    ] + [
        _row(name, reference, window.categorical[name], config, window.n_rows, None, name in troubled)
        for name, reference in profile.categorical.items()
    ]
    n_features = len(rows)
    if profile.prediction is not None and window.prediction is not None:
        rows.append(_row(PREDICTION, profile.prediction, window.prediction, config, window.n_rows, None, False))
    if config.correction:
        rows = _correct(rows)
    features, prediction = rows[:n_features], (rows[n_features] if len(rows) > n_features else None)
    tested = [r for r in features if not r.data_problem and not math.isnan(r.value)]
    drifted = sum(r.drifted for r in tested)
    return DriftReport(
        window_rows=window.n_rows,
        features=tuple(features),
        prediction=prediction,
        problems=tuple(problems),
        n_tested=len(tested),
        n_drifted=drifted,
        drift_share=config.drift_share,
        dataset_drift=bool(tested) and drifted / len(tested) >= config.drift_share,
        correction="benjamini-hochberg" if config.correction else "none",
    )


def _row(
    feature: str,
    reference: Summary,
    live: Summary,
    config: DriftConfig,
    window_rows: int,
    raw: tuple[ArrayLike, ArrayLike] | None,
    problem: bool,
) -> FeatureDrift:
    statistic = config.statistic(reference.kind, window_rows)
    threshold = config.threshold(statistic)
    value = math.nan if problem else statistic.compute(_comparison(reference, live, raw))
    return FeatureDrift(
        feature=feature,
        kind=reference.kind,
        statistic=statistic.name,
        value=value,
        threshold=threshold,
        drifted=not problem and statistic.drifted(value, threshold),
        n_reference=reference.count,
        n_window=live.count,
        data_problem=problem,
    )


def _comparison(reference: Summary, live: Summary, raw: tuple[ArrayLike, ArrayLike] | None) -> Comparison:
    if isinstance(reference, NumericSummary) and isinstance(live, NumericSummary):
        return Comparison(
            reference=np.asarray(reference.counts),
            window=np.asarray(live.counts),
            edges=np.asarray(reference.edges, dtype=np.float64),
            reference_std=reference.std,
            reference_tail_means=reference.tail_means,
            window_tail_means=live.tail_means,
            reference_samples=None if raw is None else _finite(raw[0]),
            window_samples=None if raw is None else _finite(raw[1]),
        )
    if isinstance(reference, CategoricalSummary) and isinstance(live, CategoricalSummary):
        return Comparison(
            reference=np.asarray([*reference.counts, reference.oov]), window=np.asarray([*live.counts, live.oov])
        )
    raise DataError(f"a {reference.kind} reference cannot be compared with a {live.kind} window summary")


def _correct(rows: list[FeatureDrift]) -> list[FeatureDrift]:
    """Benjamini–Hochberg over the p-value rows that were tested, verdicts from the adjusted p."""
    family = [
        i
        for i, r in enumerate(rows)
        if STATISTICS[r.statistic].output == "p_value" and not r.data_problem and not math.isnan(r.value)
    ]
    adjusted = benjamini_hochberg([rows[i].value for i in family])
    out = list(rows)
    for i, p in zip(family, adjusted, strict=True):
        statistic = STATISTICS[rows[i].statistic]
        out[i] = replace(rows[i], p_adjusted=float(p), drifted=statistic.drifted(float(p), rows[i].threshold))
    return out


def _statistic(name: str, where: str) -> Statistic:
    if name not in STATISTICS:
        hint = difflib.get_close_matches(name, STATISTICS, n=1)
        did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise ConfigError(f"{where}: unknown drift statistic {name!r}{did_you_mean}; known: {sorted(STATISTICS)}")
    return STATISTICS[name]


def _finite(values: ArrayLike) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    return array[np.isfinite(array)]


def _fmt(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.4g}"


def _json_number(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
