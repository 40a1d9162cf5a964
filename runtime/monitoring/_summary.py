"""Per-feature summaries: counts over fixed bins or a vocabulary, and mergeable moments.

A :class:`NumericSummary` counts values into bins fixed by the reference's quantiles (the
outer bins run to -inf and +inf) and keeps moments that merge exactly up to float rounding:
count, mean and M2 (Chan's parallel formula), the sum of absolute values, the sums of the two
unbounded outer bins, min and max. A :class:`CategoricalSummary` counts the values of a fixed
vocabulary plus one out-of-vocabulary bucket. The reference and a live window use the same
classes; the reference just fixes the bins and the vocabulary.

Missing means null, NaN or ±inf for a numeric feature and null for a categorical one.
Categorical values are compared as strings (``pyarrow`` casts ints, bools and dictionaries).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeAlias

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from runtime.errors import DataError

OOV_EXAMPLES = 10  # out-of-vocabulary values kept by name (for messages, never for statistics)

Column: TypeAlias = "pa.ChunkedArray | pa.Array"


@dataclass(frozen=True)
class NumericSummary:
    """One numeric feature over fixed bins, plus mergeable moments: ``counts[0]`` holds the
    values below ``edges[0]``, ``counts[i]`` those in ``[edges[i-1], edges[i])`` and
    ``counts[-1]`` those at or above ``edges[-1]``."""

    kind: ClassVar[str] = "numeric"

    edges: tuple[float, ...]
    counts: tuple[int, ...]
    count: int  # finite values
    missing: int
    mean: float
    m2: float  # sum of squared deviations from the mean
    abs_total: float
    tail_sums: tuple[float, float]  # sums of the values in the lowest and the highest bin
    minimum: float | None
    maximum: float | None

    @classmethod
    def of(cls, column: Column | None, edges: Sequence[float], *, rows: int, name: str) -> NumericSummary:
        values, missing = _finite(column, rows, name)
        edge_array = np.asarray(edges, dtype=np.float64)
        bins = np.searchsorted(edge_array, values, side="right")
        counts = np.bincount(bins, minlength=edge_array.size + 1)
        mean = float(values.mean()) if values.size else 0.0
        return cls(
            edges=tuple(float(e) for e in edge_array),
            counts=tuple(int(c) for c in counts),
            count=int(values.size),
            missing=missing,
            mean=mean,
            m2=float(((values - mean) ** 2).sum()),
            abs_total=float(np.abs(values).sum()),
            tail_sums=(float(values[bins == 0].sum()), float(values[bins == edge_array.size].sum())),
            minimum=float(values.min()) if values.size else None,
            maximum=float(values.max()) if values.size else None,
        )

    @classmethod
    def fit(cls, column: Column, *, bins: int, name: str) -> NumericSummary:
        """The reference: interior edges at the ``bins``-quantiles, deduplicated (ties collapse)."""
        values, _ = _finite(column, len(column), name)
        quantiles = np.linspace(0.0, 1.0, bins + 1)[1:-1]
        edges = np.unique(np.quantile(values, quantiles)) if values.size else np.empty(0)
        return cls.of(column, edges.tolist(), rows=len(column), name=name)

    @property
    def std(self) -> float:
        """Population standard deviation (ddof=0, as Evidently normalises Wasserstein)."""
        return math.sqrt(self.m2 / self.count) if self.count else math.nan

    @property
    def tail_means(self) -> tuple[float, float]:
        """Mean of the lowest and of the highest bin (the bin's edge when it is empty)."""
        low, high = self.counts[0], self.counts[-1]
        first, last = (self.edges[0], self.edges[-1]) if self.edges else (self.mean, self.mean)
        return (self.tail_sums[0] / low if low else first, self.tail_sums[1] / high if high else last)

    @property
    def mean_abs(self) -> float:
        return self.abs_total / self.count if self.count else math.nan

    @property
    def missing_rate(self) -> float:
        total = self.count + self.missing
        return self.missing / total if total else 0.0

    def merge(self, other: NumericSummary) -> NumericSummary:
        if other.edges != self.edges:
            raise DataError("cannot merge numeric summaries over different bins; summarise both with one profile")
        n = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * other.count / n if n else 0.0
        m2 = self.m2 + other.m2 + (delta**2 * self.count * other.count / n if n else 0.0)
        return NumericSummary(
            edges=self.edges,
            counts=tuple(a + b for a, b in zip(self.counts, other.counts, strict=True)),
            count=n,
            missing=self.missing + other.missing,
            mean=mean,
            m2=m2,
            abs_total=self.abs_total + other.abs_total,
            tail_sums=(self.tail_sums[0] + other.tail_sums[0], self.tail_sums[1] + other.tail_sums[1]),
            minimum=_pick(min, self.minimum, other.minimum),
            maximum=_pick(max, self.maximum, other.maximum),
        )

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind} | {f: _jsonable(getattr(self, f)) for f in self.__dataclass_fields__}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> NumericSummary:
        return cls(
            edges=tuple(float(e) for e in data["edges"]),
            counts=tuple(int(c) for c in data["counts"]),
            count=int(data["count"]),
            missing=int(data["missing"]),
            mean=float(data["mean"]),
            m2=float(data["m2"]),
            abs_total=float(data["abs_total"]),
            tail_sums=(float(data["tail_sums"][0]), float(data["tail_sums"][1])),
            minimum=None if data["minimum"] is None else float(data["minimum"]),
            maximum=None if data["maximum"] is None else float(data["maximum"]),
        )


@dataclass(frozen=True)
class CategoricalSummary:
    """One categorical feature: counts per vocabulary value, the out-of-vocabulary count and
    the most frequent out-of-vocabulary values by name (examples for messages; after a merge
    they are the top of the merged examples, not an exact top-k)."""

    kind: ClassVar[str] = "categorical"

    vocabulary: tuple[str, ...]
    counts: tuple[int, ...]
    oov: int
    missing: int
    oov_examples: tuple[tuple[str, int], ...] = field(default=())

    @classmethod
    def of(cls, column: Column | None, vocabulary: Sequence[str], *, rows: int, name: str) -> CategoricalSummary:
        if column is None:
            return cls(tuple(vocabulary), (0,) * len(vocabulary), 0, rows)
        strings = _strings(column, name)
        found = pc.index_in(strings, value_set=pa.array(vocabulary, pa.string()))  # null: OOV or missing
        counts = np.bincount(
            np.asarray(pc.fill_null(found, len(vocabulary)), dtype=np.int64), minlength=len(vocabulary) + 1
        )
        missing = strings.null_count
        oov = int(counts[-1]) - missing
        examples: tuple[tuple[str, int], ...] = ()
        if oov:
            examples = _top(pc.filter(strings, pc.and_(pc.is_null(found), pc.is_valid(strings))), OOV_EXAMPLES)
        return cls(tuple(vocabulary), tuple(int(c) for c in counts[:-1]), oov, missing, examples)

    @classmethod
    def fit(cls, column: Column, *, max_categories: int, name: str) -> CategoricalSummary:
        """The reference: the ``max_categories`` most frequent values (ties broken by value)."""
        ranked = _top(_strings(column, name), None)
        return cls.of(column, [value for value, _ in ranked[:max_categories]], rows=len(column), name=name)

    @property
    def count(self) -> int:
        """Non-missing values, in or out of the vocabulary."""
        return sum(self.counts) + self.oov

    @property
    def missing_rate(self) -> float:
        total = self.count + self.missing
        return self.missing / total if total else 0.0

    @property
    def oov_share(self) -> float:
        return self.oov / self.count if self.count else 0.0

    def frequencies(self) -> dict[str, float]:
        """Share of each vocabulary value among the non-missing values."""
        return {v: c / self.count if self.count else 0.0 for v, c in zip(self.vocabulary, self.counts, strict=True)}

    def merge(self, other: CategoricalSummary) -> CategoricalSummary:
        if other.vocabulary != self.vocabulary:
            raise DataError(
                "cannot merge categorical summaries over different vocabularies; summarise both with one profile"
            )
        examples: dict[str, int] = dict(self.oov_examples)
        for value, n in other.oov_examples:
            examples[value] = examples.get(value, 0) + n
        return CategoricalSummary(
            vocabulary=self.vocabulary,
            counts=tuple(a + b for a, b in zip(self.counts, other.counts, strict=True)),
            oov=self.oov + other.oov,
            missing=self.missing + other.missing,
            oov_examples=tuple(sorted(examples.items(), key=lambda kv: (-kv[1], kv[0]))[:OOV_EXAMPLES]),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "vocabulary": list(self.vocabulary),
            "counts": list(self.counts),
            "oov": self.oov,
            "missing": self.missing,
            "oov_examples": [[v, n] for v, n in self.oov_examples],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CategoricalSummary:
        return cls(
            vocabulary=tuple(str(v) for v in data["vocabulary"]),
            counts=tuple(int(c) for c in data["counts"]),
            oov=int(data["oov"]),
            missing=int(data["missing"]),
            oov_examples=tuple((str(v), int(n)) for v, n in data.get("oov_examples", ())),
        )


Summary = NumericSummary | CategoricalSummary
_KINDS: dict[str, type[NumericSummary] | type[CategoricalSummary]] = {
    NumericSummary.kind: NumericSummary,
    CategoricalSummary.kind: CategoricalSummary,
}


def summarise(reference: Summary, column: Column | None, rows: int, name: str) -> Summary:
    if isinstance(reference, NumericSummary):
        return NumericSummary.of(column, reference.edges, rows=rows, name=name)
    return CategoricalSummary.of(column, reference.vocabulary, rows=rows, name=name)


def merge_summaries(a: Summary, b: Summary) -> Summary:
    if isinstance(a, NumericSummary) and isinstance(b, NumericSummary):
        return a.merge(b)
    if isinstance(a, CategoricalSummary) and isinstance(b, CategoricalSummary):
        return a.merge(b)
    raise DataError("cannot merge a numeric prediction summary with a categorical one")


def layout(summary: Summary) -> Any:
    return list(summary.edges) if isinstance(summary, NumericSummary) else list(summary.vocabulary)


def summary_from_dict(data: Mapping[str, Any] | None) -> Summary | None:
    if data is None:
        return None
    return _KINDS[data["kind"]].from_dict(data)


# -- helpers ---------------------------------------------------------------------------


def _finite(column: Column | None, rows: int, name: str) -> tuple[np.ndarray, int]:
    """The finite float64 values of ``column`` and how many were missing (null, NaN, ±inf)."""
    if column is None:
        return np.empty(0), rows
    try:
        floats = pc.fill_null(pc.cast(column, pa.float64()), math.nan)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise DataError(
            f"numeric feature {name!r} has type {column.type}, which is not numeric; declare it categorical"
        ) from exc
    values = np.asarray(floats, dtype=np.float64)
    finite = np.isfinite(values)
    return values[finite], int(values.size - np.count_nonzero(finite))


def _strings(column: Column, name: str) -> pa.ChunkedArray:
    try:
        strings = pc.cast(column, pa.string())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise DataError(f"categorical feature {name!r} has type {column.type}, which cannot be read as text") from exc
    return strings if isinstance(strings, pa.ChunkedArray) else pa.chunked_array([strings])


def _top(strings: pa.ChunkedArray, k: int | None) -> tuple[tuple[str, int], ...]:
    """Non-null values by count, most frequent first (ties by value, so profiles are stable)."""
    counted = pc.value_counts(pc.drop_null(strings))
    pairs = zip(counted.field("values").to_pylist(), counted.field("counts").to_pylist(), strict=True)
    ranked = sorted(((str(v), int(n)) for v, n in pairs), key=lambda kv: (-kv[1], kv[0]))
    return tuple(ranked if k is None else ranked[:k])


def _pick(fn: Any, a: float | None, b: float | None) -> float | None:
    present = [x for x in (a, b) if x is not None]
    return fn(present) if present else None


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value
