"""One write per small HTTP response on a replica's own HTTP server.

In Serve's HAProxy mode each replica answers HTTP itself, on uvicorn (its ``httptools``
protocol, which Serve's ``uvicorn.Config`` gets by default). uvicorn writes a response's status
line and headers to the socket when the app sends ``http.response.start`` and the body when it
sends ``http.response.body``: two ``send`` calls, two TCP segments on loopback, two wake-ups of
HAProxy for a 300-byte prediction. That costs on every request (a profile of a replica at one
request in flight put ~9% of its samples in those two writes) and it leaves a window in which a
replica killed between the two writes has sent HAProxy a header and no body: HAProxy has begun
the answer, cannot replay the request on another replica (it does for a replica that sent
nothing: ``retry-on empty-response``), and the client sees a truncated response.

:func:`coalesce_response_writes` makes uvicorn hold the status line and headers until the first
body write and send both in one ``write``: a replica that dies before that write has sent
nothing, and HAProxy retries the request elsewhere. Streaming responses still stream (the
headers go out with their first chunk); a body over :data:`COALESCE_MAX_BYTES` (a bulk Arrow
answer) follows its head in a write of its own, as before. One consequence: an app that fails
after starting its response (before any body) now sends nothing rather than a bare head, so
HAProxy replays the request on another replica (``retry-on empty-response``); the predictor and
the rollout router answer with Starlette responses, which send the head and body back to back.
Applied in each predictor and router replica before Serve starts its HTTP server; a uvicorn
without the ``httptools`` protocol is left as it is (uvicorn is pinned in ``constraints.txt``
and ``tests/unit/test_serving_wire.py`` runs this against it).
"""

from __future__ import annotations

from typing import Any

__all__ = ["coalesce_response_writes"]


# A body up to this size is copied behind its head into one write; a larger one follows the head
# in its own write (as uvicorn writes it), since copying megabytes costs more than a segment and
# the kernel may send a write that large in parts anyway.
COALESCE_MAX_BYTES = 64 << 10


class _HeldWrites:
    """Stands in for the transport while uvicorn writes a response's head: keeps the bytes;
    anything else uvicorn asks of the transport goes to the real one."""

    __slots__ = ("data", "transport")

    def __init__(self, transport: Any) -> None:
        self.transport, self.data = transport, b""

    def write(self, data: bytes) -> None:
        self.data += data

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


class _HeadFirst:
    """Stands in for the transport for the next body write: sends the held head with it."""

    __slots__ = ("head", "transport")

    def __init__(self, transport: Any, head: bytes) -> None:
        self.transport, self.head = transport, head

    def write(self, data: bytes) -> None:
        head, self.head = self.head, b""
        if not head:
            self.transport.write(data)
        elif len(data) <= COALESCE_MAX_BYTES:
            self.transport.write(head + data)
        else:
            self.transport.write(head)
            self.transport.write(data)

    def close(self) -> None:
        if self.head:
            self.write(b"")
        self.transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


def coalesce_response_writes() -> bool:
    """Patch uvicorn's httptools protocol in this process so a response's head and its first
    body write leave in one ``write`` (see the module's text). Idempotent; True where patched."""
    try:
        from uvicorn.protocols.http.httptools_impl import RequestResponseCycle
    except ImportError:  # no httptools: uvicorn's h11 protocol writes as it always has
        return False
    original = RequestResponseCycle.send
    if getattr(original, "skewless_coalesced", False):
        return True

    async def send(self: Any, message: Any) -> None:
        if message["type"] == "http.response.start" and not self.response_started:
            transport = self.transport
            self.transport = held = _HeldWrites(transport)
            try:
                await original(self, message)
            finally:
                self.transport = transport
            if held.data:
                self.skewless_head = held.data
            return
        head = self.__dict__.pop("skewless_head", None)
        if head is None:
            await original(self, message)
            return
        transport = self.transport
        self.transport = proxy = _HeadFirst(transport, head)
        try:
            await original(self, message)
        finally:
            self.transport = transport
        if proxy.head and not self.disconnected:  # no body write (a HEAD request): the head alone
            transport.write(proxy.head)

    send.skewless_coalesced = True  # type: ignore[attr-defined]
    send.__wrapped_send__ = original  # type: ignore[attr-defined]
    RequestResponseCycle.send = send  # type: ignore[method-assign]
    return True
