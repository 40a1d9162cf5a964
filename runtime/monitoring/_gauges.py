"""The monitoring verdicts as Prometheus metrics, through Ray's metrics agent.

Set by the replica that evaluates the trailing window (replica 0 of a deployment) after each
evaluation; Ray's agent prefixes ``ray_``. Every series carries ``model`` and ``version``:

===================================  ========  ============================================
``skewless_drift_score``             gauge     + ``feature``, ``statistic``: the statistic's value
``skewless_drift_detected``          gauge     + ``feature``: 1 drifted, 0 not (``prediction`` too)
``skewless_drift_dataset``           gauge     1 when the dataset verdict is drift
``skewless_drift_share``             gauge     share of the tested features that drifted
``skewless_data_problem``            gauge     + ``feature``, ``kind``: 1 while present, then 0
``skewless_monitor_window_rows``     gauge     rows in the judged window
``skewless_performance_estimated``   gauge     + ``metric``: CBPE over the window
``skewless_performance_realised``    gauge     + ``metric``: from the labels joined so far
``skewless_performance_reference``   gauge     + ``metric``: the holdout figure at training
``skewless_monitor_label_lag_seconds``  gauge  median delay of the labels joined
``skewless_monitor_dropped_rows``    counter   rows left out of monitoring (buffer full)
===================================  ========  ============================================

The alert rules over them are ``cluster/prometheus/skewless-rules.yml``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from runtime.monitoring._window import MonitorReport

_BASE = ("model", "version")
GAUGES: dict[str, tuple[str, tuple[str, ...]]] = {
    "skewless_drift_score": ("Drift statistic of a feature over the last judged window.", ("feature", "statistic")),
    "skewless_drift_detected": ("1 when the feature drifted in the last judged window, else 0.", ("feature",)),
    "skewless_drift_dataset": ("1 when the dataset-level verdict of the last window is drift.", ()),
    "skewless_drift_share": ("Share of the tested features that drifted in the last window.", ()),
    "skewless_data_problem": ("1 while an upstream data problem (not drift) is present.", ("feature", "kind")),
    "skewless_monitor_window_rows": ("Rows in the last judged window.", ()),
    "skewless_performance_estimated": ("Performance estimated from calibrated scores (CBPE).", ("metric",)),
    "skewless_performance_realised": ("Performance from the labels joined so far.", ("metric",)),
    "skewless_performance_reference": ("The holdout performance at training.", ("metric",)),
    "skewless_monitor_label_lag_seconds": ("Median delay between a prediction and its label.", ()),
}
DROPPED = "skewless_monitor_dropped_rows"


class MonitorGauges:
    """The metrics above for one model version (``ray.util.metrics``; inside Ray only)."""

    def __init__(self, model: str, version: str) -> None:
        from ray.util.metrics import Counter, Gauge

        self.base = {"model": model, "version": version}
        self.gauges: dict[str, Any] = {
            name: Gauge(name, description=doc, tag_keys=_BASE + keys) for name, (doc, keys) in GAUGES.items()
        }
        self.dropped = Counter(DROPPED, description="Rows left out of monitoring (buffer full).", tag_keys=_BASE)
        self._problems: set[tuple[str, str]] = set()

    def _set(self, name: str, value: float | None, **tags: str) -> None:
        if value is None or math.isnan(value):
            return
        self.gauges[name].set(float(value), tags={**self.base, **tags})

    def count_dropped(self, rows: int) -> None:
        if rows > 0:
            self.dropped.inc(rows, tags=self.base)

    def publish(self, report: MonitorReport) -> None:
        self._set("skewless_monitor_window_rows", report.rows)
        for metric, value in report.reference.holdout.items():
            self._set("skewless_performance_reference", value, metric=metric)
        for metric, value in report.estimated.items():
            self._set("skewless_performance_estimated", value, metric=metric)
        if report.labels is not None:
            for metric, value in report.labels.metrics.items():
                self._set("skewless_performance_realised", value, metric=metric)
            self._set("skewless_monitor_label_lag_seconds", report.labels.lag_median_s)
        drift = report.drift
        if drift is None:  # no traffic in the window: no drift verdict stands
            self._set("skewless_drift_dataset", 0.0)
            self._set("skewless_drift_share", 0.0)
            return
        self._set("skewless_drift_dataset", 1.0 if drift.dataset_drift else 0.0)
        self._set("skewless_drift_share", drift.share)
        for row in (*drift.features, *(() if drift.prediction is None else (drift.prediction,))):
            self._set("skewless_drift_score", row.value, feature=row.feature, statistic=row.statistic)
            self._set("skewless_drift_detected", 1.0 if row.drifted else 0.0, feature=row.feature)
        present = {(p.feature, p.problem) for p in drift.problems}
        for feature, kind in present | self._problems:
            self._set("skewless_data_problem", 1.0 if (feature, kind) in present else 0.0, feature=feature, kind=kind)
        self._problems = present
