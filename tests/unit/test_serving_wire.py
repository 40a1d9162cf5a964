"""A response's head and body leave a replica in one write (runtime.serving._wire), against
uvicorn's own httptools protocol: what the replica's HTTP server runs."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from runtime.serving import coalesce_response_writes

httptools_impl = pytest.importorskip("uvicorn.protocols.http.httptools_impl")


class Recorder:
    """The transport: every write, in order."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def _cycle(transport: Recorder, method: str = "POST", keep_alive: bool = True) -> Any:
    from uvicorn.protocols.http.flow_control import FlowControl

    scope = {"type": "http", "method": method, "http_version": "1.1", "path": "/predict", "headers": []}
    return httptools_impl.RequestResponseCycle(
        scope=scope,
        transport=transport,
        flow=FlowControl(transport),
        logger=logging.getLogger("test"),
        access_logger=logging.getLogger("test.access"),
        access_log=False,
        default_headers=[],
        message_event=asyncio.Event(),
        expect_100_continue=False,
        keep_alive=keep_alive,
        on_response=lambda: None,
    )


def _respond(cycle: Any, *bodies: bytes, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    async def go() -> None:
        await cycle.send({"type": "http.response.start", "status": 200, "headers": headers or []})
        for i, body in enumerate(bodies):
            await cycle.send({"type": "http.response.body", "body": body, "more_body": i < len(bodies) - 1})

    asyncio.run(go())


@pytest.fixture
def coalesced(monkeypatch: pytest.MonkeyPatch) -> None:
    # put uvicorn's own send back after the test, patched or not before it
    monkeypatch.setattr(httptools_impl.RequestResponseCycle, "send", httptools_impl.RequestResponseCycle.send)
    assert coalesce_response_writes() is True
    assert coalesce_response_writes() is True  # idempotent: wrapped once


BODY = b'{"predictions":[0.25]}'
LENGTH = [(b"content-length", str(len(BODY)).encode()), (b"content-type", b"application/json")]


def test_uvicorn_alone_writes_the_head_and_the_body_apart(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the patch is for: a replica killed between these two writes has sent a head and no
    body, which HAProxy cannot replay on another replica."""
    original = getattr(httptools_impl.RequestResponseCycle.send, "__wrapped_send__", None)
    if original is not None:  # patched earlier in this process: test uvicorn's own send
        monkeypatch.setattr(httptools_impl.RequestResponseCycle, "send", original)
    rec = Recorder()
    _respond(_cycle(rec), BODY, headers=LENGTH)
    assert len(rec.writes) == 2 and rec.writes[0].startswith(b"HTTP/1.1 200") and rec.writes[1] == BODY


def test_a_response_leaves_in_one_write(coalesced: None) -> None:
    rec = Recorder()
    cycle = _cycle(rec)
    _respond(cycle, BODY, headers=LENGTH)
    assert len(rec.writes) == 1, rec.writes
    head, _, body = rec.writes[0].partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK") and b"content-length: 22" in head and body == BODY
    assert cycle.response_complete and not rec.closed


def test_a_streamed_response_sends_its_head_with_the_first_chunk(coalesced: None) -> None:
    rec = Recorder()
    _respond(_cycle(rec), b"first", b"second", b"")
    assert len(rec.writes) == 3, rec.writes
    assert rec.writes[0].startswith(b"HTTP/1.1 200") and rec.writes[0].endswith(b"5\r\nfirst\r\n")
    assert rec.writes[1] == b"6\r\nsecond\r\n" and rec.writes[2] == b"0\r\n\r\n"


def test_a_connection_close_response_is_written_before_the_close(coalesced: None) -> None:
    rec = Recorder()
    _respond(_cycle(rec, keep_alive=False), BODY, headers=LENGTH)
    assert len(rec.writes) == 1 and rec.writes[0].endswith(BODY) and b"connection: close" in rec.writes[0]
    assert rec.closed


def test_head_and_an_empty_body_still_go_out(coalesced: None) -> None:
    rec = Recorder()
    _respond(_cycle(rec, method="HEAD"), b"", headers=LENGTH)
    assert len(rec.writes) == 1 and rec.writes[0].startswith(b"HTTP/1.1 200") and rec.writes[0].endswith(b"\r\n\r\n")


def test_uvicorns_own_500_is_one_write_too(coalesced: None) -> None:
    rec = Recorder()
    asyncio.run(_cycle(rec).send_500_response())
    assert len(rec.writes) == 1 and rec.writes[0].startswith(b"HTTP/1.1 500") and rec.writes[0].endswith(b"Error")


def test_a_client_gone_before_the_body_gets_nothing(coalesced: None) -> None:
    rec = Recorder()
    cycle = _cycle(rec)

    async def go() -> None:
        await cycle.send({"type": "http.response.start", "status": 200, "headers": LENGTH})
        cycle.disconnected = True  # what the protocol sets on connection_lost
        await cycle.send({"type": "http.response.body", "body": BODY})

    asyncio.run(go())
    assert rec.writes == []


def test_head_with_connection_close_writes_the_head_before_closing(coalesced: None) -> None:
    rec = Recorder()
    _respond(_cycle(rec, method="HEAD", keep_alive=False), b"", headers=LENGTH)
    assert len(rec.writes) == 1 and rec.writes[0].startswith(b"HTTP/1.1 200") and rec.closed


def test_a_204_goes_out_whole(coalesced: None) -> None:
    rec = Recorder()

    async def go() -> None:
        cycle = _cycle(rec)
        await cycle.send({"type": "http.response.start", "status": 204, "headers": []})
        await cycle.send({"type": "http.response.body", "body": b""})

    asyncio.run(go())
    assert len(rec.writes) == 1 and rec.writes[0].startswith(b"HTTP/1.1 204") and rec.writes[0].endswith(b"\r\n\r\n")


def test_a_large_body_follows_its_head_without_a_copy(coalesced: None) -> None:
    from runtime.serving._wire import COALESCE_MAX_BYTES

    big = b"x" * (COALESCE_MAX_BYTES + 1)
    rec = Recorder()
    _respond(_cycle(rec), big, headers=[(b"content-length", str(len(big)).encode())])
    assert len(rec.writes) == 2 and rec.writes[0].startswith(b"HTTP/1.1 200") and rec.writes[1] == big


def test_a_failing_send_puts_the_transport_back(coalesced: None) -> None:
    """uvicorn refuses a body longer than its Content-Length: the cycle keeps its real transport."""
    rec = Recorder()
    cycle = _cycle(rec)

    async def go() -> None:
        await cycle.send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await cycle.send({"type": "http.response.body", "body": b"too long"})

    with pytest.raises(RuntimeError, match="longer than Content-Length"):
        asyncio.run(go())
    assert cycle.transport is rec and rec.writes == []


def test_the_stand_ins_answer_for_the_transport(coalesced: None) -> None:
    """What else uvicorn may ask of the transport mid-send (is_closing, ...) reaches the real one."""
    from runtime.serving._wire import _HeadFirst, _HeldWrites

    rec = Recorder()
    rec.closed = True
    assert _HeldWrites(rec).is_closing() is True and _HeadFirst(rec, b"h").is_closing() is True
