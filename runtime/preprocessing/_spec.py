"""The feature spec: what a user writes in YAML, validated once, at the edge.

Every model forbids unknown keys; :func:`load_spec`, :meth:`FeatureSpec.from_yaml`,
:meth:`FeatureSpec.from_dict` and :meth:`FeatureSpec.model_validate` turn pydantic's
``ValidationError`` into a :class:`~runtime.errors.ConfigError` (through
:func:`runtime.config.validate`) that names the field path, the bad value, the rule and,
for an unknown key, the closest valid key.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from runtime.config import StrictModel, read_yaml, validate
from runtime.errors import ConfigError
from runtime.tasks import task_for

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = [
    "CategoricalFeature",
    "Feature",
    "FeatureSpec",
    "LabelSpec",
    "NumericFeature",
    "PassthroughFeature",
    "load_spec",
]

_Name = Annotated[str, Field(min_length=1, description="Column name in the input table or request.")]


def _check_finite(value: float | None, what: str) -> None:
    if value is not None and not math.isfinite(value):
        raise ValueError(f"{what} must be finite, got {value!r}")


class LabelSpec(StrictModel):
    """The target column. Never needed at serving time."""

    name: _Name
    task: str = Field(
        description="A task of runtime.tasks.TASKS: binary / multiclass -> int64 class indices; regression -> float32."
    )

    @field_validator("task")
    @classmethod
    def _known_task(cls, value: str) -> str:
        try:
            task_for(value)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return value


class NumericFeature(StrictModel):
    """A number: validate -> impute nulls -> clip -> log1p -> standardize (or bucketize).

    With ``bucketize`` the value after clip/log1p is one-hot encoded into
    ``len(bucketize) + 1`` buckets and ``standardize`` is ignored. Bucket ``i`` holds
    ``bucketize[i-1] <= x < bucketize[i]`` (``-inf``/``+inf`` go to the first/last bucket,
    a NaN allowed by ``allow_nonfinite`` to no bucket: an all-zero row).
    """

    name: _Name
    type: Literal["numeric"] = "numeric"
    nullable: bool = Field(True, description="false -> a null is a SchemaValidationError.")
    allow_nonfinite: bool = Field(False, description="false -> NaN / inf is a SchemaValidationError (NaN is not null).")
    impute: Literal["mean", "median", "constant"] = Field(
        "mean", description="How nulls are filled; mean / median of the fit table's raw values."
    )
    impute_value: float | None = Field(None, description="The fill value; required iff impute is 'constant'.")
    clip: tuple[float | None, float | None] | None = Field(
        None, description="[min, max] applied after impute; either bound may be null."
    )
    log1p: bool = Field(False, description="log(1 + x) after clip; values <= -1 are a SchemaValidationError.")
    standardize: bool = Field(True, description="(x - mean) / std with fit-time mean/std (std 0 -> 1).")
    bucketize: tuple[float, ...] | None = Field(
        None, min_length=1, description="Strictly increasing boundaries -> one-hot of len+1 buckets."
    )

    @field_validator("clip")
    @classmethod
    def _clip_ok(cls, v: tuple[float | None, float | None] | None) -> tuple[float | None, float | None] | None:
        if v is None:
            return v
        lo, hi = v
        _check_finite(lo, "clip min")
        _check_finite(hi, "clip max")
        if lo is not None and hi is not None and lo > hi:
            raise ValueError(f"clip min ({lo}) must be <= clip max ({hi})")
        return v

    @field_validator("bucketize")
    @classmethod
    def _buckets_ok(cls, v: tuple[float, ...] | None) -> tuple[float, ...] | None:
        if v is None:
            return v
        for b in v:
            _check_finite(b, "bucketize boundary")
        for a, b in itertools.pairwise(v):
            if not a < b:
                raise ValueError(f"bucketize boundaries must be strictly increasing, got {a} then {b}")
        return v

    @field_validator("impute_value")
    @classmethod
    def _impute_value_ok(cls, v: float | None) -> float | None:
        _check_finite(v, "impute_value")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.impute == "constant" and self.impute_value is None:
            raise ValueError("impute_value is required when impute is 'constant' (e.g. impute_value: 0.0)")
        if self.impute != "constant" and self.impute_value is not None:
            raise ValueError(
                f"impute_value ({self.impute_value}) is only used with impute: constant, "
                f"not impute: {self.impute}; remove it or set impute: constant"
            )
        if self.log1p and self.impute_value is not None:
            lo, hi = self.clip if self.clip is not None else (None, None)
            v = self.impute_value
            v = v if lo is None else max(v, lo)
            v = v if hi is None else min(v, hi)
            if v <= -1:
                raise ValueError(f"impute_value ({self.impute_value}) after clip must be > -1 for log1p")
        return self


class CategoricalFeature(StrictModel):
    """A string with a vocabulary fit on the training table; OOV is index 0."""

    name: _Name
    type: Literal["categorical"] = "categorical"
    nullable: bool = Field(True, description="true -> nulls go to the OOV bucket; false -> error.")
    min_frequency: int = Field(1, ge=1, description="Categories seen fewer times at fit go to OOV.")
    max_categories: int | None = Field(None, ge=1, description="Keep at most this many (most frequent; ties by value).")
    encoding: Literal["onehot", "index"] = Field(
        "onehot", description="onehot -> '<name>=<oov>' + one column per category; index -> one column."
    )


class PassthroughFeature(StrictModel):
    """A number passed through as float32; a null becomes NaN."""

    name: _Name
    type: Literal["passthrough"] = "passthrough"
    nullable: bool = Field(True, description="true -> null becomes NaN; false -> error.")
    allow_nonfinite: bool = Field(False, description="false -> NaN / inf in the input is an error.")


Feature = Annotated[NumericFeature | CategoricalFeature | PassthroughFeature, Field(discriminator="type")]


class FeatureSpec(StrictModel):
    """The declared features (in output order) and the optional label."""

    label: LabelSpec | None = Field(None, description="The target; absent for a features-only spec.")
    features: tuple[Feature, ...] = Field(min_length=1, description="Input columns, in output order.")

    @model_validator(mode="after")
    def _unique_names(self) -> Self:
        seen: set[str] = set()
        for f in self.features:
            if f.name in seen:
                raise ValueError(f"feature name {f.name!r} is declared twice; names must be unique")
            seen.add(f.name)
        if self.label is not None and self.label.name in seen:
            raise ValueError(f"label name {self.label.name!r} is also a feature name")
        return self

    @classmethod
    def model_validate(cls, obj: Any, **kwargs: Any) -> Self:
        """pydantic's ``model_validate``, raising :class:`ConfigError` with did-you-mean hints."""
        return cls.from_dict(obj)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str | None = None) -> Self:
        """Validate a spec given as a mapping (a YAML document's content)."""
        if not isinstance(data, Mapping):
            where = f"{source}: " if source else ""
            raise ConfigError(f"{where}a feature spec must be a mapping with 'features', got {type(data).__name__}")
        return validate(cls, data, f"invalid feature spec{f' {source!r}' if source else ''}")

    @classmethod
    def from_yaml(cls, path: str | Path) -> Self:
        """Read and validate a YAML spec file."""
        data = read_yaml(path, "feature spec")
        return cls.from_dict(data, source=str(path))

    def to_yaml(self) -> str:
        """The spec as YAML, with every default written out."""
        import yaml

        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def load_spec(path: str | Path) -> FeatureSpec:
    """Read and validate a feature spec YAML file (raises :class:`ConfigError`)."""
    return FeatureSpec.from_yaml(path)
