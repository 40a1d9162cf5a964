"""The predictor over gRPC, through Ray Serve's own gRPC ingress.

One unary method, ``skewless.v1.Predictor/Predict``, carrying the same bodies as ``POST /predict``
(JSON instances, or an Arrow IPC stream with ``content_type`` ``application/vnd.apache.arrow.stream``)
so both protocols share the decoder, its bounds, the batching and the monitoring. The service is
declared in ``predictor.proto`` beside this module (for clients in other languages); the Python
messages are built from the same declaration at import, so neither skewless nor its users need
``grpcio-tools``.

Enable it in a Serve config (Ray's field)::

    grpc_options:
      port: 9000
      grpc_servicer_functions: [runtime.serving.add_predictor_servicer]

In Serve's HAProxy mode (what skewless starts) HAProxy listens on ``port`` at the HTTP front's
host (127.0.0.1 by default) and forwards HTTP/2 to each replica's own gRPC server, which the
predictor moves from Ray's ``[::]`` to that host too (:func:`bind_grpc_to_front_host`). The API key
travels as ``authorization: Bearer <key>`` metadata. Bad input answers a gRPC status, never an
exception: the HTTP status's counterpart (:data:`GRPC_STATUS`) with the same JSON error body as the
details. Messages over ``RAY_SERVE_GRPC_MAX_MESSAGE_SIZE`` bytes (:func:`runtime.serving.ingress_options`
sets it to 64 MiB) are refused by gRPC itself before anything is decoded (``RESOURCE_EXHAUSTED``).
"""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

__all__ = [
    "GRPC_STATUS",
    "PREDICT_METHOD",
    "SERVICE_NAME",
    "PredictReply",
    "PredictRequest",
    "add_predictor_servicer",
    "bind_grpc_to_front_host",
    "grpc_status",
    "predict_stub",
]

PACKAGE = "skewless.v1"
SERVICE_NAME = f"{PACKAGE}.Predictor"
PREDICT_METHOD = f"/{SERVICE_NAME}/Predict"

# field name -> (number, type), the order and numbers of predictor.proto
_BYTES = descriptor_pb2.FieldDescriptorProto.TYPE_BYTES
_STRING = descriptor_pb2.FieldDescriptorProto.TYPE_STRING
MESSAGES: dict[str, dict[str, tuple[int, int]]] = {
    "PredictRequest": {"body": (1, _BYTES), "content_type": (2, _STRING), "request_id": (3, _STRING)},
    "PredictReply": {
        "body": (1, _BYTES),
        "content_type": (2, _STRING),
        "request_id": (3, _STRING),
        "model_version": (4, _STRING),
    },
}


def _file_descriptor() -> descriptor_pb2.FileDescriptorProto:
    proto = descriptor_pb2.FileDescriptorProto(name="skewless/v1/predictor.proto", package=PACKAGE, syntax="proto3")
    for name, fields in MESSAGES.items():
        message = proto.message_type.add(name=name)
        for field, (number, kind) in fields.items():
            message.field.add(
                name=field,
                number=number,
                type=kind,
                label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL,
                json_name="".join(p if i == 0 else p.title() for i, p in enumerate(field.split("_"))),
            )
    service = proto.service.add(name="Predictor")
    service.method.add(name="Predict", input_type=f".{PACKAGE}.PredictRequest", output_type=f".{PACKAGE}.PredictReply")
    return proto


_POOL = descriptor_pool.DescriptorPool()
_FILE = _POOL.Add(_file_descriptor())
PredictRequest: Any = message_factory.GetMessageClass(_POOL.FindMessageTypeByName(f"{PACKAGE}.PredictRequest"))
PredictReply: Any = message_factory.GetMessageClass(_POOL.FindMessageTypeByName(f"{PACKAGE}.PredictReply"))
DESCRIPTOR = _POOL.FindFileByName("skewless/v1/predictor.proto")

# The HTTP status the predictor would answer -> the gRPC status it answers instead.
GRPC_STATUS: dict[int, grpc.StatusCode] = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    404: grpc.StatusCode.NOT_FOUND,
    409: grpc.StatusCode.FAILED_PRECONDITION,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
}


def grpc_status(http_status: int) -> grpc.StatusCode:
    """The gRPC counterpart of an HTTP status (``INTERNAL`` for any other 5xx, ``UNKNOWN`` else)."""
    if http_status in GRPC_STATUS:
        return GRPC_STATUS[http_status]
    return grpc.StatusCode.INTERNAL if http_status >= 500 else grpc.StatusCode.UNKNOWN


def add_predictor_servicer(servicer: Any, server: Any) -> None:
    """Register ``skewless.v1.Predictor`` on ``server``: the ``add_*Servicer_to_server`` function
    Serve's ``grpc_options.grpc_servicer_functions`` names (``runtime.serving.add_predictor_servicer``).
    Serve swaps the handlers for its own routing to the deployment's ``Predict`` method."""
    handler = grpc.method_handlers_generic_handler(
        SERVICE_NAME,
        {
            "Predict": grpc.unary_unary_rpc_method_handler(
                servicer.Predict,
                request_deserializer=PredictRequest.FromString,
                response_serializer=PredictReply.SerializeToString,
            )
        },
    )
    server.add_generic_rpc_handlers((handler,))


FRONT_HOST_ENV = "SKEWLESS_SERVE_FRONT_HOST"  # set by runtime.serving.ingress_options for Serve's processes


def bind_grpc_to_front_host() -> None:
    """Ray 2.60 binds each replica's own gRPC server (HAProxy mode's backend) on ``[::]``, every
    interface, with no setting for the host, while the replicas' HTTP servers follow
    ``http_options.host``. In a process whose environment names the front's host
    (:data:`FRONT_HOST_ENV`, set by :func:`runtime.serving.ingress_options`), Serve's gRPC servers
    started after this call bind that host instead: 127.0.0.1 by default, where HAProxy reaches
    them. A front on every interface, or no variable, leaves Ray's bind as it is. Idempotent."""
    import os

    host = os.environ.get(FRONT_HOST_ENV, "").strip()
    if host in ("", "0.0.0.0", "::", "[::]"):
        return
    from ray.serve._private import default_impl

    original = default_impl.add_grpc_address
    if getattr(original, "skewless_front_host", None) is not None:
        return
    bind = f"[{host}]" if ":" in host and not host.startswith("[") else host

    def add_grpc_address(grpc_server: Any, server_address: str) -> Any:
        wildcard, _, port = server_address.rpartition(":")
        return original(grpc_server, f"{bind}:{port}" if wildcard in ("[::]", "0.0.0.0", "") else server_address)

    add_grpc_address.skewless_front_host = host  # type: ignore[attr-defined]
    default_impl.add_grpc_address = add_grpc_address


def predict_stub(channel: grpc.Channel | grpc.aio.Channel) -> Any:
    """A callable for ``Predict`` on ``channel`` (sync or asyncio): ``stub(PredictRequest(...),
    metadata=(("authorization", "Bearer <key>"),))`` returns a :data:`PredictReply`."""
    return channel.unary_unary(
        PREDICT_METHOD,
        request_serializer=PredictRequest.SerializeToString,
        response_deserializer=PredictReply.FromString,
    )
