"""Model monitoring: reference profiles, mergeable live-window summaries, drift and data problems.

A :class:`ReferenceProfile` is computed over the training split and stored with the model; a
serving replica counts its traffic into a :class:`WindowSummary` over the profile's bins
(summaries merge across replicas and intervals); :func:`drift_report` compares the two with
the statistics named in :data:`STATISTICS`, and :func:`data_problems` tells pipeline breakage
(a ×1000 unit change, a renamed category, a column gone all-null) from drift.

Training stores a :class:`ModelReference` (the profile, a calibration, the holdout figures) in
the model directory. In serving, a :class:`LiveMonitor` per replica buffers answered requests
and flushes window summaries and the prediction log (with request ids) to a
:class:`MonitoringStore`; labels join the log later; :func:`evaluate_window` judges a window
(drift, estimated and realised performance) and :class:`MonitorGauges` exports the verdicts.

Before labels arrive, :func:`estimate_performance` estimates a classifier's accuracy (and
AUC) from its scores through a :class:`Calibration` fitted on the holdout (NannyML's CBPE);
:func:`realised_performance` measures it once they have. :func:`retrain_decision` weighs
what the extra errors cost against what a retrain costs (:class:`RetrainCosts`, and the
:func:`training_hours` of past runs) and explains its :class:`RetrainDecision`.
"""

from runtime.monitoring._drift import DriftConfig, DriftReport, FeatureDrift, drift_report
from runtime.monitoring._gauges import MonitorGauges
from runtime.monitoring._live import LiveMonitor, LiveSettings
from runtime.monitoring._performance import Calibration, estimate_performance, realised_performance
from runtime.monitoring._plot import drift_png
from runtime.monitoring._problems import DataProblem, data_problems
from runtime.monitoring._profile import ReferenceProfile, WindowSummary
from runtime.monitoring._reference import (
    REFERENCE_FILE,
    ModelReference,
    build_reference,
    load_reference,
    prediction_values,
)
from runtime.monitoring._retrain import RetrainCosts, RetrainDecision, retrain_decision, training_hours
from runtime.monitoring._statistics import STATISTICS, Comparison, Statistic, benjamini_hochberg
from runtime.monitoring._store import MonitoringStore, labels_table
from runtime.monitoring._summary import CategoricalSummary, NumericSummary
from runtime.monitoring._window import LabelJoin, MonitorReport, evaluate_window, join_labels, retrain_check

__all__ = [
    "REFERENCE_FILE",
    "STATISTICS",
    "Calibration",
    "CategoricalSummary",
    "Comparison",
    "DataProblem",
    "DriftConfig",
    "DriftReport",
    "FeatureDrift",
    "LabelJoin",
    "LiveMonitor",
    "LiveSettings",
    "ModelReference",
    "MonitorGauges",
    "MonitorReport",
    "MonitoringStore",
    "NumericSummary",
    "ReferenceProfile",
    "RetrainCosts",
    "RetrainDecision",
    "Statistic",
    "WindowSummary",
    "benjamini_hochberg",
    "build_reference",
    "data_problems",
    "drift_png",
    "drift_report",
    "estimate_performance",
    "evaluate_window",
    "join_labels",
    "labels_table",
    "load_reference",
    "prediction_values",
    "realised_performance",
    "retrain_check",
    "retrain_decision",
    "training_hours",
]
