"""Model monitoring: reference profiles, mergeable live-window summaries, drift and data problems.

A :class:`ReferenceProfile` is computed over the training split and stored with the model; a
serving replica counts its traffic into a :class:`WindowSummary` over the profile's bins
(summaries merge across replicas and intervals); :func:`drift_report` compares the two with
the statistics named in :data:`STATISTICS`, and :func:`data_problems` tells pipeline breakage
(a ×1000 unit change, a renamed category, a column gone all-null) from drift.
"""

from runtime.monitoring._drift import DriftConfig, DriftReport, FeatureDrift, drift_report
from runtime.monitoring._problems import DataProblem, data_problems
from runtime.monitoring._profile import ReferenceProfile, WindowSummary
from runtime.monitoring._statistics import STATISTICS, Comparison, Statistic, benjamini_hochberg
from runtime.monitoring._summary import CategoricalSummary, NumericSummary

__all__ = [
    "STATISTICS",
    "CategoricalSummary",
    "Comparison",
    "DataProblem",
    "DriftConfig",
    "DriftReport",
    "FeatureDrift",
    "NumericSummary",
    "ReferenceProfile",
    "Statistic",
    "WindowSummary",
    "benjamini_hochberg",
    "data_problems",
    "drift_report",
]
