"""A picture of drift: each drifted feature's reference distribution against the live window's.

Numeric features are drawn over the reference's own bins (quantile bins: the reference fills
each about equally, so a drifted window shows as a slope), categorical ones per vocabulary
value plus the out-of-vocabulary share. Shares, not counts, so windows of any size compare.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np

from runtime.errors import DataError
from runtime.monitoring._drift import PREDICTION
from runtime.monitoring._summary import CategoricalSummary, NumericSummary, Summary
from runtime.monitoring._window import MonitorReport


def _shares(counts: Any) -> np.ndarray:
    c = np.asarray(counts, dtype=np.float64)
    return c / c.sum() if c.sum() else c


def _bins(summary: Summary) -> tuple[list[str], np.ndarray]:
    if isinstance(summary, NumericSummary):
        edges = summary.edges
        labels = [f"<{edges[0]:.3g}"] + [f"{a:.3g}..{b:.3g}" for a, b in itertools.pairwise(edges)]
        labels.append(f">={edges[-1]:.3g}")
        return labels, _shares(summary.counts)
    assert isinstance(summary, CategoricalSummary)
    return [*summary.vocabulary, "(other)"], _shares([*summary.counts, summary.oov])


def drift_png(
    report: MonitorReport, path: str | Path, features: list[str] | None = None, max_features: int = 12
) -> Path:
    """Write the reference-vs-live PNG of ``features`` (default: those that drifted, and the
    prediction when it did; every feature when none did). Returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if report.drift is None or report.window is None:
        raise DataError(f"{report.app} version {report.version}: no rows in the window, nothing to draw")
    profile, window = report.reference.profile, report.window
    pairs: dict[str, tuple[Summary, Summary]] = {
        **{n: (s, window.numeric[n]) for n, s in profile.numeric.items()},
        **{n: (s, window.categorical[n]) for n, s in profile.categorical.items()},
    }
    if profile.prediction is not None and window.prediction is not None:
        pairs[PREDICTION] = (profile.prediction, window.prediction)
    if features is None:
        rows = (*report.drift.features, *(() if report.drift.prediction is None else (report.drift.prediction,)))
        features = [r.feature for r in rows if r.drifted] or list(pairs)
    unknown = [f for f in features if f not in pairs]
    if unknown:
        raise DataError(f"no feature(s) {unknown} in the reference; it has {sorted(pairs)}")
    features = features[:max_features]
    verdicts = {
        r.feature: r
        for r in (*report.drift.features, *(() if report.drift.prediction is None else (report.drift.prediction,)))
    }
    cols = min(3, len(features))
    rows_n = (len(features) + cols - 1) // cols
    fig, axes = plt.subplots(rows_n, cols, figsize=(5.2 * cols, 3.4 * rows_n), squeeze=False)
    for ax, name in zip(axes.flat, features, strict=False):
        reference, live = pairs[name]
        labels, ref_share = _bins(reference)
        _, live_share = _bins(live)
        x = np.arange(len(labels))
        ax.bar(x - 0.2, ref_share, width=0.4, label="reference (training)", color="#8da0cb")
        ax.bar(x + 0.2, live_share, width=0.4, label="live window", color="#fc8d62")
        row = verdicts.get(name)
        title = name if row is None else f"{name}: {row.statistic} {row.value:.3g} ({row.verdict})"
        ax.set_title(title, fontsize=9)
        step = max(1, len(labels) // 8)
        ax.set_xticks(x[::step])
        ax.set_xticklabels(labels[::step], rotation=30, ha="right", fontsize=7)
        ax.set_ylabel("share of rows", fontsize=8)
    for ax in list(axes.flat)[len(features) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    verdict = "DRIFT" if report.drift.dataset_drift else "no drift"
    fig.suptitle(
        f"{report.app} version {report.version}: {verdict} ({report.drift.n_drifted}/{report.drift.n_tested} "
        f"features), {report.rows:,} live rows",
        fontsize=10,
    )
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
