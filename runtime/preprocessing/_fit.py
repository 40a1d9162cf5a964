"""Fitting: compute the state (impute values, mean/std, vocabularies, classes) as plain JSON.

Statistics are computed on the same values transform produces, through the same functions:
the impute statistic on the raw non-null finite values; mean/std on the
imputed + clipped + log1p'd finite values (population std, 0 -> 1).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from runtime.errors import PreprocessingError, SchemaValidationError
from runtime.preprocessing._columns import NOT_NULL, column_of, float_array, label_kind, string_array
from runtime.preprocessing._ops import FloatBlock, FloatColumn, checked_values, validity
from runtime.preprocessing._spec import (
    CategoricalFeature,
    FeatureSpec,
    LabelSpec,
    NumericFeature,
)
from runtime.preprocessing._transform import FittedPreprocessor
from runtime.tasks import task_for

__all__ = ["fit"]

STATE_VERSION = 1


def fit(spec: FeatureSpec, table: pa.Table) -> FittedPreprocessor:
    """Fit ``spec`` on ``table`` (features and, if the spec has one, the label column)."""
    if not isinstance(spec, FeatureSpec):
        raise PreprocessingError(f"fit() needs a FeatureSpec, got {type(spec).__name__}; use load_spec(path)")
    if not isinstance(table, pa.Table):
        raise PreprocessingError(f"fit() needs a pyarrow.Table, got {type(table).__name__}")
    if table.num_rows == 0:
        raise PreprocessingError("cannot fit a feature spec on a table with no rows")
    features: dict[str, dict[str, Any]] = {}
    numeric: list[tuple[NumericFeature, pa.Array]] = []
    for feature in spec.features:
        arr = column_of(table, feature.name)
        if isinstance(feature, CategoricalFeature):
            features[feature.name] = _fit_categorical(feature, string_array(arr, feature.name))
            continue
        arr = float_array(arr, feature.name)
        values, valid = checked_values(arr, feature.name, feature.nullable, feature.allow_nonfinite)
        if isinstance(feature, NumericFeature):
            features[feature.name] = {"impute_value": _impute_value(feature, values, valid)}
            if feature.standardize and feature.bucketize is None:
                numeric.append((feature, arr))
        else:
            features[feature.name] = {}
    if numeric:
        _fit_standardize(numeric, features)
    label = None if spec.label is None else _fit_label(spec.label, column_of(table, spec.label.name))
    state = {"version": STATE_VERSION, "n_rows": table.num_rows, "features": features, "label": label}
    return FittedPreprocessor(spec, state)


def _impute_value(feature: NumericFeature, values: np.ndarray, valid: np.ndarray | None) -> float:
    if feature.impute_value is not None:  # impute: constant
        return feature.impute_value
    raw = values if valid is None else values[valid]
    finite = raw[np.isfinite(raw)]
    if finite.size == 0:
        raise PreprocessingError(
            f"column {feature.name!r} has no non-null finite value in the fit table, so impute: "
            f"{feature.impute} cannot be computed; use impute: constant with an impute_value"
        )
    with np.errstate(over="ignore", invalid="ignore"):
        result = float(np.mean(finite) if feature.impute == "mean" else np.median(finite))
    if not math.isfinite(result):
        raise PreprocessingError(f"column {feature.name!r}: the {feature.impute} of the fit values overflows float64")
    return result


def _fit_standardize(numeric: list[tuple[NumericFeature, pa.Array]], features: dict[str, dict[str, Any]]) -> None:
    """mean/std of the imputed, clipped and log1p'd values, computed by transform's own block."""
    columns = []
    for j, (f, _) in enumerate(numeric):
        lo, hi = f.clip if f.clip is not None else (None, None)
        columns.append(
            FloatColumn(
                f.name,
                j,
                f.nullable,
                f.allow_nonfinite,
                fill=features[f.name]["impute_value"],
                lo=-np.inf if lo is None else lo,
                hi=np.inf if hi is None else hi,
                log1p=f.log1p,
            )
        )
    batch = pa.RecordBatch.from_arrays([arr for _, arr in numeric], names=[f.name for f, _ in numeric])
    matrix = FloatBlock(columns).values(batch)
    for j, (feature, _) in enumerate(numeric):
        x = matrix[:, j]
        x = x[np.isfinite(x)]
        with np.errstate(over="ignore", invalid="ignore"):
            mean, std = (float(np.mean(x)), float(np.std(x))) if x.size else (0.0, 1.0)
        if not (math.isfinite(mean) and math.isfinite(std)):
            raise PreprocessingError(
                f"column {feature.name!r}: mean/std of the fit values overflow float64; "
                "clip or log1p the column, or set standardize: false"
            )
        features[feature.name]["mean"] = mean
        features[feature.name]["std"] = std if std > 0.0 else 1.0


def _fit_categorical(feature: CategoricalFeature, arr: pa.Array) -> dict[str, Any]:
    valid = validity(arr)
    if valid is not None and not feature.nullable:
        raise SchemaValidationError(feature.name, int(np.argmin(valid)), None, NOT_NULL)
    counted = pc.value_counts(arr.drop_null()) if arr.null_count else pc.value_counts(arr)
    ranked = pa.table({"value": counted.field("values"), "count": counted.field("counts")})
    ranked = ranked.filter(pc.greater_equal(ranked["count"], feature.min_frequency))
    ranked = ranked.sort_by([("count", "descending"), ("value", "ascending")])
    if feature.max_categories is not None:
        ranked = ranked.slice(0, feature.max_categories)
    return {"vocabulary": ranked["value"].to_pylist()}


def _fit_label(label: LabelSpec, arr: pa.Array) -> dict[str, Any]:
    task = task_for(label.task)
    if not task.classification:
        float_array(arr, label.name)  # a numeric column; its values are checked by transform_label
        return {"kind": "float", "classes": None}
    kind = label_kind(arr.type)
    if kind is None:
        if arr.null_count == len(arr):
            raise PreprocessingError(f"label column {label.name!r} has no non-null value to learn classes from")
        row = int(pc.index(arr.is_valid(), True).as_py())
        raise SchemaValidationError(
            label.name, row, arr[row].as_py(), f"a {label.task} label must be a string, integer, float or bool"
        )
    if pa.types.is_dictionary(arr.type):
        arr = arr.cast(arr.type.value_type)
    uniques = pc.unique(arr.drop_null())
    uniques = uniques.take(pc.array_sort_indices(uniques))
    classes = uniques.to_pylist()
    if kind == "float":
        values = arr.cast(pa.float64()).to_numpy(zero_copy_only=False)
        bad = ~np.isfinite(values)
        valid = validity(arr)
        if valid is not None:
            bad &= valid
        if bad.any():
            row = int(np.argmax(bad))
            raise SchemaValidationError(label.name, row, float(values[row]), "a class label must be finite")
    if not classes:
        raise PreprocessingError(f"label column {label.name!r} has no non-null value to learn classes from")
    if task.max_classes is not None and len(classes) > task.max_classes:
        shown = classes[:10]
        raise PreprocessingError(
            f"label {label.name!r} has task {task.name} but {len(classes)} classes in the fit table "
            f"(first {shown}); use task: multiclass"
        )
    return {"kind": kind, "classes": classes}
