"""A JSON request alone on a replica calls the model itself; requests that arrive together
share Serve's batch queue (runtime.serving._predictor). The model calls are stand-ins here: the
live batching (48 concurrent requests, each its own rows back) is tests/integration/test_serving.py's."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pyarrow as pa
import pytest

from runtime.serving import _predictor


class Calls:
    def __init__(self) -> None:
        self.alone: list[int] = []
        self.queued: list[int] = []


@pytest.fixture
def predictor(monkeypatch: pytest.MonkeyPatch) -> tuple[Any, Calls]:
    calls = Calls()
    p = object.__new__(_predictor.Predictor.func_or_class)
    p.args = SimpleNamespace(inject_error_rate=0.0, batch_wait_timeout_s=0.0)
    p.identity = {"name": "m", "version": "1", "uri": "models:/m/1"}
    p.live = None
    p._json_in_flight = 0
    p._decode = lambda content_type, body: pa.table({"x": [int(body)]})

    def predict_now(table: pa.Table) -> Any:
        calls.alone.append(table["x"][0].as_py())
        return "preds"

    async def batched(table: pa.Table) -> tuple[str, int]:
        calls.queued.append(table["x"][0].as_py())
        await asyncio.sleep(0)  # a batch queue answers on a later turn of the loop
        return "preds", 2

    p._predict_or_error, p._batched_predict = predict_now, batched
    monkeypatch.setattr(_predictor, "encode_response", lambda preds, identity, arrow, request_id: (b"{}", "json"))
    return p, calls


def test_a_lone_request_calls_the_model_without_the_batch_queue(predictor: tuple[Any, Calls]) -> None:
    p, calls = predictor

    async def one_after_another() -> list[str]:
        return [
            (await p._predict_body("application/json", str(i).encode(), f"r{i}"))[2]["x-skewless-batch-requests"]
            for i in range(3)
        ]

    assert asyncio.run(one_after_another()) == ["1", "1", "1"]
    assert calls.alone == [0, 1, 2] and calls.queued == []
    assert p._json_in_flight == 0


def test_a_batch_wait_keeps_a_lone_request_in_the_queue(predictor: tuple[Any, Calls]) -> None:
    """batch_wait_timeout_s > 0 asks a request to wait for company: it is not skipped."""
    p, calls = predictor
    p.args.batch_wait_timeout_s = 0.01
    asyncio.run(p._predict_body("application/json", b"5", "r5"))
    assert calls.queued == [5] and calls.alone == []


def test_requests_that_arrive_together_share_the_batch_queue(predictor: tuple[Any, Calls]) -> None:
    p, calls = predictor

    async def together() -> list[Any]:
        return await asyncio.gather(*(p._predict_body("application/json", str(i).encode(), f"r{i}") for i in range(8)))

    answers = asyncio.run(together())
    assert sorted(calls.queued) == list(range(8)) and calls.alone == []
    assert {a[2]["x-skewless-batch-requests"] for a in answers} == {"2"}
    assert p._json_in_flight == 0


def test_a_large_lone_request_goes_through_the_queue(predictor: tuple[Any, Calls]) -> None:
    """Over INLINE_ROWS the model runs in a thread: through the queue, JSON model calls stay one at a time."""
    p, calls = predictor
    p._decode = lambda content_type, body: pa.table({"x": [int(body)] * (_predictor.INLINE_ROWS + 1)})
    asyncio.run(p._predict_body("application/json", b"7", "r7"))
    assert calls.queued == [7] and calls.alone == []


def test_a_lone_requests_bad_row_is_its_4xx(predictor: tuple[Any, Calls]) -> None:
    """The model's schema refusal comes back as an HttpError value (as from the queue) and is raised."""
    p, _ = predictor
    p._predict_or_error = lambda table: _predictor.HttpError(422, "x", None, "must not be null")
    with pytest.raises(_predictor.HttpError) as caught:
        asyncio.run(p._predict_body("application/json", b"1", "r1"))
    assert caught.value.status == 422 and p._json_in_flight == 0


def test_the_count_comes_back_down_when_the_model_fails(predictor: tuple[Any, Calls]) -> None:
    p, _ = predictor

    def fail(table: pa.Table) -> Any:
        raise RuntimeError("model failed")

    p._predict_or_error = fail
    with pytest.raises(RuntimeError):
        asyncio.run(p._predict_body("application/json", b"1", "r1"))
    assert p._json_in_flight == 0
