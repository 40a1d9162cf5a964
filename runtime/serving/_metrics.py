"""Serving metrics: traffic, latency, batch sizes, and the input/output distributions for drift.

Two backends behind one facade, :class:`ServingMetrics`:

- ``"ray"`` (in a Serve replica): ``ray.util.metrics``, exported by Ray's metrics agent at
  each node's metrics export port. The agent prefixes every name with ``ray_``:
  ``skewless_serve_requests`` is scraped as ``ray_skewless_serve_requests_total``.
- ``"prometheus"`` (unit tests, the FastAPI baseline): ``prometheus_client`` on a private
  ``CollectorRegistry`` (:attr:`ServingMetrics.registry`), without the ``ray_`` prefix.

Metrics as scraped from the ``prometheus`` backend (add ``ray_`` under Ray); every one
carries the labels ``model`` and ``version``:

============================================  =========  =========================================
``skewless_serve_model_info``                 gauge      1 while the replica serves this model
``skewless_serve_device_memory_bytes``        gauge      + ``device``, ``kind``: a GPU replica's
                                                         ``torch_allocated``, ``torch_reserved``,
                                                         ``parameter``, ``total``, ``budget``
``skewless_serve_requests_total``             counter    + ``route``, ``status``
``skewless_serve_request_latency_seconds``    histogram  + ``route``; 0.5 ms .. 5 s
``skewless_serve_batch_rows``                 histogram  rows per model call; 1 .. 16384
``skewless_serve_rows_total``                 counter    rows predicted
``skewless_serve_prediction_bucket_total``    counter    + ``output``, ``le``: cumulative counts of the
                                                         predicted value (regression, ``output="value"``)
                                                         or class probability (``output=<class>``;
                                                         binary: the positive class only); 0..1 by 0.1
``skewless_serve_feature_count_total``        counter    + ``feature``: finite, non-null numeric values
``skewless_serve_feature_nulls_total``        counter    + ``feature``: nulls (numeric and categorical)
``skewless_serve_feature_sum_total``          counter    + ``feature``, ``sign`` (``positive``/``negative``):
                                                         the sums of positive values and of |negative|
                                                         ones (a counter only goes up)
``skewless_serve_feature_sum_squares_total``  counter    + ``feature``
``skewless_serve_feature_bucket_total``       counter    + ``feature``, ``le``: cumulative counts, fixed
                                                         bounds per feature (:func:`feature_buckets`)
``skewless_serve_feature_value_total``        counter    + ``feature``, ``value``: categorical values;
                                                         the fitted vocabulary (at most 50) by name,
                                                         anything else ``__other__``, nulls ``__null__``
============================================  =========  =========================================

A feature's mean over 5 minutes is
``(rate(sum{sign="positive"}[5m]) - rate(sum{sign="negative"}[5m])) / rate(count[5m])``; a
series appears on its first non-zero increment (Ray's counters refuse 0), so a query
falls back with ``or ... * 0`` (see the dashboard). NaN and ±inf values are left out of
count, sums and buckets.

Why counters with an ``le`` label instead of histograms for the row-level distributions: a
Ray ``Histogram`` takes one value per call (10,000 calls for a 10,000-row request) and its
agent rebuilds ``_sum`` from bucket midpoints; here a batch costs a few numpy calls, the
counts are exact, and ``histogram_quantile`` reads the ``le`` label all the same. Row-level
counts are accumulated in memory and handed to the backend at most every
``flush_interval_s``; call :meth:`ServingMetrics.flush` from a periodic hook (Serve's
``check_health``) so a quiet replica's last counts are not held back.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from runtime.tasks import PROBABILITY_BUCKETS, Z_GRID

if TYPE_CHECKING:
    from runtime.preprocessing import FittedPreprocessor
    from runtime.registry import LoadedModel
    from runtime.tasks import Predictions

__all__ = [
    "BATCH_BUCKETS",
    "LATENCY_BUCKETS",
    "METRICS",
    "PROBABILITY_BUCKETS",
    "MetricDef",
    "ServingMetrics",
    "exported_names",
    "feature_buckets",
]

logger = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_BUCKETS = tuple(float(2**i) for i in range(15))  # 1 .. 16384 rows
GENERIC_BUCKETS = (-1e4, -1e3, -100.0, -10.0, -1.0, 0.0, 1.0, 10.0, 100.0, 1e3, 1e4)
MAX_LABEL_VALUES = 50
HOLD_ROWS = 65_536  # held batches are counted at the next flush, or once this many rows are held
OTHER, NULL = "__other__", "__null__"
_LABEL_CHARS = 64  # a client's string as a label value: bounded


class MetricDef:
    """One metric as declared to a backend (Ray needs every tag key up front)."""

    def __init__(self, name: str, kind: Literal["counter", "histogram", "gauge"], doc: str, *labels: str) -> None:
        self.name = name
        self.kind = kind
        self.doc = doc
        self.labels = ("model", "version", *labels)

    def exported(self) -> list[str]:
        """The series names a Prometheus scrape shows (without Ray's ``ray_`` prefix)."""
        if self.kind == "counter":
            return [f"{self.name}_total"]
        if self.kind == "histogram":
            return [f"{self.name}_bucket", f"{self.name}_sum", f"{self.name}_count"]
        return [self.name]


METRICS = {
    m.name: m
    for m in (
        MetricDef("skewless_serve_model_info", "gauge", "1 while a replica serves this model version."),
        MetricDef(
            "skewless_serve_device_memory_bytes",
            "gauge",
            "A GPU replica's memory by kind (torch_allocated, torch_reserved, parameter, total, budget).",
            "device",
            "kind",
        ),
        MetricDef("skewless_serve_requests", "counter", "Requests by route and HTTP status.", "route", "status"),
        MetricDef("skewless_serve_request_latency_seconds", "histogram", "Request latency in seconds.", "route"),
        MetricDef("skewless_serve_batch_rows", "histogram", "Rows per model call."),
        MetricDef("skewless_serve_rows", "counter", "Rows predicted."),
        MetricDef(
            "skewless_serve_prediction_bucket",
            "counter",
            "Cumulative counts of predicted values / class probabilities <= le.",
            "output",
            "le",
        ),
        MetricDef("skewless_serve_feature_count", "counter", "Finite non-null values of a numeric feature.", "feature"),
        MetricDef("skewless_serve_feature_nulls", "counter", "Null values of a feature.", "feature"),
        MetricDef(
            "skewless_serve_feature_sum",
            "counter",
            "Sum of positive / |negative| values of a feature.",
            "feature",
            "sign",
        ),
        MetricDef("skewless_serve_feature_sum_squares", "counter", "Sum of squares of a numeric feature.", "feature"),
        MetricDef(
            "skewless_serve_feature_bucket", "counter", "Cumulative counts of a numeric feature <= le.", "feature", "le"
        ),
        MetricDef(
            "skewless_serve_feature_value", "counter", "Counts of a categorical feature's values.", "feature", "value"
        ),
    )
}
_BUCKETS = {
    "skewless_serve_request_latency_seconds": LATENCY_BUCKETS,
    "skewless_serve_batch_rows": BATCH_BUCKETS,
}


def exported_names(prefix: str = "ray_") -> set[str]:
    """Every series name a scrape can show, e.g. for checking a dashboard's queries."""
    return {prefix + name for m in METRICS.values() for name in m.exported()}


# --------------------------------------------------------------------------- backends


class _Instrument:
    """One metric of either backend: ``add(value, label_values)`` for all three kinds."""

    def __init__(self, definition: MetricDef, backend: str, registry: Any) -> None:
        self.kind = definition.kind
        self._children: dict[tuple[str, ...], Any] = {}
        self._labels = definition.labels
        buckets = _BUCKETS.get(definition.name)
        if backend == "ray":
            from ray.util import metrics as ray_metrics

            if definition.kind == "histogram":
                self._ray: Any = ray_metrics.Histogram(
                    definition.name, definition.doc, boundaries=list(buckets or ()), tag_keys=definition.labels
                )
            else:
                ray_cls: Any = ray_metrics.Counter if definition.kind == "counter" else ray_metrics.Gauge
                self._ray = ray_cls(definition.name, definition.doc, tag_keys=definition.labels)
            self._prom: Any = None
        else:
            import prometheus_client as prom

            kwargs: dict[str, Any] = {"labelnames": definition.labels, "registry": registry}
            if definition.kind == "histogram":
                kwargs["buckets"] = buckets
            prom_cls: Any = {"counter": prom.Counter, "histogram": prom.Histogram, "gauge": prom.Gauge}[definition.kind]
            self._prom = prom_cls(definition.name, definition.doc, **kwargs)
            self._ray = None

    def add(self, value: float, label_values: tuple[str, ...]) -> None:
        """Counter: increment; histogram: observe; gauge: set."""
        if self._prom is None:
            tags = dict(zip(self._labels, label_values, strict=True))
            if self.kind == "counter":
                self._ray.inc(value, tags)
            elif self.kind == "histogram":
                self._ray.observe(value, tags)
            else:
                self._ray.set(value, tags)
            return
        child = self._children.get(label_values)
        if child is None:
            child = self._children[label_values] = self._prom.labels(*label_values)
        if self.kind == "counter":
            child.inc(value)
        elif self.kind == "histogram":
            child.observe(value)
        else:
            child.set(value)


# --------------------------------------------------------------------------- row-level counts

_Counts = list[tuple[str, tuple[str, ...], float]]  # (metric, label values, increment)


class _RowCounts:
    """Row-level counts since the last drain, in numpy arrays: no Python loop over rows.

    :meth:`measure` is pure (one batch -> its counts); :meth:`merge` and :meth:`drain`
    run under the facade's lock.
    """

    def __init__(
        self,
        base: tuple[str, str],
        numeric: Mapping[str, Sequence[float]],
        categorical: Mapping[str, Sequence[str]],
        prediction_bounds: Sequence[float],
    ) -> None:
        self._base = base
        bounds = [_bounds(b) for b in numeric.values()]
        self._numeric = list(numeric)
        width = max((b.size for b in bounds), default=0)
        self._num_bounds = np.full((len(bounds), width), np.nan)  # NaN padding: never counted
        for j, b in enumerate(bounds):
            self._num_bounds[j, : b.size] = b
        self._num_le = [[_le(x) for x in b] for b in bounds]
        self._vocab = {n: pa.array(list(v)[:MAX_LABEL_VALUES], pa.string()) for n, v in categorical.items() if v}
        self._vocab_index = {n: {x: i for i, x in enumerate(v.to_pylist())} for n, v in self._vocab.items()}
        self._vocab_labels = {n: [*(_label(x) for x in v.to_pylist()), OTHER, NULL] for n, v in self._vocab.items()}
        self._admitted: dict[str, set[str]] = {n: set() for n, v in categorical.items() if not v}
        self._pred_bounds = _bounds(prediction_bounds)
        self._pred_le = [*(_le(x) for x in self._pred_bounds), "+Inf"]
        self._pending = self.measure(pa.table({}), [])

    def measure(self, table: pa.Table, outputs: Sequence[tuple[str, np.ndarray]]) -> dict[str, Any]:
        """The counts of ``table``'s rows and of the model's ``outputs`` for them (:meth:`outputs`);
        a feature missing from ``table`` counts nothing."""
        n = table.num_rows
        stats = np.zeros((len(self._numeric), 5))  # nulls, count, sum of positives, sum of |negatives|, squares
        le = np.zeros(self._num_bounds.shape)
        names = set(table.schema.names)
        present = [j for j, name in enumerate(self._numeric) if name in names]
        if present and n:
            x = np.empty((n, len(present)))
            for k, j in enumerate(present):
                column = table.column(self._numeric[j])
                stats[j, 0] = column.null_count
                if column.type != pa.float64():
                    column = column.cast(pa.float64(), safe=False)
                x[:, k] = column.to_numpy()  # nulls -> NaN
            finite = np.isfinite(x)
            z = np.where(finite, x, 0.0)
            stats[present, 1] = finite.sum(axis=0)
            stats[present, 2] = np.maximum(z, 0.0).sum(axis=0)
            stats[present, 3] = -np.minimum(z, 0.0).sum(axis=0)
            stats[present, 4] = np.einsum("ij,ij->j", z, z)
            le[present] = (x[:, :, None] <= self._num_bounds[present][None]).sum(axis=0)  # NaN <= b is False
        categorical: dict[str, Any] = {}
        for name, vocab in self._vocab.items():
            if name in names:
                categorical[name] = self._vocab_counts(table.column(name), vocab, self._vocab_index[name])
        for name in self._admitted:
            if name in names:
                found = pc.value_counts(table.column(name).cast(pa.string()))
                categorical[name] = dict(zip(found.field(0).to_pylist(), found.field(1).to_pylist(), strict=True))
        predictions = {}
        for output, values in outputs:
            predictions[output] = np.append((values[:, None] <= self._pred_bounds[None]).sum(axis=0), values.size)
        return {"rows": n, "stats": stats, "le": le, "categorical": categorical, "predictions": predictions}

    @staticmethod
    def _vocab_counts(column: pa.ChunkedArray, vocab: pa.Array, index: dict[str, int]) -> np.ndarray:
        """Counts per vocabulary value, then OTHER, then NULL."""
        other, null = len(vocab), len(vocab) + 1
        if len(column) <= 32:  # a request's few rows: a dict lookup beats two arrow kernels
            codes = [null if v is None else index.get(v, other) for v in column.to_pylist()]
            return np.bincount(codes, minlength=null + 1).astype(np.float64)
        column = column.cast(pa.string())
        found = pc.fill_null(pc.index_in(column, value_set=vocab), other).to_numpy()
        counts = np.bincount(found, minlength=null + 1).astype(np.float64)
        counts[other] -= column.null_count  # index_in gave nulls the OTHER code
        counts[null] = column.null_count
        return counts

    def outputs(self, preds: Predictions | None) -> list[tuple[str, np.ndarray]]:
        """The model's outputs to count, by label: the value, or each class's probability."""
        if preds is None:
            return []
        if preds.probabilities is None or preds.classes is None:
            outputs = [("value", np.asarray(preds.values, dtype=np.float64))]
        else:
            probs = np.asarray(preds.probabilities, dtype=np.float64)
            classes = list(preds.classes)
            first = 1 if len(classes) == 2 else 0  # binary: P(positive) says it all
            last = min(len(classes), MAX_LABEL_VALUES)
            outputs = [(_label(str(classes[j])), probs[:, j]) for j in range(first, last)]
        return [(label, v[np.isfinite(v)]) for label, v in outputs]

    def merge(self, batch: dict[str, Any]) -> None:
        pending = self._pending
        pending["rows"] += batch["rows"]
        pending["stats"] += batch["stats"]
        pending["le"] += batch["le"]
        for name, counts in batch["categorical"].items():
            if name in self._admitted:
                merged = pending["categorical"].setdefault(name, {})
                for value, count in counts.items():
                    label = self._admit(name, value)
                    merged[label] = merged.get(label, 0) + count
            elif name in pending["categorical"]:
                pending["categorical"][name] += counts
            else:
                pending["categorical"][name] = counts
        for output, counts in batch["predictions"].items():
            previous = pending["predictions"].get(output)
            pending["predictions"][output] = counts if previous is None else previous + counts

    def _admit(self, name: str, value: str | None) -> str:
        """The first MAX_LABEL_VALUES distinct values are labels; later new ones are OTHER."""
        if value is None:
            return NULL
        label, admitted = _label(value), self._admitted[name]
        if label not in admitted and len(admitted) < MAX_LABEL_VALUES:
            admitted.add(label)
        return label if label in admitted else OTHER

    def drain(self) -> _Counts:
        """The pending counts as metric increments (zeros left out); then start again."""
        pending, self._pending = self._pending, self.measure(pa.table({}), [])
        out: _Counts = [("skewless_serve_rows", self._base, float(pending["rows"]))]
        stat_metrics = (
            ("skewless_serve_feature_nulls", ()),
            ("skewless_serve_feature_count", ()),
            ("skewless_serve_feature_sum", ("positive",)),
            ("skewless_serve_feature_sum", ("negative",)),
            ("skewless_serve_feature_sum_squares", ()),
        )
        for j, name in enumerate(self._numeric):
            key = (*self._base, name)
            for (metric, extra), v in zip(stat_metrics, pending["stats"][j].tolist(), strict=True):
                out.append((metric, (*key, *extra), v))
            for le, v in zip(self._num_le[j], pending["le"][j].tolist(), strict=False):
                out.append(("skewless_serve_feature_bucket", (*key, le), v))
            out.append(("skewless_serve_feature_bucket", (*key, "+Inf"), float(pending["stats"][j, 1])))
        for name, counts in pending["categorical"].items():
            key = (*self._base, name)
            if isinstance(counts, dict):
                labelled = list(counts.items())
            else:
                labelled = list(zip(self._vocab_labels[name], counts.tolist(), strict=True))
            nulls = sum(v for label, v in labelled if label == NULL)
            out.append(("skewless_serve_feature_nulls", key, float(nulls)))
            out.extend(("skewless_serve_feature_value", (*key, label), float(v)) for label, v in labelled)
        for output, counts in pending["predictions"].items():
            key = (*self._base, output)
            out.extend(
                ("skewless_serve_prediction_bucket", (*key, le), float(v))
                for le, v in zip(self._pred_le, counts.tolist(), strict=True)
            )
        return [(m, labels, v) for m, labels, v in out if v > 0 and math.isfinite(v)]


# --------------------------------------------------------------------------- the facade


class ServingMetrics:
    """The predictor's metrics; row-level counts are computed per batch with numpy/pyarrow.

    ``numeric_buckets`` maps each numeric input feature to its bucket bounds;
    ``categorical_values`` maps each categorical one to the values counted by name (empty:
    the first :data:`MAX_LABEL_VALUES` distinct values seen). :meth:`for_model` derives
    both, and the prediction buckets, from a loaded model.
    """

    def __init__(
        self,
        model_name: str,
        model_version: str | None,
        backend: Literal["ray", "prometheus"] = "ray",
        *,
        numeric_buckets: Mapping[str, Sequence[float]] | None = None,
        categorical_values: Mapping[str, Sequence[str]] | None = None,
        prediction_buckets: Sequence[float] = PROBABILITY_BUCKETS,
        flush_interval_s: float = 1.0,
    ) -> None:
        if backend not in ("ray", "prometheus"):
            raise ValueError(f"backend {backend!r} must be 'ray' or 'prometheus'")
        self.registry: Any = None
        if backend == "prometheus":
            from prometheus_client import CollectorRegistry

            self.registry = CollectorRegistry(auto_describe=True)
        self._base = (model_name, model_version or "")
        self._m = {name: _Instrument(d, backend, self.registry) for name, d in METRICS.items()}
        self._rows = _RowCounts(self._base, numeric_buckets or {}, categorical_values or {}, prediction_buckets)
        self._flush_interval_s = flush_interval_s
        self._held: list[tuple[pa.Table, list[tuple[str, np.ndarray]]]] = []  # batches not yet counted
        self._held_rows = 0
        self._lock = threading.Lock()
        self._last_flush = time.monotonic()
        self._m["skewless_serve_model_info"].add(1.0, self._base)

    @classmethod
    def for_model(
        cls,
        model: LoadedModel,
        model_name: str,
        model_version: str | None,
        backend: Literal["ray", "prometheus"] = "ray",
        flush_interval_s: float = 1.0,
    ) -> ServingMetrics:
        """Buckets from the fitted state: feature bounds, vocabularies, and the task's prediction buckets."""
        prep = model.preprocessor
        if prep is None or model.task is None:
            raise ValueError(f"model {model_name!r} does not predict from rows of features; no serving metrics")
        state = prep.state["features"]
        categorical = {f.name: state[f.name]["vocabulary"] for f in prep.spec.features if f.type == "categorical"}
        predictions = model.task.prediction_buckets(model.head)
        return cls(
            model_name,
            model_version,
            backend,
            numeric_buckets=feature_buckets(prep),
            categorical_values=categorical,
            prediction_buckets=predictions,
            flush_interval_s=flush_interval_s,
        )

    # ------------------------------------------------------------------ per request

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        """One finished request (any status, errors included)."""
        self._m["skewless_serve_requests"].add(1.0, (*self._base, route, str(status)))
        self._m["skewless_serve_request_latency_seconds"].add(float(seconds), (*self._base, route))

    # ------------------------------------------------------------------ per batch

    def observe_batch(self, table: pa.Table, preds: Predictions) -> None:
        """The rows of one model call and its outputs; never raises (metrics must not fail a request)."""
        try:
            self._observe_batch(table, preds)
        except Exception:  # a metrics bug must not turn a good prediction into a 500
            logger.exception("serving metrics: observe_batch failed; this batch is not counted")

    def _observe_batch(self, table: pa.Table, preds: Predictions) -> None:
        if table.num_rows == 0:
            return
        outputs = self._rows.outputs(preds)
        self._m["skewless_serve_batch_rows"].add(float(table.num_rows), self._base)
        with self._lock:  # held, measured at the flush: one numpy pass over many requests' rows
            self._held.append((table, outputs))
            self._held_rows += table.num_rows
            due = time.monotonic() - self._last_flush >= self._flush_interval_s or self._held_rows >= HOLD_ROWS
        if due:
            self.flush()

    def _measure_held(self) -> None:
        """Count the batches held since the last flush, those of one schema together."""
        with self._lock:
            held, self._held, self._held_rows = self._held, [], 0
        groups: dict[pa.Schema, list[tuple[pa.Table, list[tuple[str, np.ndarray]]]]] = {}
        for table, outputs in held:
            groups.setdefault(table.schema, []).append((table, outputs))
        for batches in groups.values():
            rows = sum(t.num_rows for t, _ in batches)
            try:
                table = pa.concat_tables([t for t, _ in batches])
                by_output: dict[str, list[np.ndarray]] = {}
                for _, outputs in batches:
                    for label, values in outputs:
                        by_output.setdefault(label, []).append(values)
                counts = self._rows.measure(table, [(k, np.concatenate(v)) for k, v in by_output.items()])
            except Exception:  # a metrics bug must not fail the request that flushes
                logger.exception("serving metrics: %d held rows could not be counted", rows)
                continue
            with self._lock:
                self._rows.merge(counts)

    def set_device_memory(self, device: str, values: Mapping[str, float]) -> None:
        """The replica's device memory, one gauge per kind (bytes)."""
        for kind, value in values.items():
            self._m["skewless_serve_device_memory_bytes"].add(float(value), (*self._base, device, kind))

    def flush(self) -> None:
        """Count the batches held since the last flush and hand the counts to the backend."""
        self._measure_held()
        with self._lock:
            counts = self._rows.drain()
            self._last_flush = time.monotonic()
        for metric, labels, value in counts:
            self._m[metric].add(value, labels)


def _bounds(values: Sequence[float]) -> np.ndarray:
    """Sorted, finite, de-duplicated bounds rounded to 4 significant digits (readable ``le``)."""
    rounded = {float(f"{v:.4g}") for v in values if math.isfinite(v)}
    if not rounded:
        raise ValueError(f"bucket bounds {list(values)!r} must hold at least one finite number")
    return np.array(sorted(rounded), dtype=np.float64)


def _le(bound: float) -> str:
    return f"{bound:.4g}"


def _label(value: str) -> str:
    return value if len(value) <= _LABEL_CHARS else value[:_LABEL_CHARS] + "..."


def feature_buckets(preprocessor: FittedPreprocessor) -> dict[str, tuple[float, ...]]:
    """Raw-space bucket bounds per numeric feature, fixed at fit time so series stay comparable.

    Bucketized features use their own boundaries; standardized ones the fit mean ± up to
    3 standard deviations (through ``expm1`` for ``log1p`` features); others a log grid.
    """
    from runtime.preprocessing import NumericFeature

    state = preprocessor.state["features"]
    out: dict[str, tuple[float, ...]] = {}
    for feature in preprocessor.spec.features:
        if feature.type == "categorical":
            continue
        grid: Sequence[float] = GENERIC_BUCKETS
        fs = state.get(feature.name, {})
        numeric = feature if isinstance(feature, NumericFeature) else None
        if numeric is not None and numeric.bucketize:
            grid = list(numeric.bucketize)
        elif "mean" in fs and "std" in fs:
            grid = [fs["mean"] + fs["std"] * z for z in Z_GRID]
        if numeric is not None and numeric.log1p and grid is not GENERIC_BUCKETS:
            with np.errstate(over="ignore"):
                grid = np.expm1(np.asarray(grid, dtype=np.float64)).tolist()
        out[feature.name] = tuple(_bounds(grid).tolist())
    return out
