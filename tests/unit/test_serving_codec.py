"""The request/response codec: exact rules for JSON and Arrow, and no 5xx from any bytes.

The property tests feed :func:`decode_request` arbitrary bytes, arbitrary JSON, adversarial
rows and broken Arrow streams, and require a table with the preprocessor's input schema or
an :class:`HttpError` with a 4xx status and a well-formed body. A decoded table is then run
through the real ``transform``: anything it rejects must be a SchemaValidationError (a 422
via ``HttpError.from_schema_error``), so the whole path before the model is 4xx-only.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from runtime.data import SyntheticConfig, generate_synthetic, synthetic_feature_spec
from runtime.errors import SchemaValidationError
from runtime.preprocessing import FeatureSpec, FittedPreprocessor, fit
from runtime.serving._codec import ARROW_STREAM, JSON, HttpError, decode_request, encode_response
from runtime.tasks import Predictions

MAX_BODY = 1 << 20
MAX_INSTANCES = 50
PROPERTY = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> pa.Table:
    path = generate_synthetic(tmp_path_factory.mktemp("codec") / "d.parquet", SyntheticConfig(rows=2000, seed=5))
    return pq.read_table(path)


@pytest.fixture(scope="module")
def prep(raw: pa.Table) -> FittedPreprocessor:
    return fit(FeatureSpec.model_validate(synthetic_feature_spec("binary")), raw)


@pytest.fixture(scope="module")
def rows(raw: pa.Table, prep: FittedPreprocessor) -> pa.Table:
    """Raw request rows: the input columns only."""
    return raw.select(prep.input_schema.names).slice(0, 200)


def decode(prep: FittedPreprocessor, content_type: str | None, body: bytes, **limits: int) -> pa.Table:
    return decode_request(
        content_type,
        body,
        preprocessor=prep,
        max_body_bytes=limits.get("max_body_bytes", MAX_BODY),
        max_instances=limits.get("max_instances", MAX_INSTANCES),
    )


def error(prep: FittedPreprocessor, content_type: str | None, body: bytes, **limits: int) -> HttpError:
    with pytest.raises(HttpError) as info:
        decode(prep, content_type, body, **limits)
    return info.value


def ipc(table: pa.Table, compression: str | None = None) -> bytes:
    sink = pa.BufferOutputStream()
    options = pa.ipc.IpcWriteOptions(compression=compression)
    with pa.ipc.new_stream(sink, table.schema, options=options) as writer:
        writer.write_table(table, max_chunksize=7)  # several batches
    return bytes(sink.getvalue().to_pybytes())


def body_of(instances: Any) -> bytes:
    return json.dumps({"instances": instances}).encode()


def check_outcome(prep: FittedPreprocessor, content_type: str | None, body: bytes) -> None:
    """The property: a table with the input schema (and a 4xx-only transform), or a 4xx."""
    try:
        table = decode(prep, content_type, body)
    except HttpError as exc:
        event(f"decode: {exc.status}")
        assert 400 <= exc.status < 500, exc
        err = json.loads(exc.body())["error"]
        assert set(err) == {"field", "row", "value", "rule"} and err["rule"]
        assert len(exc.body()) < 2000
        return
    assert isinstance(table, pa.Table) and table.schema.equals(prep.input_schema)
    assert 1 <= table.num_rows <= MAX_INSTANCES
    try:
        out = prep.transform(table)
    except SchemaValidationError as exc:
        event("decoded; transform: 422")
        assert HttpError.from_schema_error(exc).status == 422
        return
    event("decoded and transformed")
    assert out.shape == (table.num_rows, prep.output_dim)


# --------------------------------------------------------------------------- JSON: the rules


def test_json_rows_become_the_same_table_as_records_to_table(prep: FittedPreprocessor, rows: pa.Table) -> None:
    records = rows.slice(0, 5).to_pylist()
    expected = prep.records_to_table(records)
    for content_type in (JSON, "Application/JSON; charset=UTF-8"):
        assert decode(prep, content_type, body_of(records)).equals(expected)


def test_a_body_without_a_content_type_is_415_not_json(prep: FittedPreprocessor, rows: pa.Table) -> None:
    """A browser page can POST a ``Blob`` to a loopback endpoint with no preflight and no
    Content-Type: that must not be read as JSON."""
    for content_type in (None, "", "  ; charset=utf-8"):
        err = error(prep, content_type, body_of(rows.slice(0, 1).to_pylist()))
        assert (err.status, err.field) == (415, "Content-Type") and JSON in err.rule and "required" in err.rule


def test_json_past_the_instance_bound_stops_parsing_early(prep: FittedPreprocessor, rows: pa.Table) -> None:
    """10 MiB of ``{}`` must not become millions of dicts before the count is checked."""
    import tracemalloc

    body = b'{"instances": [' + b",".join([b"{}"] * 1_000_000) + b"]}"  # 3 MB, a million objects
    tracemalloc.start()
    try:
        err = error(prep, JSON, body, max_body_bytes=len(body), max_instances=100)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (err.status, err.field) == (413, "instances") and "at most 100" in err.rule
    assert peak < 5_000_000, peak  # a full parse holds a million dicts: ~64 MB
    # braces inside strings are not objects: a body at the bound still parses exactly
    good = rows.slice(0, 1).to_pylist()[0]
    braced = body_of([{**good, "plan": "{" * 50}] * 100)
    assert decode(prep, JSON, braced, max_instances=100).num_rows == 100
    assert error(prep, JSON, body_of([good] * 101), max_instances=100).status == 413


@pytest.mark.parametrize(
    ("body", "status", "field", "row"),
    [
        (b"{not json", 400, "body", None),
        (b'{"instances": [{"age": NaN}]}', 400, "body", None),
        (b'{"instances": [{"age": -Infinity}]}', 400, "body", None),
        (b"\xff\xfe\x00", 400, "body", None),
        (b"[" * 100_000 + b"]" * 100_000, 400, "body", None),  # deeper than the parser's stack
        (b"1" * 5000, 400, "body", None),  # an int over Python's 4300-digit limit
        (json.dumps({"rows": []}).encode(), 422, "instances", None),
        (json.dumps([{"age": 1}]).encode(), 422, "instances", None),
        (json.dumps({"instances": []}).encode(), 422, "instances", None),
        (json.dumps({"instances": {"age": 1}}).encode(), 422, "instances", None),
        (json.dumps({"instances": [{}, 2]}).encode(), 422, "instances", 1),
        (json.dumps({"instances": [{"age": 30}]}).encode(), 422, "income", 0),  # required key missing
    ],
)
def test_bad_json_names_field_row_and_rule(
    prep: FittedPreprocessor, body: bytes, status: int, field: str, row: int | None
) -> None:
    err = error(prep, JSON, body)
    assert (err.status, err.field, err.row) == (status, field, row), err
    assert json.loads(err.body())["error"]["rule"] == err.rule


def test_deep_but_parseable_nesting_is_a_short_4xx(prep: FittedPreprocessor) -> None:
    """Echoing a 900-deep value must not overflow the stack the parser just survived."""
    for depth in (50, 500, 900, 990, 5000):
        nested = b"[" * depth + b"]" * depth
        for body in (nested, b'{"instances": [' + nested + b"]}", b'{"instances": [{"age": ' + nested + b"}]}"):
            err = error(prep, JSON, body)
            assert 400 <= err.status < 500 and len(err.body()) < 1000, (depth, err)


def test_bad_value_in_a_row_names_column_and_row(prep: FittedPreprocessor, rows: pa.Table) -> None:
    good = rows.slice(0, 1).to_pylist()[0]
    cases = [
        ({**good, "age": "old"}, "age", "old"),
        ({**good, "plan": 7}, "plan", 7),
        ({**good, "tenure_months": True}, "tenure_months", True),
        ({**good, "income": 2**60}, "income", 2**60),  # not exact in float64
        ({**good, "region": "\ud800"}, "region", "\ud800"),  # valid JSON, not storable UTF-8
    ]
    for bad, field, value in cases:
        err = error(prep, JSON, body_of([good, bad]))
        assert (err.status, err.field, err.row, err.value) == (422, field, 1, value), err
        json.loads(err.body())  # still serializable


def test_limits_are_413(prep: FittedPreprocessor, rows: pa.Table) -> None:
    good = rows.slice(0, 1).to_pylist()
    err = error(prep, JSON, body_of(good * (MAX_INSTANCES + 1)))
    assert (err.status, err.field, err.value) == (413, "instances", MAX_INSTANCES + 1)
    big = body_of(good * 40)
    err = error(prep, JSON, big, max_body_bytes=len(big) - 1)
    assert err.status == 413 and err.rule.startswith("request body at most")


def test_other_content_types_are_415_listing_the_accepted_ones(prep: FittedPreprocessor) -> None:
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "application/vnd.apache.arrow.file"):
        err = error(prep, content_type, b"{}")
        assert (err.status, err.field, err.value) == (415, "Content-Type", content_type)
        assert JSON in err.rule and ARROW_STREAM in err.rule
    err = error(prep, "application/json; charset=latin-1", b"{}")
    assert err.status == 415 and "UTF-8" in err.rule


# --------------------------------------------------------------------------- Arrow: the rules


def test_arrow_rows_give_the_same_features_as_json(prep: FittedPreprocessor, rows: pa.Table) -> None:
    for compression in (None, "zstd", "lz4"):
        table = decode(prep, ARROW_STREAM, ipc(rows.slice(0, 40), compression))
        from_json = decode(prep, JSON, body_of(rows.slice(0, 40).to_pylist()))
        assert table.schema.equals(prep.input_schema)
        assert np.array_equal(prep.transform(table), prep.transform(from_json))


def test_arrow_casts_losslessly_reorders_and_ignores_extra_columns(prep: FittedPreprocessor, rows: pa.Table) -> None:
    some = rows.slice(0, 5)
    changed = (
        some.set_column(0, "age", pa.array([30, 40, None, 50, 60], pa.int32()))
        .set_column(some.schema.get_field_index("plan"), "plan", some.column("plan").dictionary_encode())
        .set_column(some.schema.get_field_index("income"), "income", some.column("income").cast(pa.float32()))
        .append_column("extra", pa.array(list("abcde")))
    )
    reordered = changed.select(changed.column_names[::-1])
    table = decode(prep, ARROW_STREAM, ipc(reordered))
    assert table.schema.equals(prep.input_schema)
    assert table.column("age").to_pylist() == [30.0, 40.0, None, 50.0, 60.0]
    assert table.column("plan").to_pylist() == some.column("plan").to_pylist()


@pytest.mark.parametrize(
    ("column", "array", "status", "rule"),
    [
        ("age", pa.array([2**60] * 5), 422, "without loss"),
        ("age", pa.array(["1"] * 5), 422, "expected a column of type double, got string"),
        ("age", pa.array([True] * 5), 422, "got bool"),
        ("plan", pa.array([1] * 5), 422, "expected a column of type string, got int64"),
        ("tenure_months", pa.array([[1.0]] * 5), 422, "got list<item: double>"),
    ],
)
def test_arrow_wrong_types_name_field_and_types(
    prep: FittedPreprocessor, rows: pa.Table, column: str, array: pa.Array, status: int, rule: str
) -> None:
    some = rows.slice(0, 5)
    bad = some.set_column(some.schema.get_field_index(column), column, array)
    err = error(prep, ARROW_STREAM, ipc(bad))
    assert (err.status, err.field, err.value) == (status, column, str(array.type)), err
    assert rule in err.rule


def test_arrow_stream_shape_errors(prep: FittedPreprocessor, rows: pa.Table) -> None:
    some = rows.slice(0, 5)
    err = error(prep, ARROW_STREAM, ipc(some.drop_columns(["region"])))
    assert (err.status, err.field, err.rule) == (422, "region", "required column is missing")
    err = error(prep, ARROW_STREAM, ipc(some.append_column("age", some.column("age"))))
    assert (err.status, err.field) == (422, "age") and "2 times" in err.rule
    err = error(prep, ARROW_STREAM, ipc(some.slice(0, 0)))
    assert (err.status, err.field, err.value) == (422, "instances", 0)
    err = error(prep, ARROW_STREAM, ipc(rows.slice(0, MAX_INSTANCES + 1)))
    assert (err.status, err.field, err.value) == (413, "instances", MAX_INSTANCES + 1)
    for broken in (b"", b"not arrow", ipc(some)[:-9], ipc(some)[:40]):
        assert error(prep, ARROW_STREAM, broken).status == 400


def test_a_compressed_stream_that_expands_past_the_limit_is_413_before_decoding(prep: FittedPreprocessor) -> None:
    n = 20
    bomb = pa.table(
        {f.name: pa.array([1.0] * n) if f.type == pa.float64() else pa.array(["a"] * n) for f in prep.input_schema}
    ).append_column("pad", pa.array(["x" * 200_000] * n))
    body = ipc(bomb, "zstd")
    assert len(body) < 64_000  # 4 MB of padding compresses to almost nothing
    err = error(prep, ARROW_STREAM, body, max_body_bytes=256_000)
    assert (err.status, err.field) == (413, "body") and err.value > 4 * 256_000  # stopped at the first batch over


def test_a_dictionary_column_that_would_expand_past_the_limit_is_413_before_the_cast(
    prep: FittedPreprocessor,
) -> None:
    n = 1000
    string_field = next(f for f in prep.input_schema if pa.types.is_string(f.type))
    columns = {}
    for f in prep.input_schema:
        if f.name == string_field.name:  # one 100 kB value, referenced from every row: 100 MB once cast
            columns[f.name] = pa.DictionaryArray.from_arrays(pa.array([0] * n, pa.int32()), pa.array(["v" * 100_000]))
        else:
            columns[f.name] = pa.array([1.0] * n) if f.type == pa.float64() else pa.array(["a"] * n)
    body = ipc(pa.table(columns))
    assert len(body) < 2_000_000
    err = error(prep, ARROW_STREAM, body, max_body_bytes=2_000_000, max_instances=10_000)
    assert (err.status, err.field) == (413, string_field.name) and err.value == n * 100_000


@pytest.mark.parametrize("value_type", [pa.string(), pa.large_string(), pa.binary(), pa.large_binary()])
def test_a_dictionary_of_any_byte_type_is_bounded_before_the_cast(prep: FittedPreprocessor, value_type: Any) -> None:
    """The probe that found it: a 2.4 KB zstd body whose categorical column is a dictionary of
    ``large_string`` holding one 1 MB value for 200 rows decoded to 200 MB and was answered."""
    n = 200
    string_field = next(f for f in prep.input_schema if pa.types.is_string(f.type))
    value = pa.array(
        [b"v" * 1_000_000]
        if pa.types.is_binary(value_type) or pa.types.is_large_binary(value_type)
        else ["v" * 1_000_000],
        value_type,
    )
    columns = {
        f.name: pa.DictionaryArray.from_arrays(pa.array([0] * n, pa.int32()), value)
        if f.name == string_field.name
        else (pa.array([1.0] * n) if f.type == pa.float64() else pa.array(["a"] * n))
        for f in prep.input_schema
    }
    body = ipc(pa.table(columns), "zstd")
    assert len(body) < 64_000  # vs 200 MB once cast
    err = error(prep, ARROW_STREAM, body, max_body_bytes=1_000_000, max_instances=10_000)
    assert (err.status, err.field) == (413, string_field.name) and err.value == n * 1_000_000


# --------------------------------------------------------------------------- properties: never a 5xx

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(10**400), max_value=10**400)
    | st.floats()  # NaN and inf become NaN/Infinity tokens
    | st.text()
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)
adversarial_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(),
    st.floats(min_value=-1e6, max_value=1e6),
    st.text(),
    st.sampled_from(["", "basic", "pro", "mobile", "é", "\ud800", "\x00", "1e400", "NaN", "x" * 10_000]),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


@PROPERTY
@given(data=st.binary(max_size=2048), content_type=st.sampled_from([None, JSON, ARROW_STREAM, "text/csv", "x/y;z"]))
def test_any_bytes_are_a_table_or_a_4xx(prep: FittedPreprocessor, data: bytes, content_type: str | None) -> None:
    check_outcome(prep, content_type, data)


@PROPERTY
@given(value=json_values, wrap=st.booleans())
def test_any_json_value_is_a_table_or_a_4xx(prep: FittedPreprocessor, value: Any, wrap: bool) -> None:
    payload = {"instances": value} if wrap else value
    check_outcome(prep, JSON, json.dumps(payload, allow_nan=True).encode())


@PROPERTY
@given(data=st.data(), n=st.integers(min_value=1, max_value=4))
def test_adversarial_rows_are_a_table_or_a_4xx(
    prep: FittedPreprocessor, rows: pa.Table, data: st.DataObject, n: int
) -> None:
    records = rows.slice(0, n).to_pylist()
    names = prep.input_schema.names
    for record in records:
        for name in data.draw(st.sets(st.sampled_from(names), max_size=3)):
            if data.draw(st.booleans()):
                record[name] = data.draw(adversarial_values)
            else:
                del record[name]
        record.update(data.draw(st.dictionaries(st.text(max_size=5), adversarial_values, max_size=2)))
    text = json.dumps({"instances": records}, allow_nan=True)
    if data.draw(st.booleans()):  # a duplicated key: the parser keeps the last one
        name = data.draw(st.sampled_from(names))
        text = text.replace("{", f'{{"{name}": "dup", ', 1)
    check_outcome(prep, data.draw(st.sampled_from([JSON, None])), text.encode())


@st.composite
def arrow_bodies(draw: st.DrawFn, rows: pa.Table) -> bytes:
    n = draw(st.sampled_from([0, 1, 2, 7, MAX_INSTANCES, MAX_INSTANCES + 1]))
    table = rows.slice(draw(st.integers(0, 100)), n)
    for name in draw(st.sets(st.sampled_from(table.column_names), max_size=2)):
        i = table.schema.get_field_index(name)
        replacement = draw(
            st.sampled_from(
                [
                    pa.array([None] * n, pa.null()),
                    pa.array(range(n), pa.int64()),
                    pa.array([2**62] * n, pa.int64()),
                    pa.array(["7"] * n),
                    pa.array(["7"] * n, pa.large_string()),
                    pa.array([True] * n),
                    pa.array([[1.0]] * n),
                    pa.array([float("nan")] * n),
                    pa.array(["a"] * n).dictionary_encode(),
                ]
            )
        )
        table = table.set_column(i, name, replacement) if draw(st.booleans()) else table.remove_column(i)
    body = ipc(table, draw(st.sampled_from([None, "zstd", "lz4"])))
    cut = draw(st.one_of(st.none(), st.integers(0, len(body))))
    if cut is not None:  # a truncated stream
        body = body[:cut]
    flip = draw(st.one_of(st.none(), st.integers(0, max(len(body) - 1, 0))))
    if flip is not None and body:  # a corrupted byte, header or buffer
        body = body[:flip] + bytes([body[flip] ^ draw(st.integers(1, 255))]) + body[flip + 1 :]
    return body


@PROPERTY
@given(data=st.data())
def test_broken_arrow_streams_are_a_table_or_a_4xx(
    prep: FittedPreprocessor, rows: pa.Table, data: st.DataObject
) -> None:
    check_outcome(prep, ARROW_STREAM, data.draw(arrow_bodies(rows)))


# --------------------------------------------------------------------------- responses and errors


def test_json_response_is_predictions_plus_model(prep: FittedPreprocessor) -> None:
    preds = Predictions([0, 1], np.array([[0.75, 0.25], [0.125, 0.875]], dtype=np.float32), [0, 1])
    identity = {"name": "churn", "version": "3", "uri": "models:/churn@champion"}
    body, content_type = encode_response(preds, identity, arrow=False)
    assert content_type == JSON
    assert json.loads(body) == {**preds.to_json(), "model": identity}
    regression = Predictions([1.5, math.nan], None, None)
    body, _ = encode_response(regression, identity, arrow=False)
    assert json.loads(body)["predictions"] == [1.5, None]  # JSON has no NaN: null, not a 500


def test_arrow_response_has_prediction_probabilities_and_identity() -> None:
    preds = Predictions(["no", "yes"], np.array([[0.75, 0.25], [0.125, 0.875]], dtype=np.float32), ["no", "yes"])
    identity = {"name": "churn", "version": "3", "uri": "models:/churn@champion"}
    body, content_type = encode_response(preds, identity, arrow=True)
    assert content_type == ARROW_STREAM
    table = pa.ipc.open_stream(body).read_all()
    assert table.column_names == ["prediction", "probability_no", "probability_yes"]
    assert table.column("prediction").to_pylist() == ["no", "yes"]
    assert table.column("probability_yes").to_pylist() == [0.25, 0.875]
    assert json.loads(table.schema.metadata[b"model"]) == identity
    body, _ = encode_response(Predictions([1.5, 2.5], None, None), identity, arrow=True)
    assert pa.ipc.open_stream(body).read_all().column_names == ["prediction"]


def test_http_error_body_is_json_safe_short_and_carries_headers() -> None:
    err = HttpError(422, "age", math.nan, "must be finite", row=3, headers={"Retry-After": "1"})
    assert json.loads(err.body()) == {"error": {"field": "age", "row": 3, "value": "nan", "rule": "must be finite"}}
    assert err.headers == {"Retry-After": "1"}
    assert len(HttpError(422, "plan", "x" * 100_000, "r").body()) < 300
    assert isinstance(HttpError(422, "plan", {"a": [1, 2]}, "r").value, str)
    schema_err = SchemaValidationError("age", 2, "old", "expected a number")
    assert HttpError.from_schema_error(schema_err).to_dict()["error"] == {
        "field": "age",
        "row": 2,
        "value": "old",
        "rule": "expected a number",
    }


def test_no_ray_import(tmp_path: Path) -> None:
    """The codec is importable where Ray is not: a FastAPI process, a client."""
    import subprocess
    import sys

    code = (
        "import sys; import importlib.util as u; "
        "spec = u.spec_from_file_location('codec', 'runtime/serving/_codec.py'); "
        "m = u.module_from_spec(spec); spec.loader.exec_module(m); "
        "print('ray' in sys.modules)"
    )
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
