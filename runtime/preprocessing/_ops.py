"""The transform kernels, compiled once from spec + state and shared by fit and transform.

Features are processed in two blocks, so a call costs a few vectorized operations however
many features there are (that is what keeps one record under 100 µs):

* :class:`FloatBlock` - numeric and passthrough columns as one float64 matrix:
  validate -> impute -> clip -> log1p -> standardize, or bucketize (one-hot).
* :class:`CategoricalBlock` - all categorical columns, looked up with one
  ``pyarrow.compute.index_in`` against the union of their vocabularies.

Every step is elementwise or a table lookup, so a row's output depends only on that row's
values and the fitted state: one record alone and the same record inside a batch give
bit-identical rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from runtime.errors import SchemaValidationError
from runtime.preprocessing._columns import FINITE, NOT_NULL

__all__ = ["CategoricalBlock", "CategoricalColumn", "FloatBlock", "FloatColumn", "checked_values", "validity"]

LOG1P_DOMAIN = "log1p needs a value > -1 after impute and clip"


def validity(arr: pa.Array) -> np.ndarray | None:
    """The validity bitmap as a bool array (True = not null); None when there are no nulls."""
    if not arr.null_count:
        return None
    buf = arr.buffers()[0]
    if buf is None:  # a null-typed array has no bitmap: all null
        return np.zeros(len(arr), dtype=bool)
    bits = np.frombuffer(buf, dtype=np.uint8)
    unpacked = np.unpackbits(bits, count=arr.offset + len(arr), bitorder="little")
    return unpacked[arr.offset :].view(bool)


def _check_nullable(name: str, nullable: bool, valid: np.ndarray | None) -> None:
    if valid is not None and not nullable:
        raise SchemaValidationError(name, int(np.argmin(valid)), None, NOT_NULL)


def checked_values(
    arr: pa.Array, name: str, nullable: bool, allow_nonfinite: bool
) -> tuple[np.ndarray, np.ndarray | None]:
    """One float64 column's values (NaN where null) and validity, after the null/finite rules."""
    valid = validity(arr)
    _check_nullable(name, nullable, valid)
    values: np.ndarray = arr.to_numpy(zero_copy_only=False)
    if not allow_nonfinite and not np.isfinite(values).all():
        bad = ~np.isfinite(values)
        if valid is not None:
            bad &= valid
        if bad.any():
            row = int(np.argmax(bad))
            raise SchemaValidationError(name, row, float(values[row]), FINITE)
    return values, valid


@dataclass(frozen=True, eq=False)
class FloatColumn:
    """A numeric (``passthrough=False``) or passthrough feature with its fitted constants."""

    name: str
    offset: int
    nullable: bool
    allow_nonfinite: bool
    passthrough: bool = False
    fill: float = float("nan")
    lo: float = -np.inf
    hi: float = np.inf
    log1p: bool = False
    mean: float = 0.0
    std: float = 1.0
    boundaries: np.ndarray | None = None

    @property
    def width(self) -> int:
        return 1 if self.boundaries is None else len(self.boundaries) + 1


class FloatBlock:
    """All numeric and passthrough features, processed as one (rows, k) float64 matrix."""

    def __init__(self, columns: list[FloatColumn]) -> None:
        self.columns = columns
        k = len(columns)
        self._lo = np.array([c.lo for c in columns], dtype=np.float64)
        self._hi = np.array([c.hi for c in columns], dtype=np.float64)
        self._clip = bool(np.isfinite(self._lo).any() or np.isfinite(self._hi).any())
        self._mean = np.array([c.mean for c in columns], dtype=np.float64)
        self._std = np.array([c.std for c in columns], dtype=np.float64)
        self._scale = bool((self._mean != 0.0).any() or (self._std != 1.0).any())
        self._log = np.array([j for j, c in enumerate(columns) if c.log1p], dtype=np.intp)
        self._strict = [j for j, c in enumerate(columns) if not c.allow_nonfinite]
        self._all_strict = len(self._strict) == k
        self._strict_idx = np.array(self._strict, dtype=np.intp)
        dense = [j for j, c in enumerate(columns) if c.boundaries is None]
        offsets = [c.offset for c in columns]
        self._dense_all = k > 0 and len(dense) == k and offsets == list(range(offsets[0], offsets[0] + k))
        self._dense_idx = np.array(dense, dtype=np.intp)
        self._dense_out = np.array([columns[j].offset for j in dense], dtype=np.intp)
        self._buckets = [(j, c, c.boundaries) for j, c in enumerate(columns) if c.boundaries is not None]

    def values(self, batch: pa.RecordBatch) -> np.ndarray:
        """validate -> impute -> clip -> log1p: a fresh (rows, k) float64 matrix.

        ``batch`` holds the block's columns, in order, as float64.
        """
        cols = self.columns
        if batch.num_rows == 0:
            return np.zeros((0, len(cols)), dtype=np.float64)
        # one copy of all columns (column-major); nulls read as NaN until imputed below
        matrix: np.ndarray = batch.to_tensor(null_to_nan=True, row_major=False).to_numpy()
        if not matrix.flags.writeable:
            matrix = matrix.copy(order="F")
        if not np.isfinite(matrix).all():  # nulls (read as NaN), NaN or inf somewhere
            self._impute_and_check(batch, matrix)
        if self._clip:
            np.maximum(matrix, self._lo, out=matrix)
            np.minimum(matrix, self._hi, out=matrix)
        if self._log.size:
            part = matrix[:, self._log]
            with np.errstate(invalid="ignore"):
                low = part <= -1
            if low.any():
                for c, j in enumerate(self._log):
                    if low[:, c].any():
                        row = int(np.argmax(low[:, c]))
                        raise SchemaValidationError(cols[j].name, row, batch.column(int(j))[row].as_py(), LOG1P_DOMAIN)
            # arrow's kernel applies the same scalar log1p to every element, whatever the length
            logged = pc.log1p(part.reshape(-1)).to_numpy()
            matrix[:, self._log] = logged.reshape(part.shape)
        return matrix

    def _impute_and_check(self, batch: pa.RecordBatch, matrix: np.ndarray) -> None:
        """Nulls: error where not nullable, else impute; then NaN/inf where not allowed."""
        cols = self.columns
        nulls = []
        for j in np.flatnonzero(np.isnan(matrix).any(axis=0)).tolist():
            valid = validity(batch.column(j))
            if valid is not None:
                _check_nullable(cols[j].name, cols[j].nullable, valid)
                nulls.append((j, valid))
        for j, valid in nulls:  # passthrough: 0 while checking, NaN after
            np.copyto(matrix[:, j], 0.0 if cols[j].passthrough else cols[j].fill, where=~valid)
        if self._strict:
            checked = matrix if self._all_strict else matrix[:, self._strict_idx]
            if not np.isfinite(checked).all():
                for j in self._strict:
                    bad = ~np.isfinite(matrix[:, j])
                    if bad.any():
                        row = int(np.argmax(bad))
                        raise SchemaValidationError(cols[j].name, row, float(matrix[row, j]), FINITE)
        for j, valid in nulls:
            if cols[j].passthrough:
                np.copyto(matrix[:, j], np.nan, where=~valid)

    def write(self, batch: pa.RecordBatch, out: np.ndarray, row_base: np.ndarray) -> None:
        matrix = self.values(batch)
        if self._scale:  # the caller holds np.errstate(over/invalid="ignore")
            matrix -= self._mean
            matrix /= self._std
        if self._dense_all:
            start = self.columns[0].offset
            out[:, start : start + matrix.shape[1]] = matrix
        elif self._dense_idx.size:
            out[:, self._dense_out] = matrix[:, self._dense_idx]
        flat = out.reshape(-1)
        for j, col, boundaries in self._buckets:
            x = matrix[:, j]
            bucket = np.searchsorted(boundaries, x, side="right")
            if col.allow_nonfinite:  # NaN belongs to no bucket: an all-zero row
                keep = ~np.isnan(x)
                flat[row_base[keep] + col.offset + bucket[keep]] = 1.0
            else:
                flat[row_base + col.offset + bucket] = 1.0


@dataclass(frozen=True, eq=False)
class CategoricalColumn:
    name: str
    offset: int
    nullable: bool
    onehot: bool
    vocabulary: tuple[str, ...]  # code i + 1; code 0 is OOV

    @property
    def width(self) -> int:
        return len(self.vocabulary) + 1 if self.onehot else 1


class CategoricalBlock:
    """All categorical features, looked up with one ``index_in`` over their vocabularies' union.

    The input columns are chained (feature-major) into one lookup; union index ``u`` then
    maps to feature ``f``'s code through ``codes[f, u + 1]`` (0 = OOV), a table of
    ``features x (union + 1)`` entries built once.
    """

    def __init__(self, columns: list[CategoricalColumn]) -> None:
        self.columns = columns
        position: dict[str, int] = {}
        for col in columns:
            for value in col.vocabulary:
                position.setdefault(value, len(position))
        self._union = pa.array(list(position), type=pa.string())
        self._lookup = pc.SetLookupOptions(self._union)
        codes = np.zeros((len(columns), len(position) + 1), dtype=np.int32)
        for f, col in enumerate(columns):
            codes[f, [position[v] + 1 for v in col.vocabulary]] = np.arange(1, len(col.vocabulary) + 1)
        offsets = np.array([[col.offset] for col in columns], dtype=np.int32)
        onehot = [f for f, col in enumerate(columns) if col.onehot]
        index = [f for f, col in enumerate(columns) if not col.onehot]
        self._codes = codes
        self._rows = np.arange(len(columns))[:, None]
        # one-hot: the output column of each (feature, union value); index: the code itself
        self._onehot = np.array(onehot, dtype=np.intp)
        self._onehot_targets = (codes + offsets)[onehot]
        self._all_onehot = len(onehot) == len(columns)
        self._index = np.array(index, dtype=np.intp)
        self._index_out = np.array([columns[f].offset for f in index], dtype=np.intp)

    def check(self, arrays: list[pa.Array]) -> None:
        """The only categorical rule: no null where ``nullable: false`` (unseen values are OOV)."""
        for col, arr in zip(self.columns, arrays, strict=True):
            if arr.null_count and not col.nullable:
                _check_nullable(col.name, False, validity(arr))

    def _union_positions(self, arrays: list[pa.Array]) -> np.ndarray:
        """(features, rows) int: union index + 1 of each value, 0 where not in any vocabulary."""
        data = arrays[0] if len(arrays) == 1 else pa.chunked_array(arrays, type=pa.string())
        found = pc.index_in(data, options=self._lookup)
        if isinstance(found, pa.ChunkedArray):
            found = found.chunk(0) if found.num_chunks == 1 else found.combine_chunks()
        raw = np.frombuffer(found.buffers()[1], dtype=np.int32, count=found.offset + len(found))
        shifted = raw[found.offset :] + np.int32(1)
        valid = validity(found)
        if valid is not None:
            shifted[~valid] = 0
        return shifted.reshape(len(self.columns), -1)

    def codes(self, arrays: list[pa.Array]) -> np.ndarray:
        """(features, rows) int32 vocabulary codes; 0 = OOV (unseen, infrequent or null)."""
        self.check(arrays)
        if len(arrays[0]) == 0:
            return np.zeros((len(self.columns), 0), dtype=np.int32)
        result: np.ndarray = self._codes[self._rows, self._union_positions(arrays)]
        return result

    def write(self, arrays: list[pa.Array], out: np.ndarray, row_base: np.ndarray) -> None:
        self.check(arrays)
        positions = self._union_positions(arrays)
        if self._all_onehot:
            out.reshape(-1)[self._onehot_targets[self._rows, positions] + row_base] = 1.0
            return
        if self._onehot.size:
            targets = self._onehot_targets[np.arange(self._onehot.size)[:, None], positions[self._onehot]]
            out.reshape(-1)[targets + row_base] = 1.0
        if self._index.size:
            out[:, self._index_out] = self._codes[self._index[:, None], positions[self._index]].T
