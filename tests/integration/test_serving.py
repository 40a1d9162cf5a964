"""The Serve app under the session's real Ray Serve, on 127.0.0.1: batching, bulk Arrow,
backpressure, auth, health, metrics through Ray's export, fuzzing, autoscaling and a model
update under load. Models are packaged directories (random weights, no training needed)."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runtime.data import SyntheticConfig, generate_synthetic, synthetic_feature_spec
from runtime.preprocessing import FeatureSpec, fit
from runtime.registry import load_model_dir, write_model_dir
from runtime.serving import ARROW_STREAM, build_predictor_app, run_app
from tests.conftest import wait_for_condition

pytestmark = pytest.mark.integration
ARROW_HEADERS = {"content-type": ARROW_STREAM}


def _model_dir(path: Path, table: pa.Table, seed: int) -> Path:
    import torch

    from runtime.models import MLPConfig, build_model
    from runtime.registry import model_json
    from runtime.tasks import task_for

    prep = fit(FeatureSpec.model_validate(synthetic_feature_spec()), table)
    config = model_json(MLPConfig(hidden=[32]), prep, task_for("binary"))
    torch.manual_seed(seed)
    write_model_dir(path, build_model(config).state_dict(), config, prep)
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> pa.Table:
    d = tmp_path_factory.mktemp("serving")
    return pq.read_table(generate_synthetic(d / "d.parquet", SyntheticConfig(rows=4000, seed=11)))


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory, data: pa.Table) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("models")
    return _model_dir(d / "v1", data, seed=1), _model_dir(d / "v2", data, seed=2)


def _raw(data: pa.Table) -> pa.Table:
    return data.drop_columns(["churned"])


def _deploy(name: str, port: int, args: dict[str, Any], **options: Any) -> str:
    run_app(build_predictor_app(args, options or None), name=name, route_prefix=f"/{name}")
    endpoint = f"http://127.0.0.1:{port}/{name}"
    wait_for_condition(lambda: httpx.get(f"{endpoint}/healthz", timeout=5).status_code == 200, timeout=60)
    return endpoint


def _arrow(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return bytes(sink.getvalue().to_pybytes())


async def _concurrent_posts(url: str, bodies: list[bytes], headers: dict[str, str], limit: int) -> list[httpx.Response]:
    sem = asyncio.Semaphore(limit)
    async with httpx.AsyncClient(timeout=60) as client:

        async def one(body: bytes) -> httpx.Response:
            async with sem:
                return await client.post(url, content=body, headers=headers)

        return list(await asyncio.gather(*(one(b) for b in bodies)))


def test_json_requests_are_batched_and_bulk_arrow_matches_offline(
    serve_clean: int, models: tuple[Path, Path], data: pa.Table
) -> None:
    args = {"model_uri": str(models[0]), "max_batch_size": 16, "batch_wait_timeout_s": 0.05}
    endpoint = _deploy("batching", serve_clean, args)
    offline = load_model_dir(models[0])
    rows = _raw(data).slice(0, 48).to_pylist()
    bodies = [json.dumps({"instances": [r]}).encode() for r in rows]
    # Request 7 passes decoding but breaks a rule the transform checks (a null in a
    # non-nullable column), inside a batch with others: it alone gets the 422, naming its own row.
    bad = 7
    bodies[bad] = json.dumps({"instances": [{**rows[bad], "tenure_months": None}]}).encode()
    answers = asyncio.run(_concurrent_posts(f"{endpoint}/predict", bodies, {"content-type": "application/json"}, 48))
    assert [a.status_code for a in answers] == [422 if i == bad else 200 for i in range(48)]
    error = answers[bad].json()["error"]
    assert error["field"] == "tenure_months" and error["row"] == 0 and "must not be null" in error["rule"]
    expected = offline.predict_table(_raw(data).slice(0, 48))
    for i, a in enumerate(answers):  # each request got its own row back, not a neighbour's
        if i == bad:
            continue
        body = a.json()
        assert body["predictions"] == [expected.values[i]]
        assert np.allclose(body["probabilities"], expected.probabilities[i : i + 1], atol=1e-6)
    batched = [int(a.headers["x-skewless-batch-requests"]) for i, a in enumerate(answers) if i != bad]
    assert max(batched) > 1 and max(batched) <= 16  # dynamic batching happened, within its cap

    bulk = _raw(data)
    r = httpx.post(f"{endpoint}/predict", content=_arrow(bulk), headers=ARROW_HEADERS, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"].startswith(ARROW_STREAM)
    out = pa.ipc.open_stream(r.content).read_all()
    assert out.num_rows == bulk.num_rows
    assert json.loads(out.schema.metadata[b"model"])["uri"] == str(models[0])
    want = offline.predict_table(bulk)
    assert out["prediction"].to_pylist() == want.values
    assert np.array_equal(out[f"probability_{want.classes[1]}"].to_numpy(), want.probabilities[:, 1])

    health = httpx.get(f"{endpoint}/healthz").json()
    assert health["startup"]["load_s"] > 0 and health["startup"]["warmup_s"] >= 0
    assert health["device"] == {"device": "cpu", "precision": "fp32"}  # device: auto without a GPU


def test_the_shipped_app_logging_writes_no_serve_access_line_per_request(
    serve_clean: int, models: tuple[Path, Path], data: pa.Table
) -> None:
    """``run_app``'s default logging (the shipped config's): Serve's access log is off. An app that
    asks for it gets its lines, so the check looks where Serve writes them."""
    import ray

    body = json.dumps({"instances": _raw(data).slice(0, 1).to_pylist()})
    endpoints = {"quiet": _deploy("quiet", serve_clean, {"model_uri": str(models[0])})}
    run_app(
        build_predictor_app({"model_uri": str(models[0])}),
        name="logged",
        route_prefix="/logged",
        logging_config={"enable_access_log": True},
    )
    endpoints["logged"] = f"http://127.0.0.1:{serve_clean}/logged"
    wait_for_condition(lambda: httpx.get(f"{endpoints['logged']}/healthz", timeout=5).status_code == 200, timeout=60)
    # Ray's throughput-optimized mode buffers the replica's request-path log records, 1,000 at a time
    with httpx.Client(timeout=30) as client:
        for endpoint in endpoints.values():
            for _ in range(1_050):
                r = client.post(f"{endpoint}/predict", content=body, headers={"content-type": "application/json"})
                assert r.status_code == 200
    logs = Path(ray._private.worker._global_node.get_logs_dir_path()) / "serve"

    def access_lines(app: str) -> list[str]:
        files = list(logs.glob(f"replica_{app}_Predictor_*.log"))
        assert files, sorted(p.name for p in logs.iterdir())
        return [line for f in files for line in f.read_text().splitlines() if f"POST /{app} 200" in line]

    wait_for_condition(lambda: len(access_lines("logged")) >= 900, timeout=30, message="Serve's access lines")
    assert access_lines("quiet") == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"device": "cuda"}, "device: cuda, but this replica sees no GPU .ray_actor_options.num_gpus 0"),
        ({"precision": "bf16"}, "precision: bf16 needs a GPU, and this replica serves on the CPU"),
    ],
)
def test_a_replica_that_cannot_get_its_device_fails_at_start_saying_why(
    serve_clean: int, models: tuple[Path, Path], args: dict[str, Any], message: str
) -> None:
    from runtime.errors import ServingError

    with pytest.raises(ServingError, match=message):
        run_app(build_predictor_app({"model_uri": str(models[0]), **args}), name="nodevice", route_prefix="/nodevice")


def test_backpressure_answers_429_with_retry_after_never_hangs(
    serve_clean: int, models: tuple[Path, Path], data: pa.Table
) -> None:
    endpoint = _deploy(
        "backpressure",
        serve_clean,
        {"model_uri": str(models[0]), "max_body_bytes": 64 << 20, "max_instances": 1_000_000},
        max_ongoing_requests=1,
        max_queued_requests=1,
        backpressure_config={"status_code": 429, "retry_after_s": 2},
    )
    big = _arrow(pa.concat_tables([_raw(data)] * 25))  # 100k rows: each call takes a while
    t0 = time.monotonic()
    answers = asyncio.run(_concurrent_posts(f"{endpoint}/predict", [big] * 8, ARROW_HEADERS, 8))
    codes = Counter(a.status_code for a in answers)
    assert set(codes) <= {200, 429} and codes[200] >= 1 and codes[429] >= 1, codes
    assert all(a.headers.get("retry-after") == "2" for a in answers if a.status_code == 429)
    assert time.monotonic() - t0 < 60


def test_api_key_is_required_when_set_and_health_stays_open(
    serve_clean: int, models: tuple[Path, Path], data: pa.Table
) -> None:
    key = "k-" + os.urandom(16).hex()
    endpoint = _deploy(
        "auth",
        serve_clean,
        {"model_uri": str(models[0]), "api_key_env": "SKEWLESS_TEST_API_KEY"},
        ray_actor_options={"num_cpus": 0.5, "runtime_env": {"env_vars": {"SKEWLESS_TEST_API_KEY": key}}},
    )
    body = json.dumps({"instances": _raw(data).slice(0, 2).to_pylist()})
    url = f"{endpoint}/predict"
    none = httpx.post(url, content=body, headers={"content-type": "application/json"})
    assert none.status_code == 401 and none.headers["www-authenticate"].lower().startswith("bearer")
    assert key not in none.text
    wrong = httpx.post(url, content=body, headers={"authorization": "Bearer nope", "content-type": "application/json"})
    assert wrong.status_code == 401
    ok = httpx.post(url, content=body, headers={"authorization": f"Bearer {key}", "content-type": "application/json"})
    assert ok.status_code == 200 and len(ok.json()["predictions"]) == 2
    assert httpx.get(f"{endpoint}/healthz").status_code == 200  # the route table: health needs no key
    # the route table answers what is not a route: 404 naming the routes, 405 with Allow
    missing = httpx.get(f"{endpoint}/nope")
    assert missing.status_code == 404 and "/predict" in missing.json()["error"]["rule"]
    wrong = httpx.get(url)
    assert wrong.status_code == 405 and wrong.headers["allow"] == "POST"


def _urllib_post(url: str, body: bytes, content_type: str) -> tuple[int, dict[str, Any]]:
    """POST with the standard library, as an ordinary client does: the whole body is sent before
    the answer is read."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=120) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_the_input_holes_are_closed_for_an_ordinary_client(
    serve_clean: int, models: tuple[Path, Path], data: pa.Table
) -> None:
    """Each probe that found a hole, sent with the standard library to a live app."""
    import http.client

    endpoint = _deploy("holes", serve_clean, {"model_uri": str(models[0]), "max_body_bytes": 1 << 20})
    url = f"{endpoint}/predict"
    good = _raw(data).slice(0, 2)
    # a body 25 times the limit: the client sends it all, then reads a 413 (not a reset connection)
    status, body = _urllib_post(url, b"x" * (25 << 20), "application/json")
    assert status == 413 and body["error"]["rule"] == f"request body at most {1 << 20} bytes", body
    # no Content-Type at all (what a browser's Blob body sends, without a CORS preflight): 415
    conn = http.client.HTTPConnection("127.0.0.1", serve_clean, timeout=60)
    conn.request("POST", "/holes/predict", body=json.dumps({"instances": good.to_pylist()}))
    answer = conn.getresponse()
    assert answer.status == 415 and "Content-Type" in json.loads(answer.read())["error"]["field"]
    conn.close()
    # a dictionary of large_string (or large_binary) values: bounded like a plain string one
    plan = good.schema.get_field_index("plan")
    for value_type in (pa.large_string(), pa.large_binary()):
        n = good.num_rows * 100
        rows = pa.concat_tables([good] * 100)
        big = pa.array([b"v" * 100_000] if value_type == pa.large_binary() else ["v" * 100_000], value_type)
        bomb = rows.set_column(plan, "plan", pa.DictionaryArray.from_arrays(pa.array([0] * n, pa.int32()), big))
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, bomb.schema, options=pa.ipc.IpcWriteOptions(compression="zstd")) as writer:
            writer.write_table(bomb)
        status, body = _urllib_post(url, sink.getvalue().to_pybytes(), ARROW_STREAM)
        assert status == 413 and body["error"]["field"] == "plan", (value_type, body)
    # a JSON body of 300,000 empty objects: refused at the bound, not after building them all
    status, body = _urllib_post(url, b'{"instances": [' + b",".join([b"{}"] * 300_000) + b"]}", "application/json")
    assert status == 413 and body["error"]["field"] == "instances", body
    assert httpx.get(f"{endpoint}/healthz").status_code == 200


_json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
_rows = st.dictionaries(
    st.sampled_from(["tenure_months", "monthly_charges", "plan", "region", "support_calls", "x"]) | st.text(max_size=5),
    _json_scalars | st.lists(_json_scalars, max_size=3),
    max_size=8,
)
_bodies = st.one_of(
    st.binary(max_size=300),
    st.builds(lambda rows: json.dumps({"instances": rows}).encode(), st.lists(_rows, max_size=4)),
    st.builds(lambda v: json.dumps(v).encode(), st.recursive(_json_scalars, lambda c: st.lists(c, max_size=3))),
    st.builds(lambda n: b"[" * n + b"]" * n, st.integers(1, 5000)),
)
_types = st.sampled_from(["application/json", ARROW_STREAM, "text/plain", "", "application/json; charset=latin-1"])


def test_fuzzed_live_endpoint_never_answers_5xx_and_stays_healthy(
    serve_clean: int, models: tuple[Path, Path], data: pa.Table
) -> None:
    endpoint = _deploy("fuzz", serve_clean, {"model_uri": str(models[0]), "max_body_bytes": 100_000})
    before = httpx.get(f"{endpoint}/healthz").json()["replica"]["pid"]
    statuses: Counter[int] = Counter()
    arrow_ok = _arrow(_raw(data).slice(0, 20))

    json_ok = json.dumps({"instances": _raw(data).slice(0, 3).to_pylist()}).encode()
    offline = load_model_dir(models[0])
    valid = st.sampled_from([(json_ok, "application/json"), (arrow_ok, ARROW_STREAM)])

    def expected(body: bytes, ctype: str) -> list[Any]:
        from runtime.serving import decode_request

        table = decode_request(
            ctype, body, preprocessor=offline.preprocessor, max_body_bytes=100_000, max_instances=10_000
        )
        return list(offline.predict_table(table).values)

    with httpx.Client(timeout=30) as client:

        @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(
            case=st.tuples(_bodies | st.builds(lambda cut: arrow_ok[:cut], st.integers(0, len(arrow_ok))), _types)
            | valid
        )
        def fuzz(case: tuple[bytes, str]) -> None:
            body, ctype = case
            headers = {"content-type": ctype} if ctype else {}
            r = client.post(f"{endpoint}/predict", content=body, headers=headers)
            statuses[r.status_code] += 1
            assert r.status_code == 200 or 400 <= r.status_code < 500, (r.status_code, r.text[:300])
            if r.status_code != 200:
                assert "error" in r.json()
                return
            # a 200 must be the right answer for what was sent
            if r.headers["content-type"].startswith(ARROW_STREAM):
                got = pa.ipc.open_stream(r.content).read_all()["prediction"].to_pylist()
            else:
                got = r.json()["predictions"]
            assert got == expected(body, ctype)

        fuzz()
        big = client.post(f"{endpoint}/predict", content=b"x" * 200_000, headers={"content-type": "application/json"})
        assert big.status_code == 413
    assert statuses[200] > 0 and sum(statuses.values()) >= 150
    health = httpx.get(f"{endpoint}/healthz")
    assert health.status_code == 200 and health.json()["replica"]["pid"] == before  # never died


def test_metrics_are_scrapeable_through_rays_export(
    serve_clean: int, models: tuple[Path, Path], data: pa.Table, ray_session: Any
) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    endpoint = _deploy("metrics", serve_clean, {"model_uri": str(models[0])})
    body = json.dumps({"instances": _raw(data).slice(0, 5).to_pylist()})
    for _ in range(5):
        assert httpx.post(f"{endpoint}/predict", content=body, headers={"content-type": "application/json"}).is_success
    httpx.post(f"{endpoint}/predict", content=b"{", headers={"content-type": "application/json"})
    assert httpx.get(f"{endpoint}/healthz").is_success
    assert httpx.get(f"{endpoint}/nope").status_code == 404
    node = next(n for n in ray_session.nodes() if n["Alive"])
    url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"

    def scraped() -> dict[str, Any] | None:
        families = {f.name: f for f in text_string_to_metric_families(httpx.get(url, timeout=10).text)}
        fam = families.get("ray_skewless_serve_requests")
        if fam is None:
            return None
        seen = {(s.labels.get("route"), s.labels.get("status")) for s in fam.samples}
        # every route gets request metrics (health too); a path that is no route, one bounded label
        wanted = {("/predict", "200"), ("/predict", "400"), ("/healthz", "200"), ("<unknown>", "404")}
        return families if wanted <= seen else None

    families = wait_for_condition(scraped, timeout=90, interval=2, message="skewless metrics in Ray's export")
    names = set(families)
    assert {"ray_skewless_serve_request_latency_seconds", "ray_skewless_serve_batch_rows"} <= names, sorted(
        n for n in names if "skewless" in n
    )


def _replicas(app: str) -> int:
    from ray import serve

    status = serve.status().applications[app].deployments["Predictor"]
    return int(status.replica_states.get("RUNNING", 0))


def test_autoscaling_goes_up_under_load_and_back_down(
    serve_clean: int, models: tuple[Path, Path], data: pa.Table
) -> None:
    endpoint = _deploy(
        "autoscale",
        serve_clean,
        {"model_uri": str(models[0]), "max_body_bytes": 64 << 20, "max_instances": 1_000_000},
        max_ongoing_requests=2,
        ray_actor_options={"num_cpus": 0.25},
        autoscaling_config={
            "min_replicas": 1,
            "initial_replicas": 1,
            "max_replicas": 3,
            "target_ongoing_requests": 1,
            "upscale_delay_s": 1,
            "downscale_delay_s": 3,
            "metrics_interval_s": 0.5,
            "look_back_period_s": 2,
        },
    )
    big = _arrow(pa.concat_tables([_raw(data)] * 10))
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(timeout=60) as client:
            while not stop.is_set():
                client.post(f"{endpoint}/predict", content=big, headers=ARROW_HEADERS)

    threads = [threading.Thread(target=load, daemon=True) for _ in range(6)]
    for t in threads:
        t.start()
    try:
        wait_for_condition(lambda: _replicas("autoscale") >= 2, timeout=90, message="scale-up under load")
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    wait_for_condition(lambda: _replicas("autoscale") == 1, timeout=120, message="scale-down after load")


def test_model_update_under_steady_load_drops_nothing(
    serve_clean: int, models: tuple[Path, Path], data: pa.Table
) -> None:
    endpoint = _deploy("update", serve_clean, {"model_uri": str(models[0])}, num_replicas=2)
    body = json.dumps({"instances": _raw(data).slice(0, 3).to_pylist()})
    seen: Counter[tuple[int, str]] = Counter()
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(timeout=30) as client:
            while not stop.is_set():
                try:
                    r = client.post(f"{endpoint}/predict", content=body, headers={"content-type": "application/json"})
                    uri = r.json().get("model", {}).get("uri", "") if r.status_code == 200 else r.text[:100]
                    seen[(r.status_code, uri)] += 1
                except httpx.HTTPError as exc:
                    seen[(0, type(exc).__name__)] += 1

    threads = [threading.Thread(target=load, daemon=True) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        wait_for_condition(lambda: sum(seen.values()) > 20, timeout=30)
        _deploy("update", serve_clean, {"model_uri": str(models[1])}, num_replicas=2)  # the new champion
        wait_for_condition(lambda: seen[(200, str(models[1]))] > 20, timeout=120, message="new model serving")
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    failed = {k: v for k, v in seen.items() if k[0] != 200}
    assert not failed, failed
    assert seen[(200, str(models[0]))] > 0 and seen[(200, str(models[1]))] > 0


def test_a_replica_killed_under_load_loses_no_request(
    serve_clean: int, models: tuple[Path, Path], data: pa.Table
) -> None:
    """2 replicas, 16 connections of steady load, one replica SIGKILLed: HAProxy retries what the
    dead replica never answered (a prediction is idempotent) and stops sending it traffic. A
    replica sends each answer's head and body in one write (``coalesce_response_writes``):
    killed between two writes, it had sent a head HAProxy could not take back (1 request in
    ~1,500 failed in 2 of 10 runs without it, 0 in 22 with it)."""
    import signal

    endpoint = _deploy("kill", serve_clean, {"model_uri": str(models[0])}, num_replicas=2)
    body = json.dumps({"instances": _raw(data).slice(0, 2).to_pylist()})
    seen: Counter[int | str] = Counter()
    pids: set[int] = set()
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(timeout=30) as client:
            while not stop.is_set():
                try:
                    r = client.post(f"{endpoint}/predict", content=body, headers={"content-type": "application/json"})
                    seen[r.status_code if r.status_code == 200 else f"{r.status_code} {r.text[:200]}"] += 1
                except httpx.HTTPError as exc:
                    seen[f"{type(exc).__name__}: {exc}"] += 1

    wait_for_condition(
        lambda: pids.add(int(httpx.get(f"{endpoint}/healthz", timeout=5).json()["replica"]["pid"])) or len(pids) == 2,
        timeout=60,
        interval=0.05,
        message="both replicas answered",
    )
    threads = [threading.Thread(target=load, daemon=True) for _ in range(16)]
    for t in threads:
        t.start()
    try:
        wait_for_condition(lambda: sum(seen.values()) > 200, timeout=60)
        os.kill(min(pids), signal.SIGKILL)
        before = sum(seen.values())
        wait_for_condition(lambda: sum(seen.values()) > before + 1000, timeout=120, message="load after the kill")
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    assert set(seen) == {200}, seen


def test_the_shipped_ingress_is_haproxy_with_every_listener_on_loopback(
    serve_clean: int, models: tuple[Path, Path], data: pa.Table
) -> None:
    """The session's Serve starts as the demo and `skewless serve deploy` start it: Ray's
    HAProxy mode in front of the replicas' own HTTP servers. Ray 2.60 binds HAProxy's stats page
    and Prometheus exporter on all interfaces; skewless's launcher moves them to 127.0.0.1."""
    from tests.conftest import listeners

    endpoint = _deploy("ingress", serve_clean, {"model_uri": str(models[0])}, num_replicas=2)
    body = json.dumps({"instances": _raw(data).slice(0, 3).to_pylist()})
    for _ in range(4):  # both replicas, through the front
        answer = httpx.post(f"{endpoint}/predict", content=body, headers={"content-type": "application/json"})
        assert answer.status_code == 200 and len(answer.json()["predictions"]) == 3
    found = listeners()
    front = [(name, host) for _, name, host, port in found if port == serve_clean]
    assert front == [("haproxy", "127.0.0.1")], front
    haproxy_pids = {pid for pid, name, *_ in found if name == "haproxy"}
    served = [(host, port) for pid, _, host, port in found if pid in haproxy_pids]
    assert len(served) >= 3, served  # the front, the stats page, the exporter
    assert all(host == "127.0.0.1" for host, _ in served), served
    replicas = [
        (host, port) for _, name, host, port in found if name.startswith("ray::ServeRepli") and 30000 <= port <= 31000
    ]
    assert len(replicas) == 2 and all(host == "127.0.0.1" for host, _ in replicas), replicas
    # HAProxy's admin socket (mode 666, level admin) is in a private directory, not /tmp/haproxy-serve
    from runtime.serving import ingress_state_dir

    state = ingress_state_dir(serve_clean)
    assert oct(state.stat().st_mode & 0o777) == "0o700"
    assert list(state.rglob("admin.sock")), sorted(p.name for p in state.rglob("*"))


def test_grpc_predict_answers_as_http_does_through_haproxy_on_loopback(
    serve_clean: int, grpc_port: int, models: tuple[Path, Path], data: pa.Table
) -> None:
    """``skewless.v1.Predictor/Predict`` through Serve's gRPC ingress (HAProxy's gRPC front on
    127.0.0.1, then the replica's own gRPC server): the HTTP route's answer, key and bounds, with
    gRPC statuses and the same JSON error bodies."""
    import grpc

    from runtime.serving import PredictRequest, predict_stub
    from tests.conftest import listeners

    key = "k-" + os.urandom(16).hex()
    endpoint = _deploy(
        "grpcapp",
        serve_clean,
        {"model_uri": str(models[0]), "api_key": key, "max_body_bytes": 1 << 20},
    )
    rows = _raw(data).slice(0, 3)
    body = json.dumps({"instances": rows.to_pylist()}).encode()
    over_http = httpx.post(
        f"{endpoint}/predict",
        content=body,
        headers={"content-type": "application/json", "authorization": f"Bearer {key}"},
    ).json()
    app = (("application", "grpcapp"),)
    auth = (*app, ("authorization", f"Bearer {key}"))
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        stub = predict_stub(channel)
        wait_for_condition(lambda: _grpc_ready(stub, app), timeout=60)
        reply = stub(PredictRequest(body=body, request_id="req-grpc-1"), metadata=auth, timeout=30)
        answer = json.loads(reply.body)
        assert answer["predictions"] == over_http["predictions"]
        assert answer["probabilities"] == over_http["probabilities"]
        assert reply.content_type == "application/json" and reply.request_id == "req-grpc-1"
        assert reply.model_version == str(over_http["model"]["version"])
        # bulk: an Arrow IPC stream in, Arrow out
        reply = stub(PredictRequest(body=_arrow(_raw(data).slice(0, 500)), content_type=ARROW_STREAM), metadata=auth)
        assert reply.content_type == ARROW_STREAM
        assert pa.ipc.open_stream(reply.body).read_all().num_rows == 500

        def status_of(request: Any, metadata: Any) -> tuple[grpc.StatusCode, dict[str, Any]]:
            with pytest.raises(grpc.RpcError) as raised:
                stub(request, metadata=metadata, timeout=60)
            return raised.value.code(), json.loads(raised.value.details() or "{}")

        code, details = status_of(PredictRequest(body=body), app)  # no key
        assert code == grpc.StatusCode.UNAUTHENTICATED and details["error"]["field"] == "Authorization"
        assert key not in json.dumps(details)
        bad = json.dumps({"instances": [{**rows.to_pylist()[0], "tenure_months": "many"}]}).encode()
        code, details = status_of(PredictRequest(body=bad), auth)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and details["error"]["field"] == "tenure_months", details
        code, details = status_of(PredictRequest(body=body, content_type="text/plain"), auth)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, details
        # over the app's max_body_bytes (1 MiB): our bound, named
        code, details = status_of(PredictRequest(body=b" " * (2 << 20)), auth)
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and details["error"]["field"] == "body", details
        # over gRPC's own message bound (64 MiB): refused before the replica decodes anything
        with pytest.raises(grpc.RpcError) as raised:
            stub(PredictRequest(body=b" " * (65 << 20)), metadata=auth, timeout=120)
        assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, raised.value.details()
        assert "larger than max" in (raised.value.details() or ""), raised.value.details()  # gRPC's, not ours
    assert httpx.get(f"{endpoint}/healthz").status_code == 200
    found = listeners()
    front = [(name, host) for _, name, host, port in found if port == grpc_port]
    assert front == [("haproxy", "127.0.0.1")], front
    # each replica's own gRPC server (Ray binds it on [::]): moved to the front's host. Its port is
    # the one HAProxy's gRPC backend for the app names (`server <replica> <host>:<port> proto h2`)
    import re

    from runtime.serving import ingress_state_dir

    configs = "".join(p.read_text() for p in ingress_state_dir(serve_clean).rglob("haproxy.cfg"))
    backends = {
        int(port)
        for name, port in re.findall(r"^\s*server (\S+) \S+:(\d+) proto h2", configs, re.M)
        if "fallback" not in name
    }
    replica_grpc = [host for _, name, host, port in found if port in backends and name.startswith("ray::ServeRepli")]
    assert replica_grpc and set(replica_grpc) == {"127.0.0.1"}, (replica_grpc, backends)  # ::ffff:127.0.0.1 too


def _grpc_ready(stub: Any, metadata: Any) -> bool:
    """Whether HAProxy's gRPC backend for the app is up (a bad body answers, not UNAVAILABLE)."""
    import grpc

    from runtime.serving import PredictRequest

    try:
        stub(PredictRequest(body=b"{}"), metadata=metadata, timeout=5)
    except grpc.RpcError as exc:
        return exc.code() not in (
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.NOT_FOUND,
            grpc.StatusCode.DEADLINE_EXCEEDED,
        )
    return True
