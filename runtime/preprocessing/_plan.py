"""Compiling a spec and its fitted state into the transform's blocks and layouts (once)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa

from runtime.errors import PreprocessingError
from runtime.preprocessing._ops import CategoricalBlock, CategoricalColumn, FloatBlock, FloatColumn
from runtime.preprocessing._spec import CategoricalFeature, Feature, FeatureSpec, NumericFeature

__all__ = ["Plan", "input_schema_of"]


def _arrow_type(feature: Feature) -> pa.DataType:
    return pa.string() if isinstance(feature, CategoricalFeature) else pa.float64()


def input_schema_of(spec: FeatureSpec) -> pa.Schema:
    """numeric / passthrough -> float64, categorical -> string; nullable as declared."""
    return pa.schema([pa.field(f.name, _arrow_type(f), nullable=f.nullable) for f in spec.features])


class Plan:
    """The compiled transform: the two blocks, the output layout and the input layout."""

    def __init__(self, spec: FeatureSpec, state: Mapping[str, Any]) -> None:
        floats: list[FloatColumn] = []
        cats: list[CategoricalColumn] = []
        names: list[str] = []
        offset = 0
        for feature in spec.features:
            try:
                col = _column(feature, state["features"][feature.name], offset)
            except (KeyError, TypeError, ValueError) as exc:
                raise PreprocessingError(
                    f"fitted state does not match the spec at feature {feature.name!r}: {exc!r}"
                ) from None
            if isinstance(col, CategoricalColumn):
                cats.append(col)
                names.extend(
                    [f"{col.name}=<oov>", *(f"{col.name}={v}" for v in col.vocabulary)] if col.onehot else [col.name]
                )
            else:
                floats.append(col)
                names.extend(
                    [col.name] if col.boundaries is None else [f"{col.name}_bucket_{i}" for i in range(col.width)]
                )
            offset += col.width
        self.floats = FloatBlock(floats) if floats else None
        self.categoricals = CategoricalBlock(cats) if cats else None
        self.float_names = [c.name for c in floats]
        self.string_names = [c.name for c in cats]
        self.feature_names = names
        self.output_dim = offset
        self.scatter = bool(any(c.boundaries is not None for c in floats) or any(c.onehot for c in cats))
        # the input side, in spec order: (name, "number" | "string", arrow type)
        self.schema = input_schema_of(spec)
        self.inputs = [
            (f.name, "string" if isinstance(f, CategoricalFeature) else "number", _arrow_type(f)) for f in spec.features
        ]
        self.float_positions = [j for j, (_, kind, _) in enumerate(self.inputs) if kind == "number"]
        self.string_positions = [j for j, (_, kind, _) in enumerate(self.inputs) if kind == "string"]
        self.not_nullable = [j for j, f in enumerate(spec.features) if not f.nullable]
        self.float_schema = pa.schema([self.schema.field(j) for j in self.float_positions])
        # records_to_table: feature j is slice layout[j][1] of the numbers (True) or strings array
        self.layout = [
            (kind == "number", (self.float_positions if kind == "number" else self.string_positions).index(j))
            for j, (_, kind, _) in enumerate(self.inputs)
        ]


def _column(feature: Feature, fs: Mapping[str, Any], offset: int) -> FloatColumn | CategoricalColumn:
    if isinstance(feature, CategoricalFeature):
        vocabulary = tuple(fs["vocabulary"])
        if not all(isinstance(v, str) for v in vocabulary):
            raise ValueError("vocabulary entries must be strings")
        return CategoricalColumn(feature.name, offset, feature.nullable, feature.encoding == "onehot", vocabulary)
    if isinstance(feature, NumericFeature):
        lo, hi = feature.clip if feature.clip is not None else (None, None)
        bounds = None if feature.bucketize is None else np.asarray(feature.bucketize, dtype=np.float64)
        scaled = feature.standardize and bounds is None
        return FloatColumn(
            feature.name,
            offset,
            feature.nullable,
            feature.allow_nonfinite,
            fill=float(fs["impute_value"]),
            lo=-np.inf if lo is None else lo,
            hi=np.inf if hi is None else hi,
            log1p=feature.log1p,
            mean=float(fs["mean"]) if scaled else 0.0,
            std=float(fs["std"]) if scaled else 1.0,
            boundaries=bounds,
        )
    return FloatColumn(feature.name, offset, feature.nullable, feature.allow_nonfinite, passthrough=True)
