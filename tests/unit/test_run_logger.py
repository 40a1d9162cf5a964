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
    def _fail(self) -> None:
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


def test_a_5xx_tracking_server_is_retried_warned_about_once_and_never_raises(
    down: str, caplog: pytest.LogCaptureFixture
) -> None:
    logger = RunLogger(down, "r" * 32, attempts=2, backoff_s=0.01)
    with caplog.at_level(logging.WARNING, logger="runtime.registry._run_logger"):
        for step in range(3):
            assert logger.log_metrics({"valid_loss": 1.0 / (step + 1)}, step=step) is False
        assert logger.set_tags({"k": "v"}) is False
    assert logger.failures == 4 and logger.pending == 3  # every value held for the next call
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2  # once for metrics, once for tags: not once per call
    assert all("training goes on" in w and "hunter2" not in w for w in warnings)
    assert "hunter2" not in repr(logger)


def test_held_values_go_out_with_the_next_call_that_gets_through(tmp_path: Any) -> None:
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("x")).info.run_id
    logger = RunLogger(uri, run_id, attempts=1, backoff_s=0.0, max_pending=3)
    logger._client = _Broken()  # the store fails for the first calls only
    for step in range(5):
        assert not logger.log_metrics({"m": float(step)}, step=step)
    assert logger.pending == 3  # bounded: the oldest went
    logger._client = None
    assert logger.log_metrics({"m": 5.0}, step=5)
    # at most max_pending values in all: the oldest held ones made room for the newest
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "m")] == [(3, 3.0), (4, 4.0), (5, 5.0)]


class _Broken:
    def log_batch(self, *args: Any, **kwargs: Any) -> None:
        raise ConnectionError("store down")


def test_it_pickles_without_its_client() -> None:
    logger = RunLogger("sqlite:////tmp/x.db", "r" * 32)
    logger._client = object()
    copy = pickle.loads(pickle.dumps(logger))
    assert copy._client is None and copy.run_id == "r" * 32 and copy.pending == 0
