"""Input columns: find and type-check them in tables; build them from records.

Every check raises :class:`~runtime.errors.SchemaValidationError` naming the column, the
first offending row, its value and the rule. Table checks are vectorized; only an error
path looks at single values. (Null and finite rules live with the kernels, in ``_ops``.)
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from runtime.errors import SchemaValidationError

__all__ = [
    "EXACT",
    "EXPECT_NUMBER",
    "EXPECT_STRING",
    "FINITE",
    "MISSING_COLUMN",
    "NOT_NULL",
    "column_of",
    "first_null_row",
    "float_array",
    "is_number",
    "label_kind",
    "records_column",
    "string_array",
]

MISSING_COLUMN = "required column is missing"
NOT_NULL = "must not be null (nullable: false)"
FINITE = "must be finite (allow_nonfinite: false)"
EXPECT_NUMBER = "expected a number (int or float)"
EXPECT_STRING = "expected a string"
EXACT = f"{EXPECT_NUMBER}; an integer must be within ±2**53 to be exact in float64"
_EXACT_LIMIT = 2**53


def column_of(table: pa.Table, name: str) -> pa.Array:
    """The named column as one contiguous array; a missing column is an error."""
    try:
        chunked = table.column(name)
    except KeyError:
        raise SchemaValidationError(name, None, None, MISSING_COLUMN) from None
    if chunked.num_chunks == 1:
        return chunked.chunk(0)
    return chunked.combine_chunks()


def _first_valid(arr: pa.Array) -> tuple[int | None, Any]:
    if arr.null_count == len(arr):
        return None, None
    row = int(pc.index(arr.is_valid(), True).as_py())
    return row, arr[row].as_py()


def first_null_row(arr: pa.Array) -> int:
    return int(pc.index(arr.is_null(), True).as_py())


def float_array(arr: pa.Array, name: str) -> pa.Array:
    """The column as float64: integers and floats are cast; other types are an error."""
    t = arr.type
    if t == pa.float64():
        return arr
    if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_null(t) or pa.types.is_decimal(t):
        try:
            return arr.cast(pa.float64())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            for row, value in enumerate(arr.to_pylist()):
                if isinstance(value, int) and abs(value) > _EXACT_LIMIT:
                    raise SchemaValidationError(name, row, value, EXACT) from None
            raise SchemaValidationError(name, None, None, f"cannot be read as float64: {exc}") from None
    if arr.null_count == len(arr):  # an all-null column of another type carries no values
        return pa.nulls(len(arr), pa.float64())
    first, value = _first_valid(arr)
    raise SchemaValidationError(name, first, value, f"{EXPECT_NUMBER}, got a column of type {t}")


def string_array(arr: pa.Array, name: str) -> pa.Array:
    """The column as utf8 strings: string / large_string / dictionary-of-string; else an error."""
    t = arr.type
    if t == pa.string():
        return arr
    if pa.types.is_dictionary(t):
        t = t.value_type
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return arr.cast(pa.string())
    if arr.null_count == len(arr):
        return pa.nulls(len(arr), pa.string())
    first, value = _first_valid(arr)
    raise SchemaValidationError(name, first, value, f"{EXPECT_STRING}, got a column of type {t}")


# --------------------------------------------------------------------------- labels


def label_kind(t: pa.DataType) -> str | None:
    """The JSON kind of a label type: 'string', 'int', 'float' or 'bool' (None: unsupported)."""
    if pa.types.is_dictionary(t):
        t = t.value_type
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return "string"
    if pa.types.is_boolean(t):
        return "bool"
    if pa.types.is_integer(t):
        return "int"
    if pa.types.is_floating(t):
        return "float"
    return None


# --------------------------------------------------------------------------- records


def is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _bad_value(kind: str, value: Any) -> bool:
    if value is None:
        return False
    if kind == "string":
        return not isinstance(value, str)
    return not is_number(value)


_FAST_OK = {"string": (str, type(None)), "number": (float, int, type(None))}


def records_column(records: Sequence[Mapping[str, Any]], name: str, kind: str, arrow_type: pa.DataType) -> pa.Array:
    """One column of a list of records as an arrow array of ``arrow_type``.

    ``kind`` is 'number' (ints and floats; bools and strings are errors) or 'string'
    (strings only). A record without the key is an error: send null for a missing value.
    """
    try:
        values = [r[name] for r in records]
    except KeyError:
        row = next(i for i, r in enumerate(records) if name not in r)
        raise SchemaValidationError(name, row, None, "required field is missing (send null for no value)") from None
    except TypeError:
        row = next(i for i, r in enumerate(records) if not isinstance(r, Mapping))
        raise SchemaValidationError(name, row, records[row], "each record must be a JSON object") from None
    ok = _FAST_OK[kind]
    for row, value in enumerate(values):
        if type(value) not in ok and _bad_value(kind, value):
            rule = EXPECT_STRING if kind == "string" else EXPECT_NUMBER
            raise SchemaValidationError(name, row, value, f"{rule}, got {type(value).__name__}")
    try:
        return pa.array(values, type=arrow_type)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
        for row, value in enumerate(values):
            try:
                pa.array([value], type=arrow_type)
            except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as exc:
                rule = EXACT if isinstance(value, numbers.Integral) else f"cannot be read as {arrow_type}: {exc}"
                raise SchemaValidationError(name, row, value, rule) from None
        raise
