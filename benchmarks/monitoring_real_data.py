"""Drift, the performance estimate and the retraining decision on real data, against Evidently.

The data ships inside scikit-learn (no download): the Wisconsin breast cancer data (569 rows,
30 numeric features, benign or malignant) and the UCI digits (1,797 rows, 64 pixel counts
0-16, ten classes). Each is split at random into train (40%), holdout (20%) and test (40%); a
StandardScaler + LogisticRegression is fitted on train; as ``build_reference`` does, the
reference profile is the train split's features and the model's predictions on it, and the
holdout fits the calibration (CBPE) and gives the holdout accuracy.

A window is a choice of test rows: all of them (in distribution), rows picked by one or two
features' training quantiles (covariate shift), rows of three classes (prior shift, digits),
or all of them with one column x1000 in every row or in the last 30% (a unit change upstream,
and a window that straddles it; the model is served the broken column). Each window gets:

- drift: ours (``WindowSummary.from_table`` + ``drift_report``, defaults: tests on the
  profile's 20 quantile bins, Benjamini-Hochberg across columns) against the baseline,
  Evidently's ``DataDriftPreset`` with its defaults on the raw train and window frames; the
  per-column agreement, and ours under Evidently's rule (raw samples, no correction), which
  tells the binning and the correction apart from the rest;
- performance: CBPE's estimate (``ModelReference.estimate`` on the served scores) against the
  realised accuracy and AUC once the window's labels are in;
- the retraining decision (``retrain_check``, as ``skewless monitor`` makes it) before labels
  (from the estimate) and after (every row labelled), for the stated costs. A retrain is priced
  at an assumed ``--training-hours`` x ``--workers``: the sklearn fit here takes milliseconds,
  which would price it at a fraction of a cent (recorded as ``fit_s``).

Then: ``--null-splits`` more random splits, whose test window is in distribution (false alarms
of either side, CBPE's error, the decisions); and speed: the breast cancer rows resampled with
replacement (reference from train, window from the larger tumours) to ``--sizes`` rows, our
summary + report against Evidently's ``Report.run`` on the same frames (best of ``--repeats``
each, one run each above 100k rows), and 100 window summaries, stored as JSON, merged (a
live window never needs its raw rows). The ratio is Evidently's seconds over ours.

    python benchmarks/monitoring_real_data.py [--quick] [--out benchmarks/results/monitoring_real_data.json]
"""

from __future__ import annotations

import argparse
import datetime
import functools
import gc
import json
import math
import os
import platform
import time
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from runtime.monitoring import (
    Calibration,
    DriftConfig,
    DriftReport,
    LabelJoin,
    ModelReference,
    MonitorReport,
    ReferenceProfile,
    RetrainCosts,
    WindowSummary,
    drift_report,
    estimate_performance,
    realised_performance,
    retrain_check,
)

SPLIT = (0.4, 0.2)  # train, holdout; the rest is test
MERGED_PARTS = 100


# -- the baseline: Evidently ---------------------------------------------------------


def _removed_in_pandas_3(dtype: Any) -> Any:
    raise NotImplementedError("pandas 3 removed infer_dtype_from_object; Evidently's TestColumnsType needs it")


@functools.cache
def _evidently() -> tuple[Any, Any, Any, Any]:
    """Evidently's ``DataDefinition, Dataset, Report, DataDriftPreset``. Every release up to
    0.7.23 imports ``pandas.core.dtypes.common.infer_dtype_from_object`` at import, which
    pandas 3 removed; only its legacy TestColumnsType calls it (never run here), so a stub
    that raises keeps the import working (as tests/unit/test_monitoring_evidently.py does)."""
    import pandas.core.dtypes.common as common

    if not hasattr(common, "infer_dtype_from_object"):
        common.infer_dtype_from_object = _removed_in_pandas_3
    with warnings.catch_warnings():  # its dependencies' deprecations at import
        warnings.simplefilter("ignore", DeprecationWarning)
        from evidently import DataDefinition, Dataset, Report
        from evidently.presets import DataDriftPreset
    return DataDefinition, Dataset, Report, DataDriftPreset


@dataclass(frozen=True)
class Evidently:
    """Evidently's answer, read from ``Snapshot.dict()``, and the seconds ``Report.run`` took."""

    drifted: dict[str, bool]
    dataset_drift: bool
    methods: dict[str, int]
    seconds: float


def evidently_drift(reference: pd.DataFrame, current: pd.DataFrame, columns: Sequence[str]) -> Evidently:
    """Evidently's DataDriftPreset with its defaults: method per column by the reference's
    size and distinct values, no correction, the dataset drifts at a share >= 0.5."""
    definition_cls, dataset, report, preset = _evidently()
    definition = definition_cls(numerical_columns=list(columns))
    gc.collect()
    with warnings.catch_warnings():  # Evidently calls DataFrame.dropna(inplace=True), which pandas 3 deprecates
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"evidently\.")
        warnings.simplefilter("ignore", RuntimeWarning)  # its KS on tied counts, and constant pixel columns
        start = time.perf_counter()
        snapshot = report([preset()], include_tests=True).run(
            dataset.from_pandas(current, data_definition=definition),
            dataset.from_pandas(reference, data_definition=definition),
        )
        seconds = time.perf_counter() - start
    result = snapshot.dict()
    metrics = [m for m in result["metrics"] if m["config"]["type"] == "evidently:metric_v2:ValueDrift"]
    [share_test] = [t for t in result["tests"] if t["id"] == "lt"]  # "share of drifted columns < 0.5"
    return Evidently(
        drifted={
            t["metric_config"]["params"]["column"]: t["status"] == "FAIL" for t in result["tests"] if t["id"] == "drift"
        },
        dataset_drift=share_test["status"] == "FAIL",
        methods=dict(Counter(m["config"]["method"] for m in metrics)),
        seconds=seconds,
    )


# -- the data, the model and its reference -------------------------------------------


@dataclass(frozen=True)
class Data:
    name: str
    frame: pd.DataFrame  # the features
    target: np.ndarray  # class indices
    classes: list[str]


def load(name: str) -> Data:
    from sklearn import datasets

    bunch = {"breast_cancer": datasets.load_breast_cancer, "digits": datasets.load_digits}[name](as_frame=True)
    return Data(name, bunch.data, bunch.target.to_numpy(), [str(c) for c in bunch.target_names])


@dataclass(frozen=True)
class Trained:
    data: Data
    train: np.ndarray  # row indices
    test: np.ndarray
    model: Any  # the fitted sklearn pipeline
    fit_s: float
    reference: ModelReference

    @property
    def columns(self) -> list[str]:
        return list(self.data.frame.columns)

    def train_frame(self) -> pd.DataFrame:
        return self.data.frame.iloc[self.train].reset_index(drop=True)


def arrow(frame: pd.DataFrame) -> pa.Table:
    return pa.Table.from_pandas(frame, preserve_index=False)


def served(task: str, classes: Sequence[str], probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the monitored prediction, the CBPE score) of each row, as ``runtime.monitoring`` defines
    them: P(positive) and P(positive) for a binary model; the predicted class and the top
    class's probability for a multiclass one."""
    if task == "binary":
        return probs[:, 1], probs[:, 1]
    return np.asarray(classes, dtype=object)[probs.argmax(axis=1)], probs.max(axis=1)


def realised(task: str, probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    found = realised_performance(task, probs.argmax(axis=1), labels, probs, classes=list(range(probs.shape[1])))
    return {k: v for k, v in found.items() if k != "rows"}


def train(data: Data, seed: int) -> Trained:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    order = np.random.default_rng(seed).permutation(len(data.frame))
    a, b = round(SPLIT[0] * len(order)), round(sum(SPLIT) * len(order))
    tr, hold, test = order[:a], order[a:b], order[b:]
    x, y = data.frame, data.target
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))
    start = time.perf_counter()
    model.fit(x.iloc[tr], y[tr])
    fit_s = time.perf_counter() - start

    task = "binary" if len(data.classes) == 2 else "multiclass"
    prediction, _ = served(task, data.classes, model.predict_proba(x.iloc[tr]))
    columns = list(x.columns)
    profile = ReferenceProfile.from_table(arrow(x.iloc[tr]), numeric=columns, predictions=prediction)
    hold_probs = model.predict_proba(x.iloc[hold])
    calibration = Calibration.fit_probabilities(hold_probs, y[hold])
    expected = estimate_performance(hold_probs, list(range(len(data.classes))), calibration)
    reference = ModelReference(
        task=task,
        classes=list(range(len(data.classes))),
        features=dict.fromkeys(columns, "numeric"),
        profile=profile,
        calibration=calibration,
        holdout=realised(task, hold_probs, y[hold]),
        expected={k: v for k, v in expected.items() if k != "rows"},
        holdout_rows=len(hold),
    )
    return Trained(data, tr, test, model, fit_s, reference)


# -- the windows ---------------------------------------------------------------------

Pick = Callable[[pd.DataFrame, pd.DataFrame, np.ndarray], np.ndarray]  # (train, test, test labels) -> row mask


@dataclass(frozen=True)
class WindowSpec:
    name: str
    what: str
    rows: Pick
    alter: Callable[[pd.DataFrame], pd.DataFrame] | None = None  # what the pipeline did to the served rows


def _above_median(train: pd.DataFrame, test: pd.DataFrame, column: str) -> np.ndarray:
    return np.asarray(test[column] > train[column].median())


def _unit_change(frame: pd.DataFrame, share: float = 1.0) -> pd.DataFrame:
    """``mean area`` x1000 in the last ``share`` of the rows: the window's end came through a
    pipeline that switched from mm² to µm² (read as the old unit, so x1000)."""
    factor = np.where(np.arange(len(frame)) >= round((1.0 - share) * len(frame)), 1000.0, 1.0)
    return frame.assign(**{"mean area": frame["mean area"] * factor})


def _ink(frame: pd.DataFrame) -> pd.Series:
    return frame.sum(axis=1)


def _band(train: pd.DataFrame, test: pd.DataFrame, column: str, low: float, high: float) -> np.ndarray:
    lo, hi = np.quantile(train[column], [low, high])
    return np.asarray((test[column] >= lo) & (test[column] <= hi))


WINDOWS: dict[str, list[WindowSpec]] = {
    "breast_cancer": [
        WindowSpec("test split", "all test rows: in distribution", lambda tr, te, y: np.ones(len(te), bool)),
        WindowSpec(
            "mean radius > median",
            "test rows above the training median of mean radius: larger tumours, mostly malignant",
            lambda tr, te, y: _above_median(tr, te, "mean radius"),
        ),
        WindowSpec(
            "worst radius q45-q80",
            "test rows in the training's 45th-80th percentile band of worst radius: near the decision boundary",
            lambda tr, te, y: _band(tr, te, "worst radius", 0.45, 0.80),
        ),
        WindowSpec(
            "texture & smoothness > median",
            "test rows above the training medians of mean texture and of mean smoothness",
            lambda tr, te, y: _above_median(tr, te, "mean texture") & _above_median(tr, te, "mean smoothness"),
        ),
        WindowSpec(
            "mean area x1000",
            "all test rows, mean area multiplied by 1000 upstream (a unit change) and served so",
            lambda tr, te, y: np.ones(len(te), bool),
            _unit_change,
        ),
        WindowSpec(
            "mean area x1000 in 30%",
            "all test rows, mean area x1000 in the last 30% of them: a window that straddles the breakage",
            lambda tr, te, y: np.ones(len(te), bool),
            functools.partial(_unit_change, share=0.3),
        ),
    ],
    "digits": [
        WindowSpec("test split", "all test rows: in distribution", lambda tr, te, y: np.ones(len(te), bool)),
        WindowSpec(
            "ink > median",
            "test rows whose total ink (sum of the 64 pixels) is above the training median: heavier strokes",
            lambda tr, te, y: np.asarray(_ink(te) > _ink(tr).median()),
        ),
        WindowSpec(
            "digits 1, 8, 9 only",
            "test rows of the classes 1, 8 and 9 (prior shift, to the classes the model confuses most)",
            lambda tr, te, y: np.isin(y, [1, 8, 9]),
        ),
    ],
}


def _verdict(report: DriftReport) -> dict[str, Any]:
    return {
        "dataset_drift": report.dataset_drift,
        "n_drifted": report.n_drifted,
        "n_tested": report.n_tested,
        "drifted": report.drifted_features,
        "problems": [str(p) for p in report.problems],
        "prediction": None if report.prediction is None else report.prediction.verdict,
    }


def _agreement(report: DriftReport, theirs: Evidently) -> dict[str, Any]:
    """Per column, over the columns ours gave a verdict on (a data problem gets none)."""
    judged = [r for r in report.features if not r.data_problem]
    differ = [r.feature for r in judged if r.drifted != theirs.drifted[r.feature]]
    return {"agree": len(judged) - len(differ), "of": len(judged), "differ": differ}


def judge(t: Trained, spec: WindowSpec, costs: RetrainCosts, args: argparse.Namespace) -> dict[str, Any]:
    x, ref = t.data.frame, t.reference
    train_frame, test_frame = t.train_frame(), x.iloc[t.test].reset_index(drop=True)
    mask = spec.rows(train_frame, test_frame, t.data.target[t.test])
    frame = test_frame[mask].reset_index(drop=True)
    labels = t.data.target[t.test][mask]
    if spec.alter is not None:
        frame = spec.alter(frame)
    probs = t.model.predict_proba(frame)
    prediction, score = served(ref.task, t.data.classes, probs)

    window = WindowSummary.from_table(ref.profile, arrow(frame), predictions=prediction)
    ours = drift_report(ref.profile, window)
    uncorrected = drift_report(ref.profile, window, config=DriftConfig(correction=False))
    samples = {c: (train_frame[c].to_numpy(), frame[c].to_numpy()) for c in t.columns}
    with warnings.catch_warnings():  # SciPy's ks_2samp on tied pixel counts: "switching to method=asymp"
        warnings.filterwarnings("ignore", "ks_2samp: Exact calculation unsuccessful", RuntimeWarning)
        exact = drift_report(ref.profile, window, config=DriftConfig(correction=False), samples=samples)
    theirs = evidently_drift(train_frame, frame, t.columns)

    estimated = {k: v for k, v in ref.estimate(score).items() if k != "rows"}
    truth = realised(ref.task, probs, labels)
    n = len(frame)
    report = MonitorReport(
        app="bench",
        version="1",
        since=0.0,
        until=0.0,
        rows=n,
        flushes=1,
        replicas=1,
        dropped=0,
        reference=ref,
        drift=ours,
        estimated=estimated,
        window=window,
    )
    decide = functools.partial(
        retrain_check, costs=costs, training_hours=args.training_hours, workers=args.workers, min_labels=args.min_labels
    )
    before = decide(report)
    after = decide(replace(report, labels=LabelJoin(n, n, truth, None, None)))
    return {
        "dataset": t.data.name,
        "window": spec.name,
        "what": spec.what,
        "rows": n,
        "ours": _verdict(ours),
        "ours_no_correction": _verdict(uncorrected),
        "ours_evidently_rule": _verdict(exact),
        "evidently": {
            "dataset_drift": theirs.dataset_drift,
            "n_drifted": sum(theirs.drifted.values()),
            "n_tested": len(theirs.drifted),
            "drifted": [c for c, d in theirs.drifted.items() if d],
            "methods": theirs.methods,
            "run_s": theirs.seconds,
        },
        "agreement": _agreement(ours, theirs),
        "agreement_no_correction": _agreement(uncorrected, theirs),
        "agreement_evidently_rule": _agreement(exact, theirs),
        "problem_columns_evidently": {
            p.feature: "drift" if theirs.drifted[p.feature] else "no drift" for p in ours.problems
        },
        "performance": {
            "holdout": dict(ref.holdout),
            "holdout_estimated": dict(ref.expected),
            "estimated": estimated,
            "realised": truth,
            "abs_error": {k: abs(estimated[k] - truth[k]) for k in estimated if k in truth},
        },
        "decision_before_labels": before.to_dict(),
        "decision_after_labels": after.to_dict(),
    }


def null_splits(name: str, seeds: Sequence[int], costs: RetrainCosts, args: argparse.Namespace) -> dict[str, Any]:
    """The in-distribution test window of more random splits: what flags when nothing moved."""
    data = load(name)
    rows = [judge(train(data, seed), WINDOWS[name][0], costs, args) for seed in seeds]
    errors = [r["performance"]["abs_error"]["accuracy"] for r in rows]
    return {
        "dataset": name,
        "splits": len(rows),
        "seeds": list(seeds),
        "ours_dataset_drift": sum(r["ours"]["dataset_drift"] for r in rows),
        "ours_splits_with_a_flagged_column": sum(r["ours"]["n_drifted"] > 0 for r in rows),
        "ours_flagged_columns_mean": float(np.mean([r["ours"]["n_drifted"] for r in rows])),
        "ours_no_correction_splits_with_a_flagged_column": sum(r["ours_no_correction"]["n_drifted"] > 0 for r in rows),
        "evidently_dataset_drift": sum(r["evidently"]["dataset_drift"] for r in rows),
        "evidently_splits_with_a_flagged_column": sum(r["evidently"]["n_drifted"] > 0 for r in rows),
        "evidently_flagged_columns_mean": float(np.mean([r["evidently"]["n_drifted"] for r in rows])),
        "columns": rows[0]["ours"]["n_tested"],
        "cbpe_accuracy_abs_error_mean": float(np.mean(errors)),
        "cbpe_accuracy_abs_error_max": float(np.max(errors)),
        "retrain_before_labels": sum(r["decision_before_labels"]["retrain"] for r in rows),
        "retrain_after_labels": sum(r["decision_after_labels"]["retrain"] for r in rows),
        "degradation_before_labels_mean": float(np.mean([r["decision_before_labels"]["degradation"] for r in rows])),
    }


# -- speed ---------------------------------------------------------------------------


def best_of(repeats: int, fn: Callable[[], Any]) -> tuple[float, Any]:
    best, result = math.inf, None
    for _ in range(repeats):
        gc.collect()
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def summarise_and_report(profile: ReferenceProfile, table: pa.Table) -> DriftReport:
    """What judging a window costs us: count it over the profile's bins, then the report."""
    return drift_report(profile, WindowSummary.from_table(profile, table))


def speed(t: Trained, sizes: Sequence[int], reference_rows: int, repeats: int) -> dict[str, Any]:
    """Our summary + report against Evidently's run on the same resampled frames."""
    rng = np.random.default_rng(1)
    train_frame, test_frame = t.train_frame(), t.data.frame.iloc[t.test].reset_index(drop=True)
    larger = test_frame[_above_median(train_frame, test_frame, "mean radius")].reset_index(drop=True)
    reference = train_frame.iloc[rng.integers(0, len(train_frame), reference_rows)].reset_index(drop=True)
    profile_s, profile = best_of(1, lambda: ReferenceProfile.from_table(arrow(reference), numeric=t.columns))
    runs = []
    for n in sizes:
        current = larger.iloc[rng.integers(0, len(larger), n)].reset_index(drop=True)
        k = repeats if n <= 100_000 else 1  # both sides alike; one run each at 1M rows (Evidently's takes ~40 s)
        to_arrow_s, table = best_of(k, functools.partial(arrow, current))
        ours_s, ours = best_of(k, functools.partial(summarise_and_report, profile, table))
        theirs = min((evidently_drift(reference, current, t.columns) for _ in range(k)), key=lambda e: e.seconds)
        runs.append(
            {
                "reference_rows": reference_rows,
                "window_rows": n,
                "runs_best_of": k,
                "columns": len(t.columns),
                "ours_s": ours_s,
                "ours_pandas_to_arrow_s": to_arrow_s,
                "evidently_s": theirs.seconds,
                "ratio": theirs.seconds / ours_s,
                "ratio_with_arrow_conversion": theirs.seconds / (ours_s + to_arrow_s),
                "ours_statistics": sorted({r.statistic for r in ours.features}),
                "evidently_methods": theirs.methods,
                "ours_n_drifted": ours.n_drifted,
                "evidently_n_drifted": sum(theirs.drifted.values()),
                "agreement": _agreement(ours, theirs),
            }
        )
        del current, table
    merge = merge_check(profile, larger, rng, sizes[0], repeats)
    return {"profile_s": profile_s, "reference_rows": reference_rows, "runs": runs, "merge": merge}


def merge_check(
    profile: ReferenceProfile, rows: pd.DataFrame, rng: np.random.Generator, n: int, repeats: int
) -> dict[str, Any]:
    """100 summaries of slices of one window, stored as JSON, merged: the same counts and
    verdicts as one summary of the whole window."""
    table = arrow(rows.iloc[rng.integers(0, len(rows), n)].reset_index(drop=True))
    step = n // MERGED_PARTS
    parts = [table.slice(i * step, step) for i in range(MERGED_PARTS)]
    stored = [json.dumps(WindowSummary.from_table(profile, p).to_dict()) for p in parts]
    loaded = [WindowSummary.from_dict(json.loads(s)) for s in stored]
    merge_s, merged = best_of(repeats, lambda: functools.reduce(WindowSummary.merge, loaded))
    whole = WindowSummary.from_table(profile, table.slice(0, step * MERGED_PARTS))
    same_counts = all(merged.numeric[c].counts == s.counts for c, s in whole.numeric.items())
    std_diff = max(abs(merged.numeric[c].std - s.std) / s.std for c, s in whole.numeric.items() if s.std)
    a, b = drift_report(profile, merged), drift_report(profile, whole)
    value_diff = max(abs(x.value - y.value) for x, y in zip(a.features, b.features, strict=True))
    return {
        "parts": MERGED_PARTS,
        "rows_per_part": step,
        "merge_s": merge_s,
        "summary_json_bytes": len(stored[0]),
        "window_arrow_bytes": table.nbytes,
        "counts_equal": same_counts,
        "std_max_rel_diff": std_diff,
        "verdicts_equal": [r.drifted for r in a.features] == [r.drifted for r in b.features],
        "statistic_max_abs_diff": value_diff,
    }


# -- output --------------------------------------------------------------------------


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _drift_cell(v: dict[str, Any]) -> str:
    return f"{'DRIFT' if v['dataset_drift'] else 'no'} {v['n_drifted']}/{v['n_tested']}"


def print_windows(rows: list[dict[str, Any]]) -> None:
    print(
        f"{'dataset':14}{'window':30}{'rows':>5}  {'ours':12}{'pred':6}{'Evidently':12}{'agree':>7}{'no BH':>7}"
        f"{'EV rule':>8}  {'acc est':>7}{'real':>7}{'|err|':>7}{'AUC est':>8}{'real':>7}  retrain? before -> after labels"
    )
    for r in rows:
        perf, est, real = r["performance"], r["performance"]["estimated"], r["performance"]["realised"]
        auc = f"{_num(est.get('auc')):>8}{_num(real.get('auc')):>7}" if "auc" in est else " " * 15
        agree = "".join(
            f"{r[key]['agree']:>{width - 3}}/{r[key]['of']:<2}"
            for key, width in (("agreement", 7), ("agreement_no_correction", 7), ("agreement_evidently_rule", 8))
        )
        before, after = (
            ("retrain" if r[k]["retrain"] else "keep") for k in ("decision_before_labels", "decision_after_labels")
        )
        print(
            f"{r['dataset']:14}{r['window']:30}{r['rows']:>5}  {_drift_cell(r['ours']):12}{r['ours']['prediction']:6}"
            f"{_drift_cell(r['evidently']):12}{agree}  {est['accuracy']:>7.3f}{real['accuracy']:>7.3f}"
            f"{perf['abs_error']['accuracy']:>7.3f}{auc}  {before} -> {after}"
            + (" (data problem)" if r["ours"]["problems"] else "")
        )


def finite(value: Any) -> Any:
    """``value`` with NaN and infinities as None (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def machine() -> dict[str, Any]:
    from importlib.metadata import version

    return {
        "cpu_count": os.cpu_count(),
        "load_average_at_start": list(os.getloadavg()),
        "machine": platform.machine(),
        "python": platform.python_version(),
        **{p: version(p) for p in ("numpy", "pandas", "pyarrow", "scipy", "scikit-learn", "evidently")},
    }


def print_nulls(nulls: list[dict[str, Any]]) -> None:
    for s in nulls:
        print(
            f"\n{s['dataset']}, {s['splits']} more random splits, test window in distribution ({s['columns']} columns): "
            f"dataset drift ours {s['ours_dataset_drift']}, Evidently {s['evidently_dataset_drift']}; "
            f"a column flagged ours {s['ours_splits_with_a_flagged_column']} (mean {s['ours_flagged_columns_mean']:.1f}; "
            f"without BH {s['ours_no_correction_splits_with_a_flagged_column']}), "
            f"Evidently {s['evidently_splits_with_a_flagged_column']} (mean {s['evidently_flagged_columns_mean']:.1f}); "
            f"CBPE |error| mean {s['cbpe_accuracy_abs_error_mean']:.4f}, max {s['cbpe_accuracy_abs_error_max']:.4f}; "
            f"retrain before labels {s['retrain_before_labels']}, after {s['retrain_after_labels']}"
        )


def print_speed(timing: dict[str, Any]) -> None:
    print(
        f"\nspeed: breast cancer rows resampled; reference {timing['reference_rows']:,} rows "
        f"(our profile of it: {timing['profile_s']:.2f} s, once, at training)"
    )
    for s in timing["runs"]:
        print(
            f"  window {s['window_rows']:>9,} rows x {s['columns']} (best of {s['runs_best_of']}): ours {s['ours_s']:.3f} s "
            f"(+{s['ours_pandas_to_arrow_s']:.3f} s pandas->Arrow), Evidently {s['evidently_s']:.2f} s -> "
            f"{s['ratio']:.0f}x ({s['ratio_with_arrow_conversion']:.0f}x with the conversion); drifted ours "
            f"{s['ours_n_drifted']}, Evidently {s['evidently_n_drifted']}, agree {s['agreement']['agree']}/{s['agreement']['of']}"
        )
    m = timing["merge"]
    print(
        f"  merge: {m['parts']} summaries of {m['rows_per_part']:,} rows (JSON {m['summary_json_bytes']:,} bytes each) "
        f"in {m['merge_s'] * 1000:.1f} ms; counts equal {m['counts_equal']}, verdicts equal {m['verdicts_equal']}, "
        f"std rel diff {m['std_max_rel_diff']:.1e}, statistic diff {m['statistic_max_abs_diff']:.1e}"
    )


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="no null splits, one 10k-row speed size, one timing run")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/monitoring_real_data.json"))
    parser.add_argument("--seed", type=int, default=0, help="the split of the named windows")
    parser.add_argument("--null-splits", type=int, help="more random splits per dataset (default 10; quick 0)")
    parser.add_argument("--sizes", type=int, nargs="+", help="window rows for speed (default 100k 1M; quick 10k)")
    parser.add_argument("--reference-rows", type=int, help="reference rows for speed (default 100k; quick 10k)")
    parser.add_argument("--repeats", type=int, help="timings: best of this many (default 3, quick 1; 1 over 100k rows)")
    parser.add_argument("--cost-per-error", type=float, default=5.0, help="USD per wrong prediction")
    parser.add_argument("--price-per-hour", type=float, default=3.0, help="USD per worker-hour")
    parser.add_argument("--traffic-per-day", type=float, default=10_000.0, help="predictions per day")
    parser.add_argument("--horizon-days", type=float, default=30.0)
    parser.add_argument("--training-hours", type=float, default=2.0, help="assumed wall-clock hours of one retrain")
    parser.add_argument("--workers", type=int, default=4, help="workers of one retrain")
    parser.add_argument("--min-labels", type=int, default=50, help="labels before the realised accuracy counts")
    args = parser.parse_args(argv)
    if args.null_splits is None:
        args.null_splits = 0 if args.quick else 10
    args.sizes = args.sizes or ([10_000] if args.quick else [100_000, 1_000_000])
    args.reference_rows = args.reference_rows or (10_000 if args.quick else 100_000)
    args.repeats = args.repeats or (1 if args.quick else 3)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    costs = RetrainCosts(args.cost_per_error, args.price_per_hour, args.traffic_per_day, args.horizon_days)
    info = machine()
    started = time.perf_counter()
    _evidently()
    seconds = {"imports": time.perf_counter() - started}

    trained = {name: train(load(name), args.seed) for name in WINDOWS}
    rows = [judge(trained[name], spec, costs, args) for name, specs in WINDOWS.items() for spec in specs]
    seconds["windows"] = time.perf_counter() - started - sum(seconds.values())
    retrain_usd = args.training_hours * args.workers * args.price_per_hour
    break_even = retrain_usd / (costs.traffic_per_day * costs.horizon_days * costs.cost_per_error)
    print(
        f"costs: {args.cost_per_error:g} USD an error, {args.traffic_per_day:,.0f} predictions/day for "
        f"{args.horizon_days:g} days; a retrain {args.training_hours:g} h x {args.workers} workers x "
        f"{args.price_per_hour:g} USD = {retrain_usd:g} USD (assumed; the sklearn fits took "
        + ", ".join(f"{n} {t.fit_s * 1000:.0f} ms" for n, t in trained.items())
        + f"): retrain when accuracy is down > {break_even:.2e}"
    )
    for name, t in trained.items():
        hold = ", ".join(f"{k} {v:.4f}" for k, v in t.reference.holdout.items())
        print(f"{name}: holdout {hold}; CBPE on the holdout: accuracy {t.reference.expected['accuracy']:.4f}")
    print(
        "ours: binned tests + Benjamini-Hochberg (defaults); no BH: ours binned without the correction; "
        "EV rule: ours on raw samples without the correction (Evidently's rule)"
    )
    print_windows(rows)
    for r in rows:
        print(f"\n{r['dataset']} / {r['window']} ({r['what']}):")
        print(f"  ours drifted: {r['ours']['drifted']}; prediction: {r['ours']['prediction']}")
        print(f"  Evidently methods {r['evidently']['methods']}; columns that differ: {r['agreement']['differ']}")
        for feature, theirs in r["problem_columns_evidently"].items():
            print(f"  {feature}: ours a data problem, Evidently {theirs}")
        print(f"  before labels: {r['decision_before_labels']['explanation']}")
        print(f"  after labels:  {r['decision_after_labels']['explanation']}")

    seeds = range(args.seed + 1, args.seed + 1 + args.null_splits)
    nulls = [null_splits(name, seeds, costs, args) for name in WINDOWS] if args.null_splits else []
    print_nulls(nulls)
    seconds["null_splits"] = time.perf_counter() - started - sum(seconds.values())
    timing = speed(trained["breast_cancer"], args.sizes, args.reference_rows, args.repeats)
    print_speed(timing)
    seconds["speed"] = time.perf_counter() - started - sum(seconds.values())

    result = {
        "benchmark": "monitoring_real_data",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "quick": args.quick,
        "settings": {
            "split_train_holdout_test": [SPLIT[0], SPLIT[1], round(1 - sum(SPLIT), 10)],
            "seed": args.seed,
            "model": "StandardScaler + LogisticRegression(max_iter=5000)",
            "drift_config": "DriftConfig() defaults; profile bins 20",
            "evidently": "DataDriftPreset() defaults, include_tests=True",
            "costs": asdict(costs),
            "training_hours": args.training_hours,
            "training_hours_note": "assumed, not measured: the sklearn fit takes milliseconds (models.*.fit_s)",
            "workers": args.workers,
            "retrain_usd": retrain_usd,
            "break_even_degradation": break_even,
            "min_labels": args.min_labels,
        },
        "models": {
            n: {
                "rows": len(t.data.frame),
                "features": len(t.columns),
                "classes": len(t.data.classes),
                "train_rows": len(t.train),
                "test_rows": len(t.test),
                "calibration_rows": t.reference.calibration.rows if t.reference.calibration else 0,
                "fit_s": t.fit_s,
                "holdout": dict(t.reference.holdout),
                "holdout_estimated": dict(t.reference.expected),
            }
            for n, t in trained.items()
        },
        "windows": rows,
        "null_splits": nulls,
        "speed": timing,
        "seconds": seconds | {"total": time.perf_counter() - started},
        "machine": info | {"load_average_at_end": list(os.getloadavg())},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(finite(result), indent=2, allow_nan=False) + "\n")
    print(f"\nwrote {args.out} ({result['seconds']['total']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
