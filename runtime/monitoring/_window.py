"""One window of live traffic judged against the model's reference: drift, data problems,
performance estimated from the scores, and realised once labels have arrived.

:func:`evaluate_window` merges the summaries every replica flushed for one version over
``[since, until)`` (no raw request log is read for drift), runs :func:`drift_report`, estimates
accuracy and AUC from the logged scores with the reference's calibration (CBPE), and joins the
prediction log with the labels received so far for the realised figures and the label lag.
The replica that evaluates on an interval, the CLI and the report all call it.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from runtime.errors import DataError
from runtime.monitoring._drift import DriftConfig, DriftReport, drift_report
from runtime.monitoring._performance import realised_performance
from runtime.monitoring._profile import WindowSummary
from runtime.monitoring._reference import ModelReference
from runtime.monitoring._retrain import RetrainCosts, RetrainDecision, retrain_decision
from runtime.monitoring._store import MonitoringStore

logger = logging.getLogger("ray.serve")


@dataclass(frozen=True)
class LabelJoin:
    """Predictions of a window joined with the labels received for them."""

    predictions: int
    labelled: int
    metrics: Mapping[str, float]  # realised: accuracy (+ auc) or rmse, mae
    lag_median_s: float | None  # labelled_at - predicted at, over the labelled rows
    lag_p90_s: float | None

    @property
    def coverage(self) -> float:
        return self.labelled / self.predictions if self.predictions else 0.0


@dataclass(frozen=True)
class MonitorReport:
    """A window of one version: what came in, how far it drifted, how the model performs."""

    app: str
    version: str
    since: float
    until: float
    rows: int
    flushes: int
    replicas: int
    dropped: int
    reference: ModelReference
    drift: DriftReport | None
    estimated: Mapping[str, float] = field(default_factory=dict)
    labels: LabelJoin | None = None
    window: WindowSummary | None = None
    model: str = ""

    @property
    def retrain_blocked_by(self) -> list[str]:
        """Data problems (pipeline breakage) found in the window: fix those, do not retrain."""
        return [str(p) for p in self.drift.problems] if self.drift is not None else []

    def to_dict(self) -> dict[str, Any]:
        return {
            "app": self.app,
            "version": self.version,
            "since": self.since,
            "until": self.until,
            "rows": self.rows,
            "flushes": self.flushes,
            "replicas": self.replicas,
            "dropped_rows": self.dropped,
            "drift": None if self.drift is None else self.drift.to_dict(),
            "performance": {
                "reference": dict(self.reference.holdout),
                "reference_estimated": dict(self.reference.expected),
                "estimated": dict(self.estimated),
                "realised": None if self.labels is None else dict(self.labels.metrics),
                "labelled_rows": 0 if self.labels is None else self.labels.labelled,
                "logged_rows": 0 if self.labels is None else self.labels.predictions,
                "label_lag_median_s": None if self.labels is None else self.labels.lag_median_s,
                "label_lag_p90_s": None if self.labels is None else self.labels.lag_p90_s,
            },
        }

    def performance_lines(self) -> list[str]:
        """The performance figures in words, with where each comes from."""
        ref, exp = self.reference.holdout, self.reference.expected
        lines = []
        for metric in ("accuracy", "auc", "rmse", "mae"):
            parts = []
            if metric in ref:
                parts.append(f"holdout {ref[metric]:.4f}")
            if metric in self.estimated:
                base = f" (holdout estimate {exp[metric]:.4f})" if metric in exp else ""
                parts.append(f"estimated now {self.estimated[metric]:.4f}{base}")
            if self.labels is not None and metric in self.labels.metrics:
                parts.append(f"realised {self.labels.metrics[metric]:.4f} on {self.labels.labelled:,} labels")
            if len(parts) > 1 or (parts and metric in self.estimated):
                lines.append(f"{metric}: " + ", ".join(parts))
        if self.labels is not None:
            lag = self.labels.lag_median_s
            lines.append(
                f"labels: {self.labels.labelled:,} of {self.labels.predictions:,} logged predictions "
                f"({self.labels.coverage:.1%})"
                + ("" if lag is None else f", median lag {_duration(lag)}, p90 {_duration(self.labels.lag_p90_s or 0)}")
            )
        return lines

    def markdown(self) -> str:
        """A readable report of the window (``skewless monitor report``)."""
        when = f"{_utc(self.since)} .. {_utc(self.until)} UTC"
        out = [
            f"# Monitoring report: {self.app}, version {self.version}",
            "",
            f"- window: {when}; {self.rows:,} rows from {self.replicas} replica(s), {self.flushes} flush(es)"
            + (f"; {self.dropped:,} rows dropped from the prediction log (buffer full)" if self.dropped else ""),
        ]
        if self.drift is None:
            out += ["- drift: no rows in the window", ""]
        else:
            d = self.drift
            out.append(
                f"- drift: **{'DRIFT' if d.dataset_drift else 'no drift'}**: {d.n_drifted} of {d.n_tested} features "
                f"drifted ({d.share:.0%}; the dataset drifts at >= {d.drift_share:.0%}); correction {d.correction}"
            )
            out += [
                "",
                "| feature | kind | statistic | value | p (adjusted) | threshold | verdict |",
                "|---|---|---|---|---|---|---|",
            ]
            for r in (*d.features, *(() if d.prediction is None else (d.prediction,))):
                p = "" if r.p_adjusted is None else f"{r.p_adjusted:.3g}"
                out.append(
                    f"| {r.feature} | {r.kind} | {r.statistic} | {_num(r.value)} | {p} | {_num(r.threshold)} | {r.verdict} |"
                )
            if d.problems:
                out += ["", "## Data problems (upstream pipeline changes, not drift: fix them, do not retrain)", ""]
                out += [f"- {p}" for p in d.problems]
        out += ["", "## Performance", ""]
        out += [f"- {line}" for line in self.performance_lines()] or ["- no performance figures for this task"]
        return "\n".join(out) + "\n"

    def html(self) -> str:
        """The Markdown report as a standalone HTML page (tables and lists rendered)."""
        import html

        body: list[str] = []
        in_table = False
        for line in self.markdown().splitlines():
            if line.startswith("|"):
                cells = [c.strip() for c in line.strip("|").split("|")]
                if set("".join(cells)) <= {"-"}:
                    continue
                tag = "th" if not in_table else "td"
                if not in_table:
                    body.append("<table>")
                    in_table = True
                body.append("<tr>" + "".join(f"<{tag}>{html.escape(c)}</{tag}>" for c in cells) + "</tr>")
                continue
            if in_table:
                body.append("</table>")
                in_table = False
            if line.startswith("# "):
                body.append(f"<h1>{html.escape(line[2:])}</h1>")
            elif line.startswith("## "):
                body.append(f"<h2>{html.escape(line[3:])}</h2>")
            elif line.startswith("- "):
                text = html.escape(line[2:]).replace("**", "")
                body.append(f"<p>&bull; {text}</p>")
        if in_table:
            body.append("</table>")
        style = "body{font-family:sans-serif;max-width:60em}td,th{padding:2px 8px;border-bottom:1px solid #ddd}"
        return (
            f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(self.app)}</title>"
            f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n"
        )


def merged_window(
    store: MonitoringStore, app: str, version: str, reference: ModelReference, since: float, until: float
) -> tuple[WindowSummary, int, int, int, str]:
    """(the merged summary, flushes, replicas, dropped rows, the model's name) of ``[since, until)``."""
    window = WindowSummary.empty(reference.profile)
    flushes, replicas, dropped, model = 0, set(), 0, ""
    for f in store.summaries(app, version, since, until):
        part = WindowSummary.from_dict(f.summary)
        reference.profile.check_window(part)
        window = window.merge(part)
        flushes += 1
        replicas.add(f.replica)
        dropped += f.dropped
        model = f.model or model
    return window, flushes, len(replicas), dropped, model


def class_keys(classes: list[Any] | None) -> dict[str, int]:
    """Each spelling of each class, to its index: ``str(c)`` as the log writes it, and for a
    number or a boolean the spellings a labels file or a JSON client uses (``1`` for ``1.0``,
    ``true``/``1`` for ``True``), so a correct label is never counted wrong for its spelling."""
    keys: dict[str, int] = {}
    for i, c in enumerate(classes or []):
        spellings = {str(c)}
        if isinstance(c, bool):
            spellings |= {str(c).lower(), str(int(c))}
        elif isinstance(c, (int, float)) and float(c).is_integer():
            spellings |= {str(int(c)), str(float(c))}
        for spelling in spellings:
            keys.setdefault(spelling, i)
    return keys


def join_labels(predictions: pa.Table, labels: pa.Table, reference: ModelReference) -> LabelJoin:
    """Realised performance of the logged ``predictions`` that have a label in ``labels``.

    A request id logged twice (a client reusing ids, a retried call) counts once, its latest
    prediction; labels that name no class (classification) or no number (regression), and
    non-finite predictions, are left out rather than counted wrong.
    """
    n = predictions.num_rows
    if n == 0 or labels.num_rows == 0:
        return LabelJoin(n, 0, {}, None, None)
    frame = predictions.select(["request_id", "row", "ts", "prediction", "score"]).to_pandas()
    frame = frame.sort_values("ts", kind="stable").drop_duplicates(["request_id", "row"], keep="last")
    joined = frame.merge(labels.to_pandas(), on=["request_id", "row"], how="inner")
    if joined.empty:
        return LabelJoin(len(frame), 0, {}, None, None)
    metrics: dict[str, float] = {}
    if reference.task == "regression":
        import pandas as pd

        truth = pd.to_numeric(joined["label"], errors="coerce").to_numpy(dtype=np.float64)
        predicted = pd.to_numeric(joined["prediction"], errors="coerce").to_numpy(dtype=np.float64)
        ok = np.isfinite(truth) & np.isfinite(predicted)
        joined = joined[ok]
        if ok.any():
            metrics = realised_performance("regression", predicted[ok], truth[ok])
    else:
        keys = class_keys(reference.classes)
        truth = joined["label"].map(keys)
        predicted = joined["prediction"].map(keys)
        ok = (truth.notna() & predicted.notna()).to_numpy()
        joined = joined[ok]
        if ok.any():
            t = truth[ok].to_numpy(dtype=np.int64)
            p = predicted[ok].to_numpy(dtype=np.int64)
            metrics = {"accuracy": float(np.mean(p == t))}
            scores = joined["score"].to_numpy(dtype=np.float64)
            finite = np.isfinite(scores)
            if reference.task == "binary" and finite.any():
                probabilities = np.stack([1.0 - scores[finite], scores[finite]], axis=1)
                auc = realised_performance(
                    "binary", p[finite], t[finite], probabilities=probabilities, classes=[0, 1]
                ).get("auc")
                if auc is not None:
                    metrics["auc"] = float(auc)
    metrics = {k: float(v) for k, v in metrics.items() if k != "rows" and math.isfinite(float(v))}
    if joined.empty:
        return LabelJoin(len(frame), 0, {}, None, None)
    lag = joined["labelled_at"].to_numpy(dtype=np.float64) - joined["ts"].to_numpy(dtype=np.float64)
    return LabelJoin(len(frame), len(joined), metrics, float(np.median(lag)), float(np.percentile(lag, 90)))


def evaluate_window(
    store: MonitoringStore,
    app: str,
    version: str,
    reference: ModelReference,
    *,
    since: float,
    until: float | None = None,
    config: DriftConfig | None = None,
    labels: pa.Table | None = None,
    label_since: float | None = None,
) -> MonitorReport:
    """Judge ``[since, until)`` of ``version`` in ``app`` against ``reference`` (module docstring).

    ``label_since`` (earlier than ``since``: labels arrive late) widens the predictions joined
    with their labels; the prediction log is read once for both.
    """
    until = time.time() if until is None else until
    window, flushes, replicas, dropped, model = merged_window(store, app, version, reference, since, until)
    drift = drift_report(reference.profile, window, config=config) if window.n_rows else None
    first = since if label_since is None else min(since, label_since)
    logged = store.predictions(app, version, first, until)
    predictions = logged if first == since else logged.filter(pc.greater_equal(logged["ts"], since))
    estimated: dict[str, float] = {}
    joined: LabelJoin | None = None
    try:  # the estimate and the labels never keep the drift verdict from being reported
        if predictions.num_rows and reference.task in ("binary", "multiclass"):
            scores = np.asarray(predictions["score"].to_numpy(zero_copy_only=False), dtype=np.float64)
            estimate = reference.estimate(scores[np.isfinite(scores)])
            estimated = {k: v for k, v in estimate.items() if k != "rows" and math.isfinite(v)}
        joined = join_labels(logged, store.labels(app, since=first) if labels is None else labels, reference)
    except (DataError, ValueError, KeyError, pa.ArrowException) as exc:
        logger.warning("monitoring: %s version %s: performance not computed (%s)", app, version, exc)
    return MonitorReport(
        app,
        version,
        since,
        until,
        window.n_rows,
        flushes,
        replicas,
        dropped,
        reference,
        drift,
        estimated,
        joined,
        window=window,
        model=model,
    )


def _num(x: float) -> str:
    return "nan" if math.isnan(x) else f"{x:.4g}"


def _utc(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t))


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def retrain_check(
    report: MonitorReport,
    costs: RetrainCosts,
    *,
    training_hours: float | None,
    runs_counted: int = 0,
    workers: int = 1,
    min_labels: int = 200,
    z: float = 1.645,
) -> RetrainDecision:
    """The retraining decision for a judged window (:func:`retrain_decision` on its figures).

    The estimate is compared like with like: CBPE's estimate on the holdout (stored in the
    reference) is subtracted from the live estimate and the difference applied to the holdout
    accuracy, so the estimator's own bias is not counted as degradation.
    """
    reference = report.reference
    if "accuracy" not in reference.holdout:
        raise DataError(
            f"the retraining decision weighs accuracy; a {reference.task} model has none (its holdout metrics: "
            f"{sorted(reference.holdout)})"
        )
    holdout = reference.holdout["accuracy"]
    estimated = report.estimated.get("accuracy")
    if estimated is not None and "accuracy" in reference.expected:
        estimated = min(1.0, max(0.0, holdout + estimated - reference.expected["accuracy"]))
    labels = report.labels
    return retrain_decision(
        reference_accuracy=holdout,
        realised_accuracy=None if labels is None else labels.metrics.get("accuracy"),
        labelled_rows=0 if labels is None else labels.labelled,
        estimated_accuracy=estimated,
        costs=costs,
        training_hours=training_hours,
        runs_counted=runs_counted,
        workers=workers,
        data_problems=report.retrain_blocked_by,
        min_labels=min_labels,
        reference_rows=reference.holdout_rows,
        observed_rows=report.rows,
        z=z,
    )
