"""Live monitoring on a real Serve app: two replicas summarise drifted traffic into one store,
answers carry request ids, labels come back through the endpoint, and a real Prometheus
scraping Ray's metrics export fires the drift alert from the shipped rules."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from runtime.data import SyntheticConfig, generate_synthetic
from runtime.monitoring import ModelReference, MonitoringStore, evaluate_window
from runtime.serving import build_predictor_app, run_app
from tests.conftest import wait_for_condition
from tests.monitored_model import packaged_with_reference
from tests.prometheus import require_prometheus, running_prometheus

RULES = Path(__file__).resolve().parents[2] / "cluster" / "prometheus" / "skewless-rules.yml"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return packaged_with_reference(tmp_path_factory.mktemp("monitored"))


async def _post_all(url: str, rows: list[dict[str, Any]], limit: int = 8) -> list[httpx.Response]:
    sem = asyncio.Semaphore(limit)
    async with httpx.AsyncClient(timeout=60) as client:

        async def one(row: dict[str, Any]) -> httpx.Response:
            async with sem:
                return await client.post(url, json={"instances": [row]})

        return list(await asyncio.gather(*(one(r) for r in rows)))


def test_drifted_traffic_labels_and_a_real_prometheus_alert(
    serve_clean: int, ray_session: Any, model_dir: Path, tmp_path: Path
) -> None:
    require_prometheus()
    store_dir = tmp_path / "store"
    args = {
        "model_uri": str(model_dir),
        "monitoring": {"store": str(store_dir), "flush_interval_s": 0.5, "evaluate_interval_s": 1, "window_s": 600},
    }
    options = {"num_replicas": 2, "ray_actor_options": {"num_cpus": 0.25}}
    run_app(build_predictor_app(args, options), name="monitored", route_prefix="/monitored")
    endpoint = f"http://127.0.0.1:{serve_clean}/monitored"
    wait_for_condition(lambda: httpx.get(f"{endpoint}/healthz", timeout=5).status_code == 200, timeout=60)

    shifted = pq.read_table(
        generate_synthetic(
            tmp_path / "live.parquet",
            SyntheticConfig(
                rows=600, seed=9, shift={"age": 2.0, "income": 2.0, "tenure_months": 2.0, "support_calls": 2.0}
            ),
        )
    )
    rows = shifted.drop_columns(["churned"]).to_pylist()
    t0 = time.time() - 1
    responses = asyncio.run(_post_all(f"{endpoint}/predict", rows))
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200][:3]
    ids = [r.headers["x-request-id"] for r in responses]
    assert len(set(ids)) == len(ids) and all(r.json()["request_id"] == i for r, i in zip(responses, ids, strict=True))
    mine = httpx.post(f"{endpoint}/predict", json={"instances": rows[:1]}, headers={"x-request-id": "order-42:a"})
    assert mine.headers["x-request-id"] == "order-42:a" and mine.json()["request_id"] == "order-42:a"
    assert len(mine.headers.get_list("x-request-id")) == 1  # Serve's header, not a second one of ours

    # labels for the first 300, through the endpoint; bad ones get a 4xx naming the problem
    truth = [str(v) for v in shifted["churned"].to_pylist()]
    labels = [{"request_id": i, "label": t} for i, t in zip(ids[:300], truth[:300], strict=True)]
    accepted = httpx.post(f"{endpoint}/labels", json={"labels": labels})
    assert accepted.status_code == 200 and accepted.json() == {"accepted": 300}
    bad = httpx.post(f"{endpoint}/labels", json={"labels": [{"label": "1"}]})
    assert bad.status_code == 422 and "request_id" in bad.text
    plain = httpx.post(f"{endpoint}/labels", content=b"x", headers={"content-type": "text/plain"})
    assert plain.status_code == 415

    store = MonitoringStore(str(store_dir))
    version = store.versions("monitored")[0]
    reference = ModelReference.from_dict(json.loads(store.reference("monitored", version) or "{}"))

    seen: list[Any] = []

    def flushed() -> Any:
        report = evaluate_window(store, "monitored", version, reference, since=t0)
        seen[:] = [report.rows, report.replicas, report.labels]
        return report if report.rows >= len(rows) + 1 and report.labels and report.labels.labelled == 300 else None

    try:
        report = wait_for_condition(flushed, timeout=60, interval=0.5, message="both replicas' flushes in the store")
    except TimeoutError:
        raise AssertionError(f"last seen: {seen}; files: {sorted(p.name for p in store_dir.rglob('*'))}") from None
    assert report.rows == len(rows) + 1 and report.replicas == 2, (report.rows, report.replicas)
    assert report.drift is not None and report.drift.dataset_drift, report.drift.table()
    predicted = [str(r.json()["predictions"][0]) for r in responses[:300]]
    expected = float(np.mean(np.asarray(predicted) == np.asarray(truth[:300])))
    assert report.labels is not None and report.labels.metrics["accuracy"] == pytest.approx(expected, abs=1e-12)

    # the evaluating replica publishes the verdict; a real Prometheus scrapes Ray's export and alerts
    node = next(n for n in ray_session.nodes() if n["Alive"])
    target = f"{node['NodeManagerAddress']}:{node['MetricsExportPort']}"
    with running_prometheus(tmp_path, [target], [RULES]) as prometheus:
        alert = prometheus.wait_for_alert("SkewlessInputDrift", timeout_s=120)
        assert alert["labels"]["version"] == version and alert["labels"]["model"] == model_dir.name
        assert float(alert["value"]) >= 0.5
        realised = prometheus.query('max by (metric) (ray_skewless_performance_realised{metric="accuracy"})')
        assert realised and float(realised[0]["value"][1]) == pytest.approx(expected, abs=1e-9)
        estimated = prometheus.query('max by (metric) (ray_skewless_performance_estimated{metric="accuracy"})')
        assert estimated and 0.0 < float(estimated[0]["value"][1]) <= 1.0


def test_monitoring_can_be_turned_off(serve_clean: int, model_dir: Path, tmp_path: Path) -> None:
    store_dir = tmp_path / "off"
    args = {"model_uri": str(model_dir), "monitoring": {"enabled": False, "store": str(store_dir)}}
    run_app(build_predictor_app(args), name="unmonitored", route_prefix="/unmonitored")
    endpoint = f"http://127.0.0.1:{serve_clean}/unmonitored"
    wait_for_condition(lambda: httpx.get(f"{endpoint}/healthz", timeout=5).status_code == 200, timeout=60)
    row = pa.Table.from_pylist([{"age": 40.0, "income": 50_000.0, "tenure_months": 12.0, "support_calls": 1.0,
                                 "plan": "basic", "region": "region_01", "device": "ios"}]).to_pylist()  # fmt: skip
    answer = httpx.post(f"{endpoint}/predict", json={"instances": row})
    assert answer.status_code == 200 and answer.headers["x-request-id"]  # ids are always given
    assert httpx.post(f"{endpoint}/labels", json={"labels": [{"request_id": "x", "label": "1"}]}).status_code == 409
    assert not store_dir.exists()
