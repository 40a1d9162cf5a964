"""Request bodies -> an Arrow table of raw rows; predictions -> a response body.

Pure functions with no Ray import, so the Serve replica, the FastAPI baseline and the
tests share one codec. Two content types are accepted:

- ``application/json``: ``{"instances": [{"col": value, ...}, ...]}``,
  answered with JSON ``{"predictions": [...], "model": {...}}`` (plus ``probabilities`` and
  ``classes`` for classifiers).
- ``application/vnd.apache.arrow.stream``: an Arrow IPC stream of raw rows, answered with an
  Arrow IPC stream of ``prediction`` (plus ``probability_<class>``) whose schema metadata
  ``model`` holds the model identity as JSON.

A body without a ``Content-Type`` is a 415: a browser page can send one to a loopback endpoint
with no CORS preflight (a ``Blob`` body carries none), so it is never taken for JSON.

:func:`decode_request` raises nothing but :class:`HttpError` (a 4xx), whatever the bytes:
a client can never cause a 500 here. Schema errors found later by the transform (a null
where ``nullable: false``, NaN) become one with :meth:`HttpError.from_schema_error`.
"""

from __future__ import annotations

import json
import math
import reprlib
import struct
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from runtime.errors import PreprocessingError, SchemaValidationError, SkewlessError

if TYPE_CHECKING:
    from runtime.preprocessing import FittedPreprocessor
    from runtime.tasks import Predictions

__all__ = [
    "ACCEPTED_CONTENT_TYPES",
    "ARROW_STREAM",
    "JSON",
    "HttpError",
    "decode_request",
    "encode_response",
    "is_arrow",
    "media_type",
]

JSON = "application/json"
ARROW_STREAM = "application/vnd.apache.arrow.stream"
ACCEPTED_CONTENT_TYPES = (JSON, ARROW_STREAM)
_UTF8_CHARSETS = frozenset({"utf-8", "utf8", "us-ascii", "ascii"})
_SHORT = 200  # characters of a bad value echoed back: bodies stay small
# A compressed Arrow stream may expand beyond the body limit by at most this factor.
_MAX_EXPANSION = 4
# Objects a JSON body may hold beside its instances (the envelope, a client's extra fields).
_ENVELOPE_OBJECTS = 16
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict, _REPR.maxstring, _REPR.maxother = 3, 5, 5, 60, 60


class HttpError(SkewlessError):
    """A 4xx answer whose body names the field, the row, the bad value and the rule."""

    def __init__(
        self,
        status: int,
        field: str | None,
        value: Any,
        rule: str,
        row: int | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.status = status
        self.field = field
        self.value = _short(value)
        self.rule = rule
        self.row = row
        self.headers = dict(headers or {})
        where = f" (row {row})" if row is not None else ""
        super().__init__(f"{status} {field or 'request'}{where}: {self.value!r} breaks rule: {rule}")

    @classmethod
    def from_schema_error(cls, exc: SchemaValidationError) -> HttpError:
        """A 422 from an error the preprocessing raised while reading or transforming rows."""
        err = exc.to_dict()
        return cls(422, err["field"], err["value"], err["rule"], row=err["row"])

    def to_dict(self) -> dict[str, Any]:
        return {"error": {"field": self.field, "row": self.row, "value": self.value, "rule": self.rule}}

    def body(self) -> bytes:
        return json.dumps(self.to_dict()).encode()


def _short(value: Any) -> Any:
    """JSON-safe and short: JSON has no NaN/inf, and an echoed value must not be megabytes."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        return value if len(value) <= _SHORT else value[:_SHORT] + "..."
    if isinstance(value, int):  # str() of an int over 4300 digits raises
        return value if value.bit_length() <= 600 else f"<an integer of {value.bit_length()} bits>"
    if isinstance(value, float) and math.isfinite(value):
        return value
    try:  # reprlib: bounded depth and length, so a 900-deep list cannot overflow the stack here
        return _REPR.repr(value)[:_SHORT]
    except (RecursionError, ValueError, MemoryError):
        return f"<a {type(value).__name__}>"


def media_type(content_type: str | None) -> tuple[str, dict[str, str]]:
    """``"Application/JSON; charset=UTF-8"`` -> ``("application/json", {"charset": "utf-8"})``."""
    if not content_type:
        return "", {}
    kind, *params = content_type.split(";")
    parsed = {}
    for param in params:
        key, _, value = param.partition("=")
        parsed[key.strip().lower()] = value.strip().strip('"').lower()
    return kind.strip().lower(), parsed


def is_arrow(content_type: str | None) -> bool:
    """Whether a request (or an ``Accept`` header) asks for Arrow IPC."""
    return media_type(content_type)[0] == ARROW_STREAM


def decode_request(
    content_type: str | None,
    body: bytes,
    *,
    preprocessor: FittedPreprocessor,
    max_body_bytes: int,
    max_instances: int,
) -> pa.Table:
    """The request's raw rows as a table with ``preprocessor.input_schema``; else an HttpError."""
    if len(body) > max_body_bytes:
        raise HttpError(413, "body", len(body), f"request body at most {max_body_bytes} bytes")
    kind, params = media_type(content_type)
    if not kind:
        raise HttpError(
            415,
            "Content-Type",
            content_type,
            f"the header is required; send one of: {', '.join(ACCEPTED_CONTENT_TYPES)}",
        )
    if kind == JSON:
        charset = params.get("charset", "utf-8")
        if charset not in _UTF8_CHARSETS:
            raise HttpError(415, "Content-Type", content_type, "JSON bodies must be UTF-8; send charset=utf-8")
        return _decode_json(body, preprocessor, max_instances)
    if kind == ARROW_STREAM:
        return _decode_arrow(body, preprocessor, max_instances, max_body_bytes * _MAX_EXPANSION)
    raise HttpError(415, "Content-Type", content_type, f"send one of: {', '.join(ACCEPTED_CONTENT_TYPES)}")


# --------------------------------------------------------------------------- JSON


def _reject_constant(token: str) -> Any:
    raise ValueError(f"{token} is not valid JSON; send null for a missing value")


class _TooManyObjects(Exception):
    pass


def _counting_hook(limit: int) -> Any:
    """An ``object_pairs_hook`` that stops the parse at the ``limit + 1``-th object."""
    seen = 0

    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        nonlocal seen
        seen += 1
        if seen > limit:
            raise _TooManyObjects
        return dict(pairs)

    return hook


def _parse_json(body: bytes, max_instances: int) -> Any:
    """``json.loads``, but a body that could hold more than ``max_instances`` objects is parsed
    with a hook that stops at the first object past the bound: 10 MiB of ``{}`` would otherwise
    become 3.5 million dicts before the count is checked. ``{`` counts every object (and any
    brace inside a string): at or below the bound the fast parser runs as it is."""
    limit = max_instances + _ENVELOPE_OBJECTS
    if body.count(b"{") <= limit:
        return json.loads(body, parse_constant=_reject_constant)
    try:
        return json.loads(body, parse_constant=_reject_constant, object_pairs_hook=_counting_hook(limit))
    except _TooManyObjects:
        raise HttpError(
            413, "instances", f"more than {max_instances}", f"at most {max_instances} instances per request"
        ) from None


def _decode_json(body: bytes, preprocessor: FittedPreprocessor, max_instances: int) -> pa.Table:
    try:
        payload = _parse_json(body, max_instances)
    except (ValueError, UnicodeDecodeError, RecursionError, MemoryError) as exc:
        # RecursionError: nesting deeper than the parser's stack; ValueError: also ints over 4300 digits
        rule = f"body must be valid JSON ({str(exc)[:_SHORT]})"
        if body[:64].lstrip()[:1] not in (b"{", b"["):
            rule += f"; for Arrow IPC send Content-Type: {ARROW_STREAM}"
        raise HttpError(400, "body", body[:100].decode("utf-8", "replace"), rule) from None
    if not isinstance(payload, dict) or "instances" not in payload:
        shown = payload if not isinstance(payload, dict) else None
        raise HttpError(422, "instances", shown, 'body must be an object {"instances": [{...}, ...]}')
    instances = payload["instances"]
    if not isinstance(instances, list) or not instances:
        raise HttpError(422, "instances", instances, "must be a non-empty list of objects")
    if len(instances) > max_instances:
        raise HttpError(413, "instances", len(instances), f"at most {max_instances} instances per request")
    for i, row in enumerate(instances):
        if not isinstance(row, dict):
            raise HttpError(422, "instances", row, "each instance must be an object of column: value", row=i)
    try:
        return preprocessor.records_to_table(instances)
    except SchemaValidationError as exc:
        raise HttpError.from_schema_error(exc) from None
    except PreprocessingError as exc:
        raise HttpError(422, "instances", None, str(exc)) from None
    except UnicodeEncodeError:  # "\ud800": a lone surrogate is valid JSON but not a string Arrow can hold
        raise _surrogate_error(instances, preprocessor.input_schema) from None


def _surrogate_error(instances: list[dict[str, Any]], schema: pa.Schema) -> HttpError:
    for name in schema.names:
        for i, row in enumerate(instances):
            value = row.get(name)
            if isinstance(value, str):
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError:
                    return HttpError(422, name, value, "a string must be valid Unicode (no lone surrogates)", row=i)
    return HttpError(422, "instances", None, "strings must be valid Unicode (no lone surrogates)")


# --------------------------------------------------------------------------- Arrow IPC


def _malformed(exc: Exception | str) -> HttpError:
    return HttpError(400, "body", None, f"body must be an Arrow IPC stream ({str(exc)[:_SHORT]})")


def _decode_arrow(body: bytes, preprocessor: FittedPreprocessor, max_instances: int, max_decoded: int) -> pa.Table:
    buf = pa.py_buffer(body)
    rows = _check_stream(buf, max_instances, max_decoded)
    if rows == 0:
        raise HttpError(422, "instances", 0, "the Arrow stream must hold at least one row")
    try:
        with pa.ipc.open_stream(buf, options=pa.ipc.IpcReadOptions(use_threads=False)) as reader:
            table = reader.read_all()
        table.validate(full=True)  # offsets, UTF-8: the client's bytes are not trusted
    except (pa.ArrowException, ValueError, OSError) as exc:
        raise _malformed(exc) from None
    return _conform(table, preprocessor.input_schema, max_decoded)


def _conform(table: pa.Table, schema: pa.Schema, max_decoded: int | None = None) -> pa.Table:
    """The schema's columns in its order and types; lossless casts only; extra columns dropped."""
    columns = []
    for field in schema:
        found = table.schema.get_all_field_indices(field.name)
        if len(found) != 1:
            rule = "required column is missing" if not found else f"the column appears {len(found)} times; send it once"
            raise HttpError(422, field.name, None, rule)
        column = table.column(found[0])
        if column.type != field.type:
            if max_decoded is not None:
                _check_expansion(column, field, max_decoded)
            column = _cast(column, field)
        columns.append(column)
    return pa.Table.from_arrays(columns, schema=schema)


def _expanded_bytes(column: pa.ChunkedArray) -> int:
    """Bytes of string data ``column`` holds once cast to plain strings: a dictionary or view
    column can reference one long value from every row (a small body, a huge cast)."""
    import pyarrow.compute as pc

    total = 0
    for chunk in column.chunks:
        if pa.types.is_dictionary(chunk.type):
            if not _is_binary_like(chunk.type.value_type):
                continue  # fixed-width values: the cast's size is bounded by the row count
            lengths = pc.binary_length(chunk.dictionary)
            total += int(pc.sum(pc.take(lengths, chunk.indices)).as_py() or 0)
        elif pa.types.is_string_view(chunk.type) or pa.types.is_binary_view(chunk.type):
            total += int(pc.sum(pc.binary_length(chunk)).as_py() or 0)
    return total


def _is_binary_like(t: pa.DataType) -> bool:
    """Variable-length bytes of any width: a dictionary of these can expand without bound."""
    return (
        pa.types.is_string(t)
        or pa.types.is_large_string(t)
        or pa.types.is_string_view(t)
        or pa.types.is_binary(t)
        or pa.types.is_large_binary(t)
        or pa.types.is_binary_view(t)
    )


def _check_expansion(column: pa.ChunkedArray, field: pa.Field, max_decoded: int) -> None:
    size = _expanded_bytes(column)
    if size > max_decoded:
        raise HttpError(
            413, field.name, size, f"the column's values would decode to more than {max_decoded} bytes; send less"
        )


def _castable(t: pa.DataType, target: pa.DataType) -> bool:
    if pa.types.is_null(t):
        return True
    if pa.types.is_dictionary(t):
        t = t.value_type
    if pa.types.is_string(target):  # strings only: JSON rejects a number for a categorical too
        return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)
    # numbers only (no bools), as for JSON; the safe cast refuses ints beyond 2**53
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t)


def _cast(column: pa.ChunkedArray, field: pa.Field) -> pa.ChunkedArray:
    rule = f"expected a column of type {field.type}, got {column.type}"
    if not _castable(column.type, field.type):
        raise HttpError(422, field.name, str(column.type), rule)
    try:
        return column.cast(field.type, safe=True)
    except (pa.ArrowException, ValueError, OverflowError) as exc:
        raise HttpError(
            422, field.name, str(column.type), f"{rule} whose values convert without loss ({exc})"
        ) from None


# Arrow's Message flatbuffer, read just far enough to bound a stream before decoding it:
# Message{1: header_type, 2: header}; DictionaryBatch{1: data}; RecordBatch{0: length, 2: buffers, 3: compression}.
_RECORD_BATCH, _DICTIONARY_BATCH = 3, 2


class _Flat:
    """The few flatbuffer reads the guard needs; out-of-range reads raise struct.error."""

    def __init__(self, data: memoryview) -> None:
        self.data = data

    def u32(self, pos: int) -> int:
        value: int = struct.unpack_from("<I", self.data, pos)[0]
        return value

    def root(self) -> int:
        return self.u32(0)

    def field(self, table: int, index: int) -> int | None:
        vtable = table - struct.unpack_from("<i", self.data, table)[0]
        size = struct.unpack_from("<H", self.data, vtable)[0]
        slot = 4 + 2 * index
        offset = struct.unpack_from("<H", self.data, vtable + slot)[0] if slot < size else 0
        return table + offset if offset else None

    def ref(self, pos: int) -> int:
        return pos + self.u32(pos)


def _batch_size(meta: memoryview, body: memoryview) -> tuple[int, int, bool]:
    """(rows, decoded bytes, is_data) of one dictionary or record batch message."""
    flat = _Flat(meta)
    message = flat.root()
    kind_at, header_at = flat.field(message, 1), flat.field(message, 2)
    kind = struct.unpack_from("<B", meta, kind_at)[0] if kind_at is not None else 0
    if header_at is None or kind not in (_RECORD_BATCH, _DICTIONARY_BATCH):
        return 0, len(body), False
    batch = flat.ref(header_at)
    if kind == _DICTIONARY_BATCH:
        data_at = flat.field(batch, 1)
        if data_at is None:
            return 0, len(body), False
        batch = flat.ref(data_at)
    length_at = flat.field(batch, 0)
    rows = struct.unpack_from("<q", meta, length_at)[0] if length_at is not None else 0
    buffers_at = flat.field(batch, 2)
    if flat.field(batch, 3) is None or buffers_at is None:  # uncompressed: decoded size = body size
        return rows, len(body), kind == _RECORD_BATCH
    vector = flat.ref(buffers_at)
    decoded = 0
    for i in range(flat.u32(vector)):
        offset, length = struct.unpack_from("<qq", meta, vector + 4 + 16 * i)
        if length >= 8:  # a compressed buffer starts with its decoded length (-1: stored as is)
            prefix = struct.unpack_from("<q", body, offset)[0]
            decoded += length - 8 if prefix < 0 else prefix
    return rows, decoded, kind == _RECORD_BATCH


def _check_stream(buf: pa.Buffer, max_instances: int, max_decoded: int) -> int:
    """Rows in the stream, read from message headers before any buffer is decompressed."""
    rows = decoded = 0
    try:
        reader = pa.ipc.MessageReader.open_stream(buf)
        first = reader.read_next_message()
        if first.type != "schema":
            raise _malformed(f"the first message is a {first.type}, not a schema")
        for message in reader:
            body = memoryview(message.body) if message.body is not None else memoryview(b"")
            n, size, is_data = _batch_size(memoryview(message.metadata), body)
            if n < 0:
                raise _malformed(f"a batch declares {n} rows")
            rows += n if is_data else 0
            decoded += size
            if rows > max_instances:
                raise HttpError(413, "instances", rows, f"at most {max_instances} rows per request")
            if decoded > max_decoded:
                raise HttpError(413, "body", decoded, f"an Arrow stream decoding to at most {max_decoded} bytes")
    except StopIteration:
        raise _malformed("the stream is empty") from None
    except (pa.ArrowException, ValueError, OSError, struct.error, IndexError) as exc:
        raise _malformed(exc) from None
    return rows


# --------------------------------------------------------------------------- responses


def encode_response(
    preds: Predictions, identity: Mapping[str, Any], *, arrow: bool, request_id: str | None = None
) -> tuple[bytes, str]:
    """(body, content type): Arrow IPC for an Arrow request, else JSON. ``request_id`` (what
    labels sent later name the prediction by) goes in the JSON body and the Arrow metadata."""
    if arrow:
        return _encode_arrow(preds, identity, request_id), ARROW_STREAM
    out = preds.to_json()
    out["model"] = dict(identity)
    if request_id is not None:
        out["request_id"] = request_id
    try:
        text = json.dumps(out, allow_nan=False, separators=(",", ":"))
    except ValueError:  # a NaN/inf output (a NaN input the spec allows): JSON's spelling is null
        text = json.dumps(_finite(out), allow_nan=False, separators=(",", ":"))
    return text.encode(), JSON


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, list):
        return [_finite(v) for v in value]
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    return value


def _encode_arrow(preds: Predictions, identity: Mapping[str, Any], request_id: str | None = None) -> bytes:
    names, arrays = ["prediction"], [pa.array(preds.values)]
    if preds.probabilities is not None and preds.classes is not None:
        probs = np.asarray(preds.probabilities, dtype=np.float32)
        for j, label in enumerate(preds.classes):
            names.append(f"probability_{label}")
            arrays.append(pa.array(probs[:, j]))
    metadata = {"model": json.dumps(dict(identity))}
    if request_id is not None:
        metadata["request_id"] = request_id
    table = pa.Table.from_arrays(arrays, names=names, metadata=metadata)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return bytes(sink.getvalue().to_pybytes())
