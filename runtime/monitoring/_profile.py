"""Reference profiles and live-window summaries: the counts that drift is computed from.

A :class:`ReferenceProfile` is computed once, over the training split, and stored with the
model (``to_dict`` is plain JSON). It fixes, per numeric feature, bins whose interior edges
are the reference's quantiles (the outer bins run to -inf and +inf, so every live value lands
in one), and per categorical feature a vocabulary of its most frequent values (the rest share
one out-of-vocabulary bucket).

A :class:`WindowSummary` counts a live window over *those* bins and that vocabulary, with
mergeable moments beside the counts (see ``_summary``). Summaries add: ``a.merge(b)`` equals
summarising the concatenation of both windows' rows (up to float rounding in the moments),
so each replica summarises its own traffic and a collector merges replicas and intervals,
with no raw request log.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from runtime.errors import ConfigError, DataError
from runtime.monitoring._summary import (
    CategoricalSummary,
    Column,
    NumericSummary,
    Summary,
    layout,
    merge_summaries,
    summarise,
    summary_from_dict,
)

FORMAT_VERSION = 1


@dataclass(frozen=True)
class ReferenceProfile:
    """What the training split looked like, per feature and for the predictions."""

    n_rows: int
    numeric: Mapping[str, NumericSummary]
    categorical: Mapping[str, CategoricalSummary]
    prediction: Summary | None = None

    @classmethod
    def from_table(
        cls,
        table: pa.Table,
        *,
        numeric: Iterable[str] = (),
        categorical: Iterable[str] = (),
        predictions: Any = None,
        bins: int = 20,
        max_categories: int = 100,
    ) -> ReferenceProfile:
        """Profile ``table`` (the training split). ``predictions`` (one per row): floats are
        profiled as numeric scores, anything else as categorical labels."""
        numeric, categorical = list(numeric), list(categorical)
        if both := sorted(set(numeric) & set(categorical)):
            raise ConfigError(f"columns {both} are listed as numeric and categorical; list each once")
        if bins < 2:
            raise ConfigError(f"bins ({bins}) must be >= 2")
        if max_categories < 1:
            raise ConfigError(f"max_categories ({max_categories}) must be >= 1")
        if missing := [c for c in numeric + categorical if c not in table.column_names]:
            raise DataError(f"the reference table has no column(s) {missing}; it has {table.column_names}")
        prediction: Summary | None = None
        if predictions is not None:
            scores = _prediction_array(predictions, table.num_rows)
            if pa.types.is_floating(scores.type):
                prediction = NumericSummary.fit(scores, bins=bins, name="prediction")
            else:
                prediction = CategoricalSummary.fit(scores, max_categories=max_categories, name="prediction")
        return cls(
            n_rows=table.num_rows,
            numeric={c: NumericSummary.fit(table.column(c), bins=bins, name=c) for c in numeric},
            categorical={
                c: CategoricalSummary.fit(table.column(c), max_categories=max_categories, name=c) for c in categorical
            },
            prediction=prediction,
        )

    @property
    def fingerprint(self) -> str:
        """sha256 over the bins and vocabularies: windows are comparable to this profile only."""
        shape = {
            "numeric": {c: s.edges for c, s in self.numeric.items()},
            "categorical": {c: s.vocabulary for c, s in self.categorical.items()},
            "prediction": None if self.prediction is None else layout(self.prediction),
        }
        return hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()

    def check_window(self, window: WindowSummary) -> None:
        """Raise unless ``window`` was summarised over this profile's bins and vocabularies."""
        if window.profile_fingerprint != self.fingerprint:
            raise DataError(
                f"the window was summarised for profile {window.profile_fingerprint[:12]}, not this one "
                f"({self.fingerprint[:12]}); compare a window with the profile of the model version that served it"
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": FORMAT_VERSION,
            "fingerprint": self.fingerprint,
            "n_rows": self.n_rows,
            "numeric": {c: s.to_dict() for c, s in self.numeric.items()},
            "categorical": {c: s.to_dict() for c, s in self.categorical.items()},
            "prediction": None if self.prediction is None else self.prediction.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ReferenceProfile:
        _check_version(data, "reference profile")
        try:
            return cls(
                n_rows=int(data["n_rows"]),
                numeric={c: NumericSummary.from_dict(s) for c, s in data["numeric"].items()},
                categorical={c: CategoricalSummary.from_dict(s) for c, s in data["categorical"].items()},
                prediction=summary_from_dict(data.get("prediction")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(
                f"the reference profile is malformed ({exc!r}); recompute it from the training split"
            ) from exc


@dataclass(frozen=True)
class WindowSummary:
    """A live window counted over a profile's bins and vocabularies; mergeable."""

    profile_fingerprint: str
    n_rows: int
    numeric: Mapping[str, NumericSummary]
    categorical: Mapping[str, CategoricalSummary]
    prediction: Summary | None = None

    @classmethod
    def from_table(cls, profile: ReferenceProfile, table: pa.Table, *, predictions: Any = None) -> WindowSummary:
        """Summarise ``table``. A profiled column the table lacks counts as all missing (it
        shows up as a data problem, not as a crash in the serving path)."""
        rows = table.num_rows

        def column(name: str) -> Column | None:
            return table.column(name) if name in table.column_names else None

        prediction: Summary | None = None
        if profile.prediction is not None:  # no predictions given: an empty prediction summary
            scores = None if predictions is None else _prediction_array(predictions, rows)
            prediction = summarise(profile.prediction, scores, 0 if scores is None else rows, "prediction")
        return cls(
            profile_fingerprint=profile.fingerprint,
            n_rows=rows,
            numeric={c: NumericSummary.of(column(c), s.edges, rows=rows, name=c) for c, s in profile.numeric.items()},
            categorical={
                c: CategoricalSummary.of(column(c), s.vocabulary, rows=rows, name=c)
                for c, s in profile.categorical.items()
            },
            prediction=prediction,
        )

    @classmethod
    def empty(cls, profile: ReferenceProfile) -> WindowSummary:
        """The identity of :meth:`merge`: a window with no rows."""
        return cls.from_table(profile, pa.table({}))

    def merge(self, other: WindowSummary) -> WindowSummary:
        if other.profile_fingerprint != self.profile_fingerprint:
            raise DataError(
                f"cannot merge windows of different profiles ({self.profile_fingerprint[:12]} vs "
                f"{other.profile_fingerprint[:12]}); merge windows of one model version"
            )
        prediction: Summary | None = None
        if self.prediction is not None and other.prediction is not None:
            prediction = merge_summaries(self.prediction, other.prediction)
        return WindowSummary(
            profile_fingerprint=self.profile_fingerprint,
            n_rows=self.n_rows + other.n_rows,
            numeric={c: s.merge(other.numeric[c]) for c, s in self.numeric.items()},
            categorical={c: s.merge(other.categorical[c]) for c, s in self.categorical.items()},
            prediction=prediction or self.prediction or other.prediction,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": FORMAT_VERSION,
            "profile_fingerprint": self.profile_fingerprint,
            "n_rows": self.n_rows,
            "numeric": {c: s.to_dict() for c, s in self.numeric.items()},
            "categorical": {c: s.to_dict() for c, s in self.categorical.items()},
            "prediction": None if self.prediction is None else self.prediction.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> WindowSummary:
        _check_version(data, "window summary")
        try:
            return cls(
                profile_fingerprint=str(data["profile_fingerprint"]),
                n_rows=int(data["n_rows"]),
                numeric={c: NumericSummary.from_dict(s) for c, s in data["numeric"].items()},
                categorical={c: CategoricalSummary.from_dict(s) for c, s in data["categorical"].items()},
                prediction=summary_from_dict(data.get("prediction")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"the window summary is malformed ({exc!r})") from exc


def _prediction_array(predictions: Any, rows: int) -> pa.Array:
    array = predictions if isinstance(predictions, pa.Array | pa.ChunkedArray) else pa.array(np.asarray(predictions))
    if len(array) != rows:
        raise DataError(f"predictions has {len(array)} values for a table of {rows} rows; pass one per row")
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks()
    return array


def _check_version(data: Mapping[str, Any], what: str) -> None:
    if data.get("version") != FORMAT_VERSION:
        raise DataError(
            f"{what} format version {data.get('version')!r} is not {FORMAT_VERSION}; recompute it with this skewless"
        )
