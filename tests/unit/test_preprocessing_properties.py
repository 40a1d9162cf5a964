"""Property: batch and online preprocessing are the same function, bit for bit.

For random specs (every feature type and option), random fit tables and random transform
tables (nulls, unseen categories, NaN/inf, out-of-clip values, integer columns),
``transform(table)`` equals ``transform_records(table.to_pylist())`` exactly, each record
alone gives its batch row exactly, a JSON round trip changes nothing, and when the batch is
rejected the records are rejected with the same column, row, value and rule.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pyarrow as pa
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from runtime.errors import ConfigError, PreprocessingError, SchemaValidationError
from runtime.preprocessing import FeatureSpec, FittedPreprocessor, fit

SEEN = ["a", "b", "c", "d"]
UNSEEN = ["zz", "", "é", "a ", "B"]
NONFINITE = [math.nan, math.inf, -math.inf]

small_floats = st.floats(min_value=-1e4, max_value=1e4, allow_nan=False, allow_infinity=False)
any_finite = st.floats(allow_nan=False, allow_infinity=False)
bounds = st.one_of(st.none(), st.integers(-20, 20).map(float), small_floats)


@st.composite
def numeric_feature(draw: st.DrawFn, name: str) -> dict[str, Any]:
    f: dict[str, Any] = {
        "name": name,
        "type": "numeric",
        "nullable": draw(st.booleans()),
        "allow_nonfinite": draw(st.booleans()),
        "standardize": draw(st.booleans()),
    }
    f["impute"] = draw(st.sampled_from(["mean", "median", "constant"]))
    if f["impute"] == "constant":
        f["impute_value"] = draw(st.floats(-0.5, 50, allow_nan=False))
    lo, hi = draw(bounds), draw(bounds)
    if lo is not None and hi is not None and lo > hi:
        lo, hi = hi, lo
    if draw(st.booleans()):
        f["log1p"] = True
        lo = draw(st.floats(-0.5, 3)) if draw(st.integers(0, 9)) else lo  # mostly a safe domain
        if hi is not None and lo is not None and lo > hi:
            hi = None
    if lo is not None or hi is not None:
        f["clip"] = [lo, hi]
    if draw(st.booleans()):
        f["bucketize"] = sorted(draw(st.sets(st.integers(-30, 30).map(float) | small_floats, min_size=1, max_size=4)))
    return f


@st.composite
def categorical_feature(draw: st.DrawFn, name: str) -> dict[str, Any]:
    return {
        "name": name,
        "type": "categorical",
        "nullable": draw(st.booleans()),
        "min_frequency": draw(st.integers(1, 3)),
        "max_categories": draw(st.none() | st.integers(1, 3)),
        "encoding": draw(st.sampled_from(["onehot", "index"])),
    }


@st.composite
def passthrough_feature(draw: st.DrawFn, name: str) -> dict[str, Any]:
    return {
        "name": name,
        "type": "passthrough",
        "nullable": draw(st.booleans()),
        "allow_nonfinite": draw(st.booleans()),
    }


@st.composite
def specs(draw: st.DrawFn) -> dict[str, Any]:
    kinds = draw(
        st.lists(st.sampled_from([numeric_feature, categorical_feature, passthrough_feature]), min_size=1, max_size=5)
    )
    return {"features": [draw(kind(f"f{i}")) for i, kind in enumerate(kinds)]}


def column(draw: st.DrawFn, feature: dict[str, Any], n: int, *, serving: bool, dirty: str) -> pa.Array:
    """A column for ``feature``; ``dirty`` may break a rule, ``serving`` adds unseen values."""
    nulls = feature["nullable"] or dirty == "nulls"
    if feature["type"] == "categorical":
        values = st.sampled_from(SEEN + (UNSEEN if serving else []))
        return pa.array(draw(st.lists(st.none() | values if nulls else values, min_size=n, max_size=n)), pa.string())
    if draw(st.integers(0, 4)) == 0:  # an integer column: transform casts it
        ints = st.integers(-1000, 1000)
        return pa.array(draw(st.lists(st.none() | ints if nulls else ints, min_size=n, max_size=n)), pa.int64())
    number = small_floats | any_finite if draw(st.booleans()) else small_floats
    if feature.get("allow_nonfinite") or dirty == "nonfinite":
        number = number | st.sampled_from(NONFINITE)
    return pa.array(draw(st.lists(st.none() | number if nulls else number, min_size=n, max_size=n)), pa.float64())


def table_for(draw: st.DrawFn, spec: dict[str, Any], n: int, *, serving: bool, dirty: str = "") -> pa.Table:
    cols = {f["name"]: column(draw, f, n, serving=serving, dirty=dirty) for f in spec["features"]}
    return pa.table(cols)


def bits(a: np.ndarray) -> tuple[str, tuple[int, ...], bytes]:
    return str(a.dtype), a.shape, a.tobytes()


def error_key(exc: SchemaValidationError) -> tuple[Any, ...]:
    return exc.column, exc.row, exc.rule, repr(exc.value)


def outcome(fn: Any, arg: Any) -> np.ndarray | SchemaValidationError:
    try:
        return fn(arg)  # type: ignore[no-any-return]
    except SchemaValidationError as exc:
        return exc


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_batch_and_records_are_bit_identical(data: st.DataObject) -> None:
    draw = data.draw
    doc = draw(specs())
    try:
        spec = FeatureSpec.model_validate(doc)
    except ConfigError:
        event("spec rejected")
        return  # e.g. a constant impute_value that log1p cannot take
    train = table_for(draw, doc, draw(st.integers(1, 20)), serving=False)
    try:
        fp = fit(spec, train)
    except (PreprocessingError, SchemaValidationError) as exc:
        event(f"fit rejected: {type(exc).__name__}")
        return  # e.g. an all-null column to take a mean of, or values outside log1p's domain
    dirty = draw(st.sampled_from(["", "", "", "nulls", "nonfinite"]))
    table = table_for(draw, doc, draw(st.integers(0, 12)), serving=True, dirty=dirty)
    records = table.to_pylist()

    batch = outcome(fp.transform, table)
    online = outcome(fp.transform_records, records)
    if isinstance(batch, SchemaValidationError):
        assert isinstance(online, SchemaValidationError), "records accepted what the batch rejected"
        assert error_key(online) == error_key(batch)
        event(f"both rejected: {batch.rule.split(' (')[0]}")
        return
    assert isinstance(online, np.ndarray), f"records rejected what the batch accepted: {online}"
    assert batch.dtype == np.float32 and batch.flags.c_contiguous and batch.shape == (table.num_rows, fp.output_dim)
    assert bits(online) == bits(batch)
    event("both accepted" + (", with NaN/inf" if not np.isfinite(batch).all() else ""))
    for i, record in enumerate(records):  # each record alone is its row of the batch
        assert bits(fp.transform_records([record])) == bits(batch[i : i + 1])
    assert bits(FittedPreprocessor.from_json(fp.to_json()).transform(table)) == bits(batch)
