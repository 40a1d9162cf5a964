"""The fitted preprocessor: one transform for batches (arrow tables) and requests (records).

``transform_records`` only converts records into an arrow table with the spec's input
schema (:meth:`FittedPreprocessor.records_to_table`) and calls :meth:`transform`: there is
no second implementation of any feature, so online and batch outputs are bit-identical.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from runtime.errors import ConfigError, PreprocessingError, SchemaValidationError
from runtime.preprocessing._columns import (
    NOT_NULL,
    column_of,
    first_null_row,
    float_array,
    is_number,
    label_kind,
    records_column,
    string_array,
)
from runtime.preprocessing._fingerprint import (
    canonical_json,
    code_fingerprint,
    part_fingerprints,
    preprocessor_fingerprint,
)
from runtime.preprocessing._ops import checked_values
from runtime.preprocessing._plan import Plan
from runtime.preprocessing._spec import FeatureSpec
from runtime.tasks import task_for

__all__ = ["FittedPreprocessor"]

FORMAT = "skewless.preprocessing"
FORMAT_VERSION = 1
_NO_ROWS = np.zeros(0, dtype=np.int64)
_F64 = pa.float64()
_STR = pa.string()
_NUMBER_TYPES = frozenset({float, int, type(None)})
_STRING_TYPES = frozenset({str, type(None)})


def _one_batch(table: pa.Table) -> pa.RecordBatch:
    batches = table.to_batches()
    if len(batches) == 1:
        return batches[0]
    if not batches:
        return pa.RecordBatch.from_arrays([pa.array([], type=f.type) for f in table.schema], schema=table.schema)
    return table.combine_chunks().to_batches()[0]


def _require_table(table: Any) -> pa.Table:
    if not isinstance(table, pa.Table):
        raise PreprocessingError(f"expected a pyarrow.Table, got {type(table).__name__}")
    return table


class _SlowPath(Exception):
    """A record needs the column-by-column conversion (which finds the error)."""


_LABEL_TYPES = {"string": pa.string(), "int": pa.int64(), "float": pa.float64(), "bool": pa.bool_()}


class FittedPreprocessor:
    """A feature spec plus its fitted state. Build it with :func:`fit` or :meth:`from_json`."""

    def __init__(self, spec: FeatureSpec, state: Mapping[str, Any], code_fingerprint: str | None = None) -> None:
        try:
            self._state_json = canonical_json(state)
        except (TypeError, ValueError) as exc:
            raise PreprocessingError(f"fitted state is not plain JSON: {exc}") from None
        self._spec = spec
        self._spec_dict = spec.model_dump(mode="json")
        self._code_fingerprint = code_fingerprint if code_fingerprint is not None else _installed_code()
        plain = json.loads(self._state_json)
        if (
            not isinstance(plain, dict)
            or not isinstance(plain.get("features"), dict)
            or not isinstance(plain.get("label"), (dict, type(None)))
        ):
            raise PreprocessingError(
                "fitted state must be an object with 'features' (object) and 'label' (object or null)"
            )
        self._plan = Plan(spec, plain)
        self._feature_names = self._plan.feature_names
        self._output_dim = self._plan.output_dim
        self._schema = self._plan.schema
        label = plain.get("label")
        self._classes: list[Any] | None = None if label is None else label.get("classes")
        self._label_kind: str | None = None if label is None else label.get("kind")
        self._classes_arr = None
        if self._classes is not None and self._label_kind in _LABEL_TYPES:
            self._classes_arr = pa.array(self._classes, type=_LABEL_TYPES[self._label_kind])
        self._fingerprint = preprocessor_fingerprint(self._code_fingerprint, self._spec_dict, plain)

    # ------------------------------------------------------------------ properties

    @property
    def spec(self) -> FeatureSpec:
        return self._spec

    @property
    def state(self) -> dict[str, Any]:
        """The fitted state as plain JSON types (a fresh copy)."""
        result: dict[str, Any] = json.loads(self._state_json)
        return result

    @property
    def feature_names(self) -> list[str]:
        return list(self._feature_names)

    @property
    def output_dim(self) -> int:
        return self._output_dim

    @property
    def input_schema(self) -> pa.Schema:
        return self._schema

    @property
    def classes(self) -> list[Any] | None:
        return None if self._classes is None else list(self._classes)

    @property
    def fingerprint(self) -> str:
        """sha256 over the code fingerprint recorded at fit, the spec and the state."""
        return self._fingerprint

    @property
    def code_fingerprint(self) -> str:
        """The preprocessing code fingerprint recorded when this was fit."""
        return self._code_fingerprint

    @property
    def fingerprints(self) -> dict[str, str]:
        """The parts reported separately: the code's (as recorded), the spec's and the state's."""
        parts = part_fingerprints(self._spec_dict, json.loads(self._state_json))
        return {"preprocessing_code": self._code_fingerprint, **parts}

    def __repr__(self) -> str:
        return (
            f"FittedPreprocessor(features={len(self._spec.features)}, output_dim={self._output_dim}, "
            f"fingerprint={self._fingerprint[:12]})"
        )

    # ------------------------------------------------------------------ transform

    def _columns(self, table: pa.Table) -> tuple[pa.RecordBatch, list[pa.Array]]:
        """The float columns as one record batch and the string columns, type- and null-checked."""
        _require_table(table)
        if table.schema.equals(self._schema):  # e.g. from records_to_table: the types are known
            batch = _one_batch(table)
            for j in self._plan.not_nullable:
                if batch.column(j).null_count:
                    self._raise_null(j, batch.column(j))
            return batch.select(self._plan.float_positions), [batch.column(j) for j in self._plan.string_positions]
        columns = [
            (float_array if kind == "number" else string_array)(column_of(table, name), name)
            for name, kind, _ in self._plan.inputs  # spec order: the first bad column is named
        ]
        for j in self._plan.not_nullable:
            if columns[j].null_count:
                self._raise_null(j, columns[j])
        floats = pa.RecordBatch.from_arrays(
            [columns[j] for j in self._plan.float_positions], schema=self._plan.float_schema
        )
        return floats, [columns[j] for j in self._plan.string_positions]

    def _raise_null(self, position: int, column: pa.Array) -> None:
        raise SchemaValidationError(self._plan.inputs[position][0], first_null_row(column), None, NOT_NULL)

    def validate(self, table: pa.Table) -> None:
        """Raise :class:`SchemaValidationError` if ``table`` breaks the spec; else None.

        The checks run in this order, each over the features in spec order: every column is
        present with a usable type; no null where ``nullable: false``; then the numeric and
        passthrough values (NaN/inf, the log1p domain). Extra columns are ignored.
        """
        floats, strings = self._columns(table)
        if self._plan.floats is not None:
            self._plan.floats.values(floats)
        if self._plan.categoricals is not None:
            self._plan.categoricals.check(strings)

    def transform(self, table: pa.Table) -> np.ndarray:
        """Features as a C-contiguous float32 matrix of shape (rows, output_dim)."""
        floats, strings = self._columns(table)
        n = table.num_rows
        out = np.zeros((n, self._output_dim), dtype=np.float32)
        if n == 0:
            self.validate(table)
            return out
        d = self._output_dim
        row_base = np.arange(0, n * d, d, dtype=np.int64) if self._plan.scatter else _NO_ROWS
        with np.errstate(over="ignore", invalid="ignore"):  # inf/NaN the spec allows stay inf/NaN
            if self._plan.floats is not None:
                self._plan.floats.write(floats, out, row_base)
            if self._plan.categoricals is not None:
                self._plan.categoricals.write(strings, out, row_base)
        return out

    def records_to_table(self, records: Sequence[Mapping[str, Any]]) -> pa.Table:
        """Records (JSON objects) as an arrow table with :attr:`input_schema`; extra keys ignored.

        Numbers (ints and floats) for numeric and passthrough features, strings for
        categorical ones, null for a missing value; anything else (a bool, a numeric string,
        an absent key) is a :class:`SchemaValidationError` naming the column and the row.
        """
        if isinstance(records, (Mapping, str, bytes)) or not isinstance(records, Sequence):
            raise PreprocessingError(f"records must be a list of objects, got {type(records).__name__}")
        n = len(records)
        plan = self._plan
        try:
            # one arrow conversion per kind, column-major, then a zero-copy slice per column
            numbers = [r[name] for name in plan.float_names for r in records]
            strings = [r[name] for name in plan.string_names for r in records]
            for v in numbers:
                if type(v) not in _NUMBER_TYPES and not is_number(v):
                    raise _SlowPath
            for v in strings:
                if type(v) not in _STRING_TYPES and not isinstance(v, str):
                    raise _SlowPath
            number_arr = pa.array(numbers, type=_F64)
            string_arr = pa.array(strings, type=_STR)
        except (_SlowPath, KeyError, TypeError, pa.ArrowException, OverflowError):
            return self._records_to_table_checked(records)
        arrays = [(number_arr if kind else string_arr).slice(i * n, n) for kind, i in self._plan.layout]
        # nulls where the spec forbids them are left for transform to report, like in a batch
        return pa.Table.from_batches([pa.RecordBatch.from_arrays(arrays, schema=self._schema)])

    def _records_to_table_checked(self, records: Sequence[Mapping[str, Any]]) -> pa.Table:
        """Column by column in spec order, so the error names the first bad column and row."""
        arrays = [records_column(records, name, kind, arrow_type) for name, kind, arrow_type in self._plan.inputs]
        return pa.Table.from_arrays(arrays, schema=self._schema)

    def transform_records(self, records: Sequence[Mapping[str, Any]]) -> np.ndarray:
        """``transform(records_to_table(records))``: the same code path as batches."""
        return self.transform(self.records_to_table(records))

    def transform_label(self, table: pa.Table) -> np.ndarray:
        """Class indices (int64) for binary/multiclass, float32 values for regression."""
        label = self._spec.label
        if label is None:
            raise PreprocessingError("the feature spec has no label; add `label: {name: ..., task: ...}`")
        arr = column_of(_require_table(table), label.name)
        if arr.null_count:
            raise SchemaValidationError(label.name, first_null_row(arr), None, "a label must not be null")
        if not task_for(label.task).classification:
            values, _ = checked_values(float_array(arr, label.name), label.name, False, False)
            return values.astype(np.float32)
        kind = label_kind(arr.type)
        if kind != self._label_kind or self._classes_arr is None:
            value = arr[0].as_py() if len(arr) else None
            raise SchemaValidationError(
                label.name,
                0 if len(arr) else None,
                value,
                f"expected {self._label_kind} labels as in the fit table, got a column of type {arr.type}",
            )
        try:
            arr = arr.cast(self._classes_arr.type)
        except pa.ArrowInvalid as exc:
            raise SchemaValidationError(label.name, None, None, f"label values do not fit: {exc}") from None
        found = pc.index_in(arr, value_set=self._classes_arr)
        if found.null_count:
            row = first_null_row(found)
            shown = self._classes if len(self._classes or ()) <= 20 else [*(self._classes or [])[:20], "..."]
            raise SchemaValidationError(
                label.name, row, arr[row].as_py(), f"unknown class; the classes seen at fit are {shown}"
            )
        return found.to_numpy(zero_copy_only=False).astype(np.int64)

    # ------------------------------------------------------------------ persistence

    def to_json(self) -> str:
        """Spec, state and fingerprints as JSON; :meth:`from_json` restores it exactly."""
        return json.dumps(
            {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "code_fingerprint": self._code_fingerprint,
                "fingerprint": self._fingerprint,
                "spec": self._spec_dict,
                "state": json.loads(self._state_json),
            },
            allow_nan=False,
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> FittedPreprocessor:
        """Load :meth:`to_json` output; the stored fingerprint must match the content.

        The recorded code fingerprint is kept, not compared: a loader compares
        :attr:`code_fingerprint` with :func:`code_fingerprint` and decides.
        """
        try:
            doc = json.loads(text)
        except (ValueError, TypeError) as exc:
            raise PreprocessingError(f"fitted preprocessor is not valid JSON: {exc}") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise PreprocessingError(f"not a fitted preprocessor: the 'format' field is not {FORMAT!r}")
        if doc.get("format_version") != FORMAT_VERSION:
            raise PreprocessingError(
                f"fitted preprocessor format_version {doc.get('format_version')!r} is not supported "
                f"(this code reads {FORMAT_VERSION}); install the skewless version that wrote it"
            )
        try:
            spec = FeatureSpec.model_validate(doc["spec"])
            result = cls(spec, doc["state"], str(doc["code_fingerprint"]))
        except KeyError as exc:
            raise PreprocessingError(f"fitted preprocessor JSON lacks the {exc} field") from None
        except ConfigError as exc:
            raise PreprocessingError(f"fitted preprocessor has an invalid spec: {exc}") from None
        if doc.get("fingerprint") != result.fingerprint:
            raise PreprocessingError(
                f"fitted preprocessor fingerprint {str(doc.get('fingerprint'))[:16]} does not match its "
                f"content ({result.fingerprint[:16]}): the JSON was edited or corrupted"
            )
        return result


def _installed_code() -> str:
    return code_fingerprint()
