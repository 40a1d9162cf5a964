"""The gRPC service's declaration: the shipped .proto and the messages skewless builds agree, the
servicer function registers what Serve routes, and HTTP statuses map to gRPC's."""

from __future__ import annotations

import re
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc

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
    """A servicer as Serve's own would route it: Predict takes the request message."""

    def Predict(self, request: Any, context: Any) -> Any:
        metadata = dict(context.invocation_metadata())
        if metadata.get("authorization") != "Bearer k":
            context.abort(grpc.StatusCode.UNAUTHENTICATED, '{"error": {"field": "Authorization"}}')
        return PredictReply(body=request.body[::-1], content_type=request.content_type, request_id="r1")


def test_the_servicer_function_serves_predict_on_a_real_grpc_server() -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    add_predictor_servicer(_Echo(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = predict_stub(channel)
            reply = stub(
                PredictRequest(body=b"abc", content_type="application/json"),
                metadata=(("authorization", "Bearer k"),),
                timeout=10,
            )
            assert (reply.body, reply.content_type, reply.request_id) == (b"cba", "application/json", "r1")
            try:
                stub(PredictRequest(body=b"x"), timeout=10)
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.UNAUTHENTICATED and "Authorization" in (err.details() or "")
            else:
                raise AssertionError("no key: the call should fail")
    finally:
        server.stop(grace=None)
