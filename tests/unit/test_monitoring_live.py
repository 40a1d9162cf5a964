"""The live monitoring pipeline without Ray: a model packaged with its reference, two replicas'
monitors flushing to one store, labels joined later, and the CLI over that store."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from runtime.cli import app
from runtime.data import SyntheticConfig, generate_synthetic, synthetic_feature_spec
from runtime.errors import DataError
from runtime.monitoring import (
    REFERENCE_FILE,
    LiveMonitor,
    LiveSettings,
    MonitoringStore,
    RetrainCosts,
    evaluate_window,
    load_reference,
    retrain_check,
)
from runtime.registry import LoadedModel, load_model_dir, verify_model_dir
from tests.monitored_model import packaged_with_reference

MODEL_DIR: list[Path] = []


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    """A small MLP trained for a few steps on synthetic churn rows, packaged with its reference."""
    MODEL_DIR[:] = [packaged_with_reference(tmp_path_factory.mktemp("live"))]
    return load_model_dir(MODEL_DIR[0])


def _rows(n: int, seed: int, shift: dict[str, float] | None = None, tmp: Path | None = None) -> pa.Table:
    path = (tmp or Path("/tmp")) / f"live-{seed}-{json.dumps(shift or {}, sort_keys=True).__hash__()}.parquet"
    return pq.read_table(generate_synthetic(path, SyntheticConfig(rows=n, seed=seed, shift=shift or {})))


def _monitor(model: LoadedModel, store: MonitoringStore, replica: str, **settings: Any) -> LiveMonitor:
    reference = load_reference(model.directory)
    return LiveMonitor(
        app="churn",
        model="churn-model",
        version="3",
        replica=replica,
        task="binary",
        reference=reference,
        store=store,
        settings=LiveSettings(**settings),
    )


def _serve(monitor: LiveMonitor, model: LoadedModel, table: pa.Table, prefix: str, per_request: int = 50) -> list[str]:
    ids = []
    for i in range(0, table.num_rows, per_request):
        part = table.slice(i, per_request).drop_columns(["churned"])
        rid = f"{prefix}-{i}"
        monitor.observe(rid, part, model.predict_table(part))
        ids.append(rid)
    return ids


def test_the_reference_is_stored_with_the_model_and_verified(model: LoadedModel) -> None:
    manifest = verify_model_dir(model.directory)
    assert REFERENCE_FILE in manifest["files"]
    reference = load_reference(model.directory)
    assert reference is not None and reference.task == "binary" and reference.calibration is not None
    assert set(reference.features) == {f["name"] for f in synthetic_feature_spec("binary")["features"]}
    assert reference.profile.prediction is not None and reference.profile.n_rows == 6000  # the training rows
    assert 0.5 < reference.expected["accuracy"] < 1.0 and "accuracy" in reference.holdout
    (model.directory / REFERENCE_FILE).write_text(
        (model.directory / REFERENCE_FILE).read_text().replace("6000", "6001")
    )
    try:
        with pytest.raises(Exception, match="sha256"):
            verify_model_dir(model.directory)  # a tampered reference is refused like tampered weights
    finally:
        (model.directory / REFERENCE_FILE).write_text(
            (model.directory / REFERENCE_FILE).read_text().replace("6001", "6000")
        )


def test_two_replicas_flush_summaries_that_merge_into_one_window(model: LoadedModel, tmp_path: Path) -> None:
    store = MonitoringStore(str(tmp_path / "store"))
    a, b = _monitor(model, store, "replica-a"), _monitor(model, store, "replica-b")
    t0 = time.time() - 1
    live = _rows(3000, seed=21, tmp=tmp_path)
    _serve(a, model, live.slice(0, 1800), "a")
    _serve(b, model, live.slice(1800), "b")
    assert a.flush() == 1800 and b.flush() == 1200
    files = list(store.summaries("churn", "3"))
    assert sorted(f.replica for f in files) == ["replica-a", "replica-b"] and sum(f.rows for f in files) == 3000
    report = evaluate_window(store, "churn", "3", load_reference(model.directory), since=t0)  # type: ignore[arg-type]
    assert report.rows == 3000 and report.replicas == 2 and report.flushes == 2
    assert report.drift is not None and not report.drift.dataset_drift, report.drift.table()
    # the merge equals one replica seeing every row
    c = _monitor(model, MonitoringStore(str(tmp_path / "one")), "replica-c")
    _serve(c, model, live, "c")
    c.flush()
    whole = evaluate_window(c.store, "churn", "3", c.reference, since=t0)  # type: ignore[arg-type]
    assert whole.window is not None and report.window is not None
    assert whole.window.numeric["age"].counts == report.window.numeric["age"].counts
    assert whole.window.categorical["plan"].counts == report.window.categorical["plan"].counts
    logged = store.predictions("churn", "3")
    assert logged.num_rows == 3000 and logged["input_hash"].null_count == 0


def test_shifted_traffic_drifts_and_the_estimate_moves_with_the_realised_accuracy(
    model: LoadedModel, tmp_path: Path
) -> None:
    """Covariate shift by selection (the rows of a large pool with high tenure, age, income and
    support calls): the inputs drift, the label's relation to them does not, which is what CBPE
    assumes; its estimate lands within 0.05 of the accuracy the labels then show."""
    store = MonitoringStore(str(tmp_path / "store"))
    monitor = _monitor(model, store, "r0")
    t0 = time.time() - 1
    pool = _rows(60_000, seed=33, tmp=tmp_path)
    keep = np.ones(pool.num_rows, dtype=bool)
    for column, q in (("tenure_months", 0.6), ("age", 0.5), ("income", 0.5), ("support_calls", 0.5)):
        values = np.asarray(pool[column].to_numpy(zero_copy_only=False), dtype=np.float64)
        keep &= np.nan_to_num(values, nan=-np.inf) >= np.nanquantile(values, q)
    shifted = pool.filter(pa.array(keep)).slice(0, 3000)
    assert shifted.num_rows >= 1500
    ids = _serve(monitor, model, shifted, "s", per_request=1)
    monitor.flush()
    report = evaluate_window(store, "churn", "3", monitor.reference, since=t0)  # type: ignore[arg-type]
    assert report.drift is not None and report.drift.dataset_drift, report.drift.table()
    assert {"tenure_months", "age", "income"} <= set(report.drift.drifted_features), report.drift.table()
    assert "accuracy" in report.estimated and "auc" in report.estimated
    assert report.labels is not None and report.labels.labelled == 0

    # labels arrive later, for half of the requests (one row each)
    truth = [str(v) for v in shifted["churned"].to_pylist()]
    half = len(ids) // 2
    store.write_labels(
        "churn",
        pa.table({"request_id": ids[:half], "label": truth[:half], "labelled_at": [time.time() + 3600.0] * half}),
    )
    joined = evaluate_window(store, "churn", "3", monitor.reference, since=t0)  # type: ignore[arg-type]
    predicted = [str(v) for v in model.predict_table(shifted.slice(0, half).drop_columns(["churned"])).values]
    expected = float(np.mean(np.asarray(predicted) == np.asarray(truth[:half])))
    assert joined.labels is not None and joined.labels.labelled == half
    assert joined.labels.metrics["accuracy"] == pytest.approx(expected, abs=1e-12)
    assert joined.labels.lag_median_s == pytest.approx(3600.0, abs=120.0)
    # CBPE on the shifted window lands near the realised accuracy on it
    assert abs(joined.estimated["accuracy"] - expected) < 0.05, (joined.estimated, expected)


def test_a_unit_change_is_a_data_problem_that_blocks_retraining(model: LoadedModel, tmp_path: Path) -> None:
    store = MonitoringStore(str(tmp_path / "store"))
    monitor = _monitor(model, store, "r0")
    t0 = time.time() - 1
    live = _rows(2000, seed=44, tmp=tmp_path)
    live = live.set_column(live.column_names.index("income"), "income", pa.compute.multiply(live["income"], 1000.0))
    _serve(monitor, model, live, "u")
    monitor.flush()
    report = evaluate_window(store, "churn", "3", monitor.reference, since=t0)  # type: ignore[arg-type]
    assert report.drift is not None and [p.feature for p in report.drift.problems] == ["income"]
    costs = RetrainCosts(cost_per_error=1000.0, compute_price_per_hour=0.01, traffic_per_day=1e6)
    decision = retrain_check(report, costs, training_hours=0.1)
    assert not decision.retrain and "pipeline" in decision.reason


def test_the_retraining_decision_flips_with_the_costs(model: LoadedModel, tmp_path: Path) -> None:
    store = MonitoringStore(str(tmp_path / "store"))
    monitor = _monitor(model, store, "r0")
    t0 = time.time() - 1
    shifted = _rows(3000, seed=55, shift={"tenure_months": 3.0, "support_calls": 3.0}, tmp=tmp_path)
    ids = _serve(monitor, model, shifted, "d", per_request=1)
    monitor.flush()
    # labels that say the model is now mostly wrong: a large realised degradation
    wrong = [("0" if str(v) == "1" else "1") for v in model.predict_table(shifted.drop_columns(["churned"])).values]
    store.write_labels("churn", pa.table({"request_id": ids, "label": wrong}))
    report = evaluate_window(store, "churn", "3", monitor.reference, since=t0)  # type: ignore[arg-type]
    assert report.labels is not None and report.labels.metrics["accuracy"] == 0.0
    cheap_errors = RetrainCosts(cost_per_error=1e-6, compute_price_per_hour=50.0, traffic_per_day=1000)
    dear_errors = RetrainCosts(cost_per_error=5.0, compute_price_per_hour=50.0, traffic_per_day=1000)
    keep = retrain_check(report, cheap_errors, training_hours=0.5, workers=2)
    retrain = retrain_check(report, dear_errors, training_hours=0.5, workers=2)
    assert not keep.retrain and retrain.retrain and retrain.degradation_source == "labels"
    assert "50" in retrain.explain() or "100" in retrain.explain()


def test_observing_never_blocks_past_the_buffer_and_counts_what_it_drops(model: LoadedModel, tmp_path: Path) -> None:
    store = MonitoringStore(str(tmp_path / "store"))
    dropped: list[int] = []
    monitor = LiveMonitor(
        app="churn",
        model="m",
        version="3",
        replica="r",
        task="binary",
        reference=load_reference(model.directory),
        store=store,
        settings=LiveSettings(max_buffered_rows=100),
        count_dropped=dropped.append,
    )
    part = _rows(60, seed=3, tmp=tmp_path).drop_columns(["churned"])
    preds = model.predict_table(part)
    for i in range(3):
        monitor.observe(f"x{i}", part, preds)  # 60 fit, the next two would pass 100
    assert monitor.flush() == 60 and dropped == [120]
    assert [f.dropped for f in store.summaries("churn", "3")] == [120]


def test_a_broken_store_loses_the_flush_not_the_request(model: LoadedModel, tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the store's directory should be")
    monitor = _monitor(model, MonitoringStore(str(blocker)), "r0")
    part = _rows(10, seed=5, tmp=tmp_path).drop_columns(["churned"])
    monitor.observe("ok", part, model.predict_table(part))  # never raises
    assert monitor.flush() == 0  # the write failed, was logged, and nothing raised


def test_labels_need_ids_and_labels() -> None:
    from runtime.monitoring import labels_table

    with pytest.raises(DataError, match="request_id"):
        labels_table(pa.table({"label": ["1"]}))
    out = labels_table(pa.table({"request_id": ["a"], "label": [1]}))
    assert out.column_names == ["request_id", "row", "label", "labelled_at"] and out["row"].to_pylist() == [0]


def test_the_cli_reads_drift_labels_report_and_decides(model: LoadedModel, tmp_path: Path) -> None:
    store_dir = tmp_path / "store"
    store = MonitoringStore(str(store_dir))
    monitor = _monitor(model, store, "r0")
    shifted = _rows(
        1500, seed=66, shift={"tenure_months": 2.0, "support_calls": 2.0, "age": 2.0, "income": 2.0}, tmp=tmp_path
    )
    ids = _serve(monitor, model, shifted, "c", per_request=1)
    monitor.flush()
    runner = CliRunner()
    s = ["--store", str(store_dir)]

    result = runner.invoke(app, ["monitor", "drift", "churn", "--png", str(tmp_path / "drift.png"), *s])
    assert result.exit_code == 0, result.output
    assert "dataset: DRIFT: 4 of 7" in result.output and "tenure" in result.output and "estimated now" in result.output
    assert (tmp_path / "drift.png").stat().st_size > 10_000
    assert (tmp_path / "drift.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    labels = tmp_path / "labels.csv"
    with labels.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["request_id", "label"])
        w.writerows(zip(ids, [str(v) for v in shifted["churned"].to_pylist()], strict=True))
    result = runner.invoke(app, ["monitor", "labels", str(labels), "--app", "churn", *s])
    assert result.exit_code == 0, result.output
    assert f"stored {len(ids):,} labels" in result.output and f"{len(ids):,} match" in result.output

    result = runner.invoke(app, ["monitor", "drift", "churn", "--json", *s])
    data = json.loads(result.output)
    assert data["drift"]["dataset_drift"] is True and data["performance"]["labelled_rows"] == len(ids)

    result = runner.invoke(
        app, ["monitor", "report", "churn", "--format", "html", "--out", str(tmp_path / "r.html"), *s]
    )
    assert result.exit_code == 0, result.output
    page = (tmp_path / "r.html").read_text()
    assert "<table>" in page and "tenure_months" in page and "realised" in page

    base = ["monitor", "retrain-check", "churn", "--compute-price", "3", "--training-hours", "0.5", *s]
    cheap = runner.invoke(app, [*base, "--cost-per-error", "0.000001", "--json"])
    dear = runner.invoke(app, [*base, "--cost-per-error", "50", "--traffic-per-day", "100000", "--json"])
    assert cheap.exit_code == 0 and dear.exit_code == 0, cheap.output + dear.output
    assert json.loads(cheap.output)["retrain"] is False
    dear_data = json.loads(dear.output)
    assert dear_data["degradation_source"] == "labels"
    assert dear_data["retrain"] is (dear_data["degradation"] > 0)

    missing = runner.invoke(app, ["monitor", "drift", "nope", *s])
    assert missing.exit_code != 0 and "no monitoring data for app 'nope'" in str(missing.exception)


def test_the_label_join_reads_a_class_however_it_is_spelled_and_counts_a_request_once(model: LoadedModel) -> None:
    """Float classes logged as "1.0" and labelled "1" (a CSV, a JSON client) match; a request id
    logged twice (a retry, a reused id) counts once; a NaN score or an unknown label is left out."""
    from dataclasses import replace

    from runtime.monitoring import join_labels

    reference = load_reference(MODEL_DIR[0])
    assert reference is not None
    floaty = replace(reference, classes=[0.0, 1.0])
    predictions = pa.table(
        {
            "request_id": ["a", "b", "c", "c", "d", "e"],
            "row": pa.array([0, 0, 0, 0, 0, 0], pa.int32()),
            "ts": [1.0, 1.0, 1.0, 2.0, 1.0, 1.0],
            "prediction": ["1.0", "0.0", "0.0", "1.0", "1.0", "1.0"],
            "score": [0.9, 0.2, 0.3, 0.8, float("nan"), 0.7],
        }
    )
    labels = pa.table(
        {
            "request_id": ["a", "b", "c", "d", "e"],
            "row": pa.array([0, 0, 0, 0, 0], pa.int32()),
            "label": ["1", "0", "1", "1", "maybe"],
            "labelled_at": [5.0] * 5,
        }
    )
    joined = join_labels(predictions, labels, floaty)
    assert joined.predictions == 5 and joined.labelled == 4  # "c" once (its latest), "e" has no class
    assert joined.metrics["accuracy"] == 1.0 and "auc" in joined.metrics  # d's NaN score only leaves the AUC


def test_an_extreme_input_does_not_cost_the_flush(model: LoadedModel, tmp_path: Path) -> None:
    store = MonitoringStore(str(tmp_path / "store"))
    monitor = _monitor(model, store, "r0")
    part = _rows(20, seed=8, tmp=tmp_path).drop_columns(["churned"])
    income = part["income"].to_pylist()
    income[0], income[1] = 1e300, -1e300  # squared in the moments: inf
    part = part.set_column(part.column_names.index("income"), "income", pa.array(income, pa.float64()))
    monitor.observe("big", part, model.predict_table(part))
    assert monitor.flush() == 20
    assert sum(f.rows for f in store.summaries("churn", "3")) == 20 and store.predictions("churn").num_rows == 20


def test_the_store_refuses_dot_names_and_redacts_its_uri(tmp_path: Path) -> None:
    from runtime.errors import ConfigError

    store = MonitoringStore(str(tmp_path / "store"))
    with pytest.raises(ConfigError, match="cannot name"):
        store.write_labels("..", pa.table({"request_id": ["a"], "label": ["1"]}))
    assert not (tmp_path / "labels").exists()  # nothing written beside the store
    with pytest.raises(ConfigError) as err:
        MonitoringStore("s3://AKIAEXAMPLE:s3cr3t@bucket/x?region=%%%")
    assert "s3cr3t" not in str(err.value)


def test_labels_join_over_a_longer_window_than_drift_with_one_read(model: LoadedModel, tmp_path: Path) -> None:
    """Labels arrive late: the evaluator joins them over ``label_since`` while drift and the
    estimate stay on ``[since, until)``; the prediction log is read once for both."""
    store = MonitoringStore(str(tmp_path / "store"))
    monitor = _monitor(model, store, "r0")
    t0 = time.time() - 1
    live = _rows(200, seed=12, tmp=tmp_path)
    ids = _serve(monitor, model, live, "late", per_request=1)
    monitor.flush()
    store.write_labels("churn", pa.table({"request_id": ids, "label": [str(v) for v in live["churned"].to_pylist()]}))
    reads: list[tuple[float | None, float | None]] = []
    predictions = store.predictions

    def counted(app: str, version: str | None = None, since: float | None = None, until: float | None = None) -> Any:
        reads.append((since, until))
        return predictions(app, version, since, until)

    store.predictions = counted  # type: ignore[method-assign]
    later = time.time() + 10  # a window after every prediction: nothing to judge for drift or the estimate
    report = evaluate_window(store, "churn", "3", monitor.reference, since=later, until=later + 60, label_since=t0)  # type: ignore[arg-type]
    assert len(reads) == 1 and reads[0][0] == t0
    assert report.rows == 0 and report.drift is None and report.estimated == {}
    assert report.labels is not None and report.labels.labelled == 200


def test_a_flush_works_on_one_chunk_per_column_however_many_requests() -> None:
    """10,000 one-row requests concatenate to 10,000 chunks, which pandas hashes chunk by chunk in
    Python while holding the GIL: the flush combines them first."""
    from runtime.monitoring._live import _concat

    one = pa.table({"x": [1.0], "plan": ["basic"]})
    combined = _concat([one] * 1000)
    assert combined is not None and combined.num_rows == 1000
    assert all(column.num_chunks == 1 for column in combined.columns)
