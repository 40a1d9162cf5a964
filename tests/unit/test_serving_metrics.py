"""Serving metrics through the prometheus backend, as a scrape shows them; the Ray backend's
declarations; and the Grafana dashboard's queries against the metrics that exist."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from runtime.data import SyntheticConfig, generate_synthetic, synthetic_feature_spec
from runtime.registry import LoadedModel
from runtime.serving import _metrics
from runtime.serving._metrics import MAX_LABEL_VALUES, ServingMetrics, exported_names, feature_buckets
from runtime.tasks import Predictions
from tests.prometheus import MONITORING_METRICS

DASHBOARD = Path(__file__).resolve().parents[2] / "cluster" / "grafana" / "skewless-serving.json"
BASE = {"model": "churn", "version": "3"}


def scrape(metrics: ServingMetrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a scrape, keyed by (series name, labels)."""
    text = generate_latest(metrics.registry).decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    """A sample's value; 0 for a series never incremented (counters appear on their first inc)."""
    return samples.get((name, frozenset({**BASE, **labels}.items())), 0.0)


def simple(**kwargs: Any) -> ServingMetrics:
    return ServingMetrics("churn", "3", "prometheus", flush_interval_s=0.0, **kwargs)


# --------------------------------------------------------------------------- per request


def test_requests_and_latency_by_route_and_status() -> None:
    m = simple()
    m.observe_request("/predict", 200, 0.0007)
    m.observe_request("/predict", 200, 0.003)
    m.observe_request("/predict", 422, 0.0004)
    m.observe_request("/healthz", 200, 0.0001)
    s = scrape(m)
    assert value(s, "skewless_serve_requests_total", route="/predict", status="200") == 2
    assert value(s, "skewless_serve_requests_total", route="/predict", status="422") == 1
    assert value(s, "skewless_serve_requests_total", route="/healthz", status="200") == 1
    assert value(s, "skewless_serve_request_latency_seconds_count", route="/predict") == 3
    assert value(s, "skewless_serve_request_latency_seconds_bucket", route="/predict", le="0.0005") == 1
    assert value(s, "skewless_serve_request_latency_seconds_bucket", route="/predict", le="0.001") == 2
    assert value(s, "skewless_serve_request_latency_seconds_bucket", route="/predict", le="5.0") == 3
    assert value(s, "skewless_serve_request_latency_seconds_sum", route="/predict") == pytest.approx(0.0041)
    assert value(s, "skewless_serve_model_info") == 1
    assert ("skewless_serve_requests_total", frozenset({**BASE, "route": "/predict", "status": "200"}.items())) in s


def test_device_memory_is_a_gauge_per_kind() -> None:
    m = simple()
    m.set_device_memory("cuda:0", {"torch_reserved": 3 << 20, "budget": 20 << 30})
    m.set_device_memory("cuda:0", {"torch_reserved": 5 << 20})
    s = scrape(m)
    assert value(s, "skewless_serve_device_memory_bytes", device="cuda:0", kind="torch_reserved") == 5 << 20
    assert value(s, "skewless_serve_device_memory_bytes", device="cuda:0", kind="budget") == 20 << 30


# --------------------------------------------------------------------------- per batch


def test_numeric_feature_count_sums_buckets_and_nulls() -> None:
    m = simple(numeric_buckets={"x": [0.0, 10.0]})
    table = pa.table({"x": pa.array([-2.0, 0.0, 5.0, 20.0, None, float("nan"), float("inf")])})
    m.observe_batch(table, Predictions([0.5] * 7, None, None))
    m.observe_batch(table.slice(2, 1), Predictions([0.5], None, None))  # a second batch adds up
    s = scrape(m)
    feature = {"feature": "x"}
    assert value(s, "skewless_serve_feature_count_total", **feature) == 5  # -2, 0, 5, 20, 5; no NaN/inf/null
    assert value(s, "skewless_serve_feature_nulls_total", **feature) == 1
    assert value(s, "skewless_serve_feature_sum_total", sign="positive", **feature) == 30.0
    assert value(s, "skewless_serve_feature_sum_total", sign="negative", **feature) == 2.0
    assert value(s, "skewless_serve_feature_sum_squares_total", **feature) == 4 + 25 + 400 + 25
    buckets = {le: value(s, "skewless_serve_feature_bucket_total", le=le, **feature) for le in ("0", "10", "+Inf")}
    assert buckets == {"0": 2, "10": 4, "+Inf": 5}  # cumulative, le is "<="
    assert value(s, "skewless_serve_rows_total") == 8
    assert value(s, "skewless_serve_batch_rows_count") == 2
    assert value(s, "skewless_serve_batch_rows_sum") == 8


def test_categorical_values_are_bounded_with_other_and_null() -> None:
    m = simple(categorical_values={"plan": ["basic", "pro"], "free": []})
    plans = ["basic", "pro", "pro", "gold", None, "x" * 500]
    free = [f"v{i}" for i in range(MAX_LABEL_VALUES + 10)]
    m.observe_batch(pa.table({"plan": plans * 10}), Predictions([0.5] * 60, None, None))
    m.observe_batch(pa.table({"free": free}), Predictions([0.5] * len(free), None, None))
    s = scrape(m)

    def count(feature: str, v: str) -> float:
        return value(s, "skewless_serve_feature_value_total", feature=feature, value=v)

    assert (count("plan", "basic"), count("plan", "pro"), count("plan", "__null__")) == (10, 20, 10)
    assert count("plan", "__other__") == 20  # "gold" and the long string: not in the vocabulary
    assert value(s, "skewless_serve_feature_nulls_total", feature="plan") == 10
    labels = {dict(k[1])["value"] for k in s if k[0] == "skewless_serve_feature_value_total"}
    assert all(len(v) <= 70 for v in labels)
    free_labels = {dict(k[1])["value"] for k in s if dict(k[1]).get("feature") == "free" and "value" in dict(k[1])}
    assert len(free_labels) == MAX_LABEL_VALUES + 1 and count("free", "__other__") == 10


def test_prediction_distribution_binary_multiclass_regression() -> None:
    binary = simple()
    probs = np.array([[0.95, 0.05], [0.5, 0.5], [0.02, 0.98], [0.3, 0.7]], dtype=np.float32)
    binary.observe_batch(pa.table({"a": [1, 2, 3, 4]}), Predictions([0, 0, 1, 1], probs, [0, 1]))
    s = scrape(binary)
    positive = {"output": "1"}  # binary: the positive class only
    assert value(s, "skewless_serve_prediction_bucket_total", le="0.1", **positive) == 1
    assert value(s, "skewless_serve_prediction_bucket_total", le="0.5", **positive) == 2
    assert value(s, "skewless_serve_prediction_bucket_total", le="0.9", **positive) == 3
    assert value(s, "skewless_serve_prediction_bucket_total", le="+Inf", **positive) == 4
    assert not any(dict(k[1]).get("output") == "0" for k in s)

    multi = simple()
    probs3 = np.array([[0.8, 0.1, 0.1], [0.2, 0.2, 0.6]], dtype=np.float32)
    multi.observe_batch(pa.table({"a": [1, 2]}), Predictions(["a", "c"], probs3, ["a", "b", "c"]))
    s = scrape(multi)
    assert {dict(k[1])["output"] for k in s if k[0] == "skewless_serve_prediction_bucket_total"} == {"a", "b", "c"}
    assert value(s, "skewless_serve_prediction_bucket_total", output="c", le="0.5") == 1

    regression = simple(prediction_buckets=[10.0, 100.0])
    regression.observe_batch(pa.table({"a": [1, 2, 3]}), Predictions([5.0, 50.0, 500.0], None, None))
    s = scrape(regression)
    assert value(s, "skewless_serve_prediction_bucket_total", output="value", le="10") == 1
    assert value(s, "skewless_serve_prediction_bucket_total", output="value", le="100") == 2
    assert value(s, "skewless_serve_prediction_bucket_total", output="value", le="+Inf") == 3


def test_one_batch_counts_the_same_as_its_rows_one_by_one() -> None:
    """Large batches take the arrow kernels, single rows a dict lookup: the same counts."""
    rng = np.random.default_rng(3)
    n = 100
    table = pa.table(
        {
            "x": pa.array(rng.normal(0, 2, n), mask=rng.random(n) < 0.1),
            "c": pa.array(rng.choice(["a", "b", "z", "é"], n).tolist(), mask=rng.random(n) < 0.1),
            "o": rng.choice([f"v{i}" for i in range(70)], n),
        }
    )
    probs = rng.random((n, 2))
    config = {"numeric_buckets": {"x": [-1.0, 0.0, 1.0]}, "categorical_values": {"c": ["a", "b", "é"], "o": []}}
    whole, rows = simple(**config), simple(**config)
    whole.observe_batch(table, Predictions([0] * n, probs, [0, 1]))
    for i in range(n):
        rows.observe_batch(table.slice(i, 1), Predictions([0], probs[i : i + 1], [0, 1]))
    a, b = scrape(whole), scrape(rows)
    assert {k for k in a if "_created" not in k[0]} == {k for k in b if "_created" not in k[0]}
    for key, v in a.items():
        if "_created" not in key[0] and "batch_rows" not in key[0]:
            assert b[key] == pytest.approx(v), key


def test_row_counts_wait_for_the_flush_interval_or_flush() -> None:
    m = ServingMetrics("churn", "3", "prometheus", numeric_buckets={"x": [1.0]}, flush_interval_s=3600)
    m.observe_batch(pa.table({"x": [1.0, 2.0]}), Predictions([0.1, 0.2], None, None))
    assert ("skewless_serve_rows_total", frozenset(BASE.items())) not in scrape(m)
    m.flush()
    assert value(scrape(m), "skewless_serve_rows_total") == 2


def test_backend_calls_per_batch_do_not_grow_with_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"n": 0}
    original = _metrics._Instrument.add

    def counting(self: Any, v: float, labels: tuple[str, ...]) -> None:
        calls["n"] += 1
        original(self, v, labels)

    monkeypatch.setattr(_metrics._Instrument, "add", counting)
    m = simple(numeric_buckets={"x": [0.0, 0.5, 1.0]}, categorical_values={"c": ["a", "b"]})
    rng = np.random.default_rng(0)
    per_batch = []
    for n in (10, 100_000):
        table = pa.table({"x": rng.random(n), "c": rng.choice(["a", "b", "z"], n)})
        probs = rng.random((n, 2)).astype(np.float32)
        before = calls["n"]
        m.observe_batch(table, Predictions([0] * n, probs, [0, 1]))
        per_batch.append(calls["n"] - before)
    assert per_batch[0] == per_batch[1] < 60


def test_batches_are_held_and_counted_together_at_the_flush(monkeypatch: pytest.MonkeyPatch) -> None:
    """A request's batch costs an append; the counting runs once per flush over all held rows
    (one pass per schema: JSON and Arrow bodies may decode to different column types)."""
    measured: list[int] = []
    original = _metrics._RowCounts.measure

    def counting(self: Any, table: pa.Table, outputs: Any) -> Any:
        if table.num_rows:  # an empty table starts a new interval's counts
            measured.append(table.num_rows)
        return original(self, table, outputs)

    monkeypatch.setattr(_metrics._RowCounts, "measure", counting)
    m = ServingMetrics("churn", "3", "prometheus", numeric_buckets={"x": [1.5]}, flush_interval_s=3600)
    for i in range(100):
        m.observe_batch(pa.table({"x": [float(i % 3)]}), Predictions([0.25], None, None))
    m.observe_batch(pa.table({"x": pa.array([1, 2], pa.int64())}), Predictions([0.75, 0.75], None, None))
    assert measured == []
    m.flush()
    assert sorted(measured) == [2, 100]
    s = scrape(m)
    assert value(s, "skewless_serve_rows_total") == 102
    assert value(s, "skewless_serve_feature_bucket_total", feature="x", le="1.5") == 34 + 33 + 1
    assert value(s, "skewless_serve_prediction_bucket_total", output="value", le="+Inf") == 102


def test_observe_batch_never_raises(caplog: pytest.LogCaptureFixture) -> None:
    m = simple(numeric_buckets={"x": [1.0]})
    m.observe_batch(pa.table({"x": pa.array([[1.0]])}), Predictions([0.1], None, None))  # a list column
    assert "1 held rows could not be counted" in caplog.text
    m.observe_batch(pa.table({"y": [1.0]}), Predictions([0.1], None, None))  # the feature is absent


# --------------------------------------------------------------------------- from a packaged model


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    import torch

    from runtime.models import MLPConfig, build_model
    from runtime.preprocessing import FeatureSpec, fit
    from runtime.registry import load_model_dir, model_json, write_model_dir
    from runtime.tasks import task_for

    tmp = tmp_path_factory.mktemp("metrics")
    table = pq.read_table(generate_synthetic(tmp / "d.parquet", SyntheticConfig(rows=2000, seed=2)))
    prep = fit(FeatureSpec.model_validate(synthetic_feature_spec("binary")), table)
    config = model_json(MLPConfig(hidden=[8]), prep, task_for("binary"))
    torch.manual_seed(0)
    write_model_dir(tmp / "m", build_model(config).state_dict(), config, prep)
    return load_model_dir(tmp / "m")


def test_for_model_counts_a_real_batch(model: LoadedModel, tmp_path: Path) -> None:
    prep = model.preprocessor
    buckets = feature_buckets(prep)
    assert set(buckets) == {"age", "income", "tenure_months", "support_calls"}
    assert buckets["support_calls"] == (1.0, 2.0, 4.0)  # the spec's bucketize bounds
    assert all(list(b) == sorted(b) for b in buckets.values())
    assert min(buckets["income"]) > -1  # log1p feature: bounds mapped back through expm1

    m = ServingMetrics.for_model(model, "churn", "3", backend="prometheus", flush_interval_s=0.0)
    data = generate_synthetic(tmp_path / "d.parquet", SyntheticConfig(rows=300, seed=9))
    table = pq.read_table(data).select(prep.input_schema.names)
    m.observe_batch(table, model.predict_table(table))
    s = scrape(m)
    assert value(s, "skewless_serve_rows_total") == 300
    for name in buckets:
        counted = value(s, "skewless_serve_feature_count_total", feature=name)
        nulls = value(s, "skewless_serve_feature_nulls_total", feature=name)
        assert counted + nulls == 300
        assert value(s, "skewless_serve_feature_bucket_total", feature=name, le="+Inf") == counted
    plan_vocab = prep.state["features"]["plan"]["vocabulary"]
    seen = sum(value(s, "skewless_serve_feature_value_total", feature="plan", value=v) for v in plan_vocab)
    assert seen + value(s, "skewless_serve_feature_nulls_total", feature="plan") == 300
    assert prep.classes is not None
    assert value(s, "skewless_serve_prediction_bucket_total", output=str(prep.classes[1]), le="+Inf") == 300


def test_ray_backend_declares_every_tag_key(model: LoadedModel) -> None:
    """ray.util.metrics without a running Ray: records are dropped, but names and tags are checked."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Ray warns, then discards, a metric with an invalid name
        m = ServingMetrics.for_model(model, "churn", None, backend="ray", flush_interval_s=0.0)
        m.observe_request("/predict", 200, 0.01)
        table = model.preprocessor.records_to_table(
            [{"age": 30, "income": 1e4, "tenure_months": 3, "support_calls": 1, "plan": "x", "region": None,
              "device": "ios"}]
        )  # fmt: skip
        m._observe_batch(table, model.predict_table(table))  # not the never-raises wrapper
        m.flush()


# --------------------------------------------------------------------------- the dashboard


def test_dashboard_queries_use_only_defined_metrics() -> None:
    board = json.loads(DASHBOARD.read_text())
    assert board["schemaVersion"] >= 36 and board["title"]
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    from runtime.serving import ROLLOUT_METRICS

    known = exported_names("ray_") | set(ROLLOUT_METRICS) | MONITORING_METRICS
    panels = [p for p in board["panels"] if p["type"] != "row"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    used = set()
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            names = set(re.findall(r"\b(ray_skewless_[a-z_]+)", target["expr"]))
            assert names, (panel["title"], target["expr"])
            assert names <= known, (panel["title"], names - known)
            assert target["expr"].count("(") == target["expr"].count(")"), target["expr"]
            used |= names
    titles = " | ".join(p["title"].lower() for p in panels)
    for needed in (
        "request rate",
        "latency",
        "batch size",
        "prediction",
        "feature mean",
        "rollout weights",
        "disagreement",
        "drift verdict",
        "drift score per feature",
        "features drifting",
        "data problems",
        "estimated vs realised vs reference",
        "label lag",
        "prediction-log rows dropped",
    ):
        assert needed in titles, needed
    assert "ray_skewless_serve_request_latency_seconds_bucket" in used
    # every monitoring metric but the window's row count, which only gates an alert
    assert MONITORING_METRICS - used == {"ray_skewless_monitor_window_rows"}


def test_every_metric_is_documented_in_the_module_docstring() -> None:
    doc = _metrics.__doc__ or ""
    for definition in _metrics.METRICS.values():
        shown = definition.name + ("_total" if definition.kind == "counter" else "")
        assert f"``{shown}``" in doc, shown
