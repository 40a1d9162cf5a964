"""The run logger: a failing tracking store never raises into training, and nothing is lost
that fits its bound."""

from __future__ import annotations

import http.server
import logging
import pickle
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from runtime.registry import RunLogger


class _Unavailable(http.server.BaseHTTPRequestHandler):
    requests = 0

    def _fail(self) -> None:
        type(self).requests += 1
        self.send_response(503)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_POST = _fail

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def down(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Unavailable)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://user:hunter2@127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


def test_a_5xx_tracking_server_costs_one_failed_call_and_never_raises(
    down: str, caplog: pytest.LogCaptureFixture
) -> None:
    _Unavailable.requests = 0
    logger = RunLogger(down, "r" * 32, attempts=2, backoff_s=0.01, cooldown_s=60.0)
    with caplog.at_level(logging.WARNING, logger="runtime.registry._run_logger"):
        for step in range(3):
            assert logger.log_metrics({"valid_loss": 1.0 / (step + 1)}, step=step) is False
        assert logger.set_tags({"k": "v"}) is False
    # the first call tried twice and opened the circuit; the others did not touch the store
    assert _Unavailable.requests == 2 and logger.failures == 1
    assert logger.pending == 3  # every value held for the next call that gets through
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "training goes on, the next attempt in 60 s" in warnings[0]
    assert "hunter2" not in warnings[0] and "hunter2" not in repr(logger)
    # without the breaker every call is tried, and each kind of failure is warned about once
    again = RunLogger(down, "r" * 32, attempts=1, backoff_s=0.0, cooldown_s=0.0)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="runtime.registry._run_logger"):
        for _ in range(3):
            again.log_metrics({"x": 1.0}, hold=False)
        again.set_tags({"k": "v"})
    assert again.failures == 4 and again.pending == 0  # hold=False: dropped, not held
    assert len(caplog.records) == 2  # metrics once, tags once


def test_held_values_go_out_with_the_next_call_that_gets_through(tmp_path: Any) -> None:
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("x")).info.run_id
    logger = RunLogger(uri, run_id, attempts=1, backoff_s=0.0, max_pending=3, cooldown_s=0.0)
    logger._client = _Broken()  # the store fails for the first calls only
    for step in range(5):
        assert not logger.log_metrics({"m": float(step)}, step=step)
    assert logger.pending == 3  # bounded: the oldest went
    logger._client = None
    assert logger.log_metrics({"m": 5.0}, step=5)
    # at most max_pending values held: the oldest made room for newer ones; then the new value
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "m")] == [
        (2, 2.0),
        (3, 3.0),
        (4, 4.0),
        (5, 5.0),
    ]


class _Broken:
    def log_batch(self, *args: Any, **kwargs: Any) -> None:
        raise ConnectionError("store down")


def test_it_pickles_without_its_client() -> None:
    logger = RunLogger("sqlite:////tmp/x.db", "r" * 32)
    logger._client = object()
    copy = pickle.loads(pickle.dumps(logger))
    assert copy._client is None and copy.run_id == "r" * 32 and copy.pending == 0
