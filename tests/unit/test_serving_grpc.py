"""The gRPC service's declaration: the shipped .proto and the messages skewless builds agree, the
servicer function registers what Serve routes, and HTTP statuses map to gRPC's."""

from __future__ import annotations

import re
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

import runtime.serving
from runtime.serving import (
    GRPC_STATUS,
    PREDICT_METHOD,
    PredictReply,
    PredictRequest,
    add_predictor_servicer,
    grpc_status,
    predict_stub,
)

PROTO = Path(runtime.serving.__file__).parent / "predictor.proto"
_TYPES = {"bytes": 12, "string": 9}  # FieldDescriptor.TYPE_BYTES, TYPE_STRING


def test_the_shipped_proto_declares_the_messages_skewless_builds() -> None:
    text = PROTO.read_text()
    assert re.search(r"^package skewless\.v1;", text, re.M)
    assert re.search(r"rpc Predict\(PredictRequest\) returns \(PredictReply\);", text)
    for message in (PredictRequest, PredictReply):
        body = re.search(rf"message {message.DESCRIPTOR.name} \{{(.*?)\}}", text, re.S)
        assert body is not None, message.DESCRIPTOR.name
        declared = {m[1]: (int(m[2]), _TYPES[m[0]]) for m in re.findall(r"(\w+) (\w+) = (\d+);", body.group(1))}
        built = {f.name: (f.number, f.type) for f in message.DESCRIPTOR.fields}
        assert declared == built, message.DESCRIPTOR.name
    assert PREDICT_METHOD == "/skewless.v1.Predictor/Predict"


def test_http_statuses_map_to_the_grpc_codes_clients_expect() -> None:
    assert grpc_status(401) == grpc.StatusCode.UNAUTHENTICATED
    assert grpc_status(413) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert grpc_status(422) == grpc.StatusCode.INVALID_ARGUMENT
    assert grpc_status(503) == grpc.StatusCode.UNAVAILABLE
    assert grpc_status(500) == grpc.StatusCode.INTERNAL and grpc_status(502) == grpc.StatusCode.INTERNAL
    assert grpc_status(418) == grpc.StatusCode.UNKNOWN
    assert all(code != grpc.StatusCode.OK for code in GRPC_STATUS.values())


class _Echo:
    """A stand-in for the servicer Serve swaps in: what matters here is the registration and the
    messages on the wire (the predictor's own answers are tested live, tests/integration)."""

    def Predict(self, request: Any, context: Any) -> Any:
        return PredictReply(body=request.body[::-1], content_type=request.content_type, request_id="r1")


def test_the_servicer_function_registers_predict_on_a_real_grpc_server() -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    add_predictor_servicer(_Echo(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = predict_stub(channel)
            reply = stub(PredictRequest(body=b"abc", content_type="application/json"), timeout=10)
            assert (reply.body, reply.content_type, reply.request_id) == (b"cba", "application/json", "r1")
    finally:
        server.stop(grace=None)


def test_replica_grpc_servers_bind_the_front_host_not_every_interface(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray 2.60 binds a replica's gRPC server on [::]; with the front's host in the environment
    (what ingress_options sets for Serve's processes) it binds that host instead."""
    from ray.serve._private import default_impl

    from runtime.serving import bind_grpc_to_front_host
    from runtime.serving._grpc import FRONT_HOST_ENV

    bound: list[str] = []
    monkeypatch.setattr(default_impl, "add_grpc_address", lambda server, address: bound.append(address))
    monkeypatch.delenv(FRONT_HOST_ENV, raising=False)
    bind_grpc_to_front_host()  # no front host named: Ray's bind stays
    default_impl.add_grpc_address(None, "[::]:40001")
    monkeypatch.setenv(FRONT_HOST_ENV, "127.0.0.1")
    bind_grpc_to_front_host()
    bind_grpc_to_front_host()  # idempotent: one wrapper
    default_impl.add_grpc_address(None, "[::]:40002")
    default_impl.add_grpc_address(None, "10.0.0.5:40003")  # an explicit host is left alone
    assert bound == ["[::]:40001", "127.0.0.1:40002", "10.0.0.5:40003"]
