"""Data problems: upstream pipeline changes that look like drift but are not.

A unit that changed (×1000), a category renamed, a column gone all-null: the world did not
change, a pipeline did. Retraining on such data would teach the model the bug, so these are
reported apart from drift and never count towards a drift verdict.

Each check is one entry in :data:`CHECKS`, per feature kind; the first that fires names the
feature's problem. Location and scale come from the summaries' mergeable moments (mean of
``|x|`` and the standard deviation), since a window keeps no raw values for a median.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from runtime.monitoring._profile import ReferenceProfile, WindowSummary
from runtime.monitoring._summary import CategoricalSummary, NumericSummary, Summary

UNIT_FACTORS = (1000.0, 0.001)
UNIT_TOLERANCE = 0.5  # in log10: ×1000 matches ratios from ~316 to ~3162
MIN_ROWS = 10  # fewer non-missing window values than this: no unit or rename verdict
RENAME_MIN_SHARE = 0.05  # vanished values must have held at least this share of the reference
RENAME_EXPECTED = 10  # a value counts as vanished when >= this many were expected and < 1% of those came


@dataclass(frozen=True)
class DataProblem:
    """One feature's pipeline problem: what was seen, and why it is not drift."""

    feature: str
    problem: str  # "all_null" | "unit_change" | "renamed_category"
    seen: str
    why: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.feature}: {self.problem} — {self.seen}. {self.why}"


Check = Callable[[str, Any, Any], "DataProblem | None"]


def _all_null(feature: str, reference: Summary, window: Summary) -> DataProblem | None:
    missing = window.missing
    if window.count or not missing or not reference.count:
        return None
    return DataProblem(
        feature,
        "all_null",
        f"all {missing} values in the window are missing (null, NaN or absent), against "
        f"{reference.missing_rate:.1%} missing in the reference",
        "a column that empties at once is a broken join, a dropped field or a renamed column "
        "upstream, not a change in the world; fix the pipeline (the model sees only imputed values)",
    )


def _unit_change(feature: str, reference: NumericSummary, window: NumericSummary) -> DataProblem | None:
    if window.count < MIN_ROWS or not reference.count or not reference.mean_abs or not window.mean_abs:
        return None
    location = window.mean_abs / reference.mean_abs
    scale = window.std / reference.std if reference.std > 0 and window.std > 0 else None
    for factor in UNIT_FACTORS:
        target = math.log10(factor)
        if abs(math.log10(location) - target) > UNIT_TOLERANCE:
            continue
        if scale is not None and abs(math.log10(scale) - target) > UNIT_TOLERANCE:
            continue
        scale_text = "" if scale is None else f", std ×{scale:.4g} ({reference.std:.4g} → {window.std:.4g})"
        return DataProblem(
            feature,
            "unit_change",
            f"mean |x| ×{location:.4g} ({reference.mean_abs:.4g} → {window.mean_abs:.4g}){scale_text}, "
            f"near ×{factor:g}",
            "location and scale moving together by a power of ten is a change of unit upstream "
            "(e.g. metres to millimetres), not drift; convert at the source or in the feature spec",
        )
    return None


def _renamed_category(feature: str, reference: CategoricalSummary, window: CategoricalSummary) -> DataProblem | None:
    if window.count < MIN_ROWS or not reference.count:
        return None
    vanished = [
        (value, n / reference.count)
        for value, n, seen in zip(reference.vocabulary, reference.counts, window.counts, strict=True)
        if (expected := n / reference.count * window.count) >= RENAME_EXPECTED and seen < 0.01 * expected
    ]
    share = sum(s for _, s in vanished)
    gained = window.oov_share - reference.oov_share
    if share < RENAME_MIN_SHARE or abs(gained - share) > 0.5 * share:
        return None
    gone = ", ".join(f"{v!r} ({s:.0%})" for v, s in vanished[:5]) + (" ..." if len(vanished) > 5 else "")
    new = ", ".join(f"{v!r}" for v, _ in window.oov_examples[:5]) or "(not kept)"
    return DataProblem(
        feature,
        "renamed_category",
        f"known values {gone} vanished ({share:.0%} of the reference) while out-of-vocabulary values "
        f"rose from {reference.oov_share:.0%} to {window.oov_share:.0%} (e.g. {new})",
        "the same share moving from known labels to new ones at once is a rename or re-encoding "
        "upstream, not drift; map the new labels to the old ones (the model sees them as unknown)",
    )


CHECKS: Mapping[str, tuple[Check, ...]] = {
    NumericSummary.kind: (_all_null, _unit_change),
    CategoricalSummary.kind: (_all_null, _renamed_category),
}


def data_problems(profile: ReferenceProfile, window: WindowSummary) -> list[DataProblem]:
    """The features of ``window`` whose change is a pipeline problem, at most one each."""
    profile.check_window(window)
    found = []
    pairs: list[tuple[str, Summary, Summary]] = [(c, s, window.numeric[c]) for c, s in profile.numeric.items()]
    pairs += [(c, s, window.categorical[c]) for c, s in profile.categorical.items()]
    for feature, reference, live in pairs:
        for check in CHECKS[reference.kind]:
            if (problem := check(feature, reference, live)) is not None:
                found.append(problem)
                break
    return found
