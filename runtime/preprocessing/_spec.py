"""The feature spec: what a user writes in YAML, validated once, at the edge.

Every model forbids unknown keys; :func:`load_spec`, :meth:`FeatureSpec.from_yaml`,
:meth:`FeatureSpec.from_dict` and :meth:`FeatureSpec.model_validate` turn pydantic's
``ValidationError`` into a :class:`~runtime.errors.ConfigError` that names the field path,
the bad value, the rule and, for an unknown key, the closest valid key.
"""

from __future__ import annotations

import difflib
import itertools
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from runtime.errors import ConfigError

if TYPE_CHECKING:
    import pyarrow as pa
    from typing_extensions import Self

    from runtime.preprocessing._transform import FittedPreprocessor

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


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_finite(value: float | None, what: str) -> None:
    if value is not None and not math.isfinite(value):
        raise ValueError(f"{what} must be finite, got {value!r}")


class LabelSpec(_Model):
    """The target column. Never needed at serving time."""

    name: _Name
    task: Literal["binary", "multiclass", "regression"] = Field(
        description="binary / multiclass -> int64 class indices; regression -> float32."
    )


class NumericFeature(_Model):
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


class CategoricalFeature(_Model):
    """A string with a vocabulary fit on the training table; OOV is index 0."""

    name: _Name
    type: Literal["categorical"] = "categorical"
    nullable: bool = Field(True, description="true -> nulls go to the OOV bucket; false -> error.")
    min_frequency: int = Field(1, ge=1, description="Categories seen fewer times at fit go to OOV.")
    max_categories: int | None = Field(None, ge=1, description="Keep at most this many (most frequent; ties by value).")
    encoding: Literal["onehot", "index"] = Field(
        "onehot", description="onehot -> '<name>=<oov>' + one column per category; index -> one column."
    )


class PassthroughFeature(_Model):
    """A number passed through as float32; a null becomes NaN."""

    name: _Name
    type: Literal["passthrough"] = "passthrough"
    nullable: bool = Field(True, description="true -> null becomes NaN; false -> error.")
    allow_nonfinite: bool = Field(False, description="false -> NaN / inf in the input is an error.")


Feature = Annotated[NumericFeature | CategoricalFeature | PassthroughFeature, Field(discriminator="type")]
_FEATURE_MODELS: dict[str, type[BaseModel]] = {
    "numeric": NumericFeature,
    "categorical": CategoricalFeature,
    "passthrough": PassthroughFeature,
}


class FeatureSpec(_Model):
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
        try:
            return super().model_validate(obj, **kwargs)
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, cls)) from None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str | None = None) -> Self:
        """Validate a spec given as a mapping (a YAML document's content)."""
        if not isinstance(data, Mapping):
            where = f"{source}: " if source else ""
            raise ConfigError(f"{where}a feature spec must be a mapping with 'features', got {type(data).__name__}")
        try:
            return super().model_validate(dict(data))
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, cls, source)) from None

    @classmethod
    def from_yaml(cls, path: str | Path) -> Self:
        """Read and validate a YAML spec file."""
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"feature spec {str(p)!r} cannot be read: {exc.strerror or exc}") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"feature spec {str(p)!r} is not valid YAML: {exc}") from None
        return cls.from_dict(data, source=str(p))

    def to_yaml(self) -> str:
        """The spec as YAML, with every default written out."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def input_schema(self) -> pa.Schema:
        """The raw input columns (features only) with their arrow types."""
        from runtime.preprocessing._plan import input_schema_of

        return input_schema_of(self)

    def fit(self, table: pa.Table) -> FittedPreprocessor:
        """Alias of :func:`runtime.preprocessing.fit`."""
        from runtime.preprocessing._fit import fit

        return fit(self, table)


def load_spec(path: str | Path) -> FeatureSpec:
    """Read and validate a feature spec YAML file (raises :class:`ConfigError`)."""
    return FeatureSpec.from_yaml(path)


# --------------------------------------------------------------------------- errors


def _model_at(root: type[BaseModel], loc: Sequence[int | str]) -> tuple[type[BaseModel] | None, str]:
    """The model that owns the last element of ``loc`` and the human path of ``loc``."""
    model: type[BaseModel] | None = root
    path = ""
    i = 0
    while i < len(loc):
        part = loc[i]
        if isinstance(part, int):
            path += f"[{part}]"
            i += 1
            continue
        if model is FeatureSpec and part == "features":
            path += ".features" if path else "features"
            # the discriminated union puts the tag after the list index
            if i + 2 < len(loc) and isinstance(loc[i + 1], int) and loc[i + 2] in _FEATURE_MODELS:
                path += f"[{loc[i + 1]}]"
                model = _FEATURE_MODELS[str(loc[i + 2])]
                i += 3
            else:
                model = None
                i += 1
            continue
        if model is FeatureSpec and part == "label":
            model = LabelSpec
        elif i < len(loc) - 1:
            model = None
        path += f".{part}" if path else str(part)
        i += 1
    return model, path


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def format_validation_error(exc: ValidationError, root: type[BaseModel], source: str | None = None) -> str:
    """One line per problem: ``path: value breaks rule (did you mean ...?)``."""
    lines = []
    errors = exc.errors()
    for err in errors:
        loc = tuple(err["loc"])
        kind = err["type"]
        if kind == "too_short" and any(len(e["loc"]) > len(loc) and tuple(e["loc"][: len(loc)]) == loc for e in errors):
            continue  # "features is empty" only because its items failed: noise
        if kind == "extra_forbidden":
            owner, _ = _model_at(root, loc[:-1])
            _, path = _model_at(root, loc)
            key = str(loc[-1])
            valid = sorted(owner.model_fields) if owner is not None else []
            hint = difflib.get_close_matches(key, valid, n=1)
            line = f"{path}: unknown key {key!r}"
            if hint:
                line += f" (did you mean {hint[0]!r}?)"
            elif valid:
                line += f"; valid keys: {', '.join(valid)}"
        elif kind == "union_tag_invalid":
            _, path = _model_at(root, loc)
            tag = err.get("ctx", {}).get("tag", err.get("input"))
            hint = difflib.get_close_matches(str(tag), list(_FEATURE_MODELS), n=1)
            line = f"{path}.type: value {_short(tag)} is not a feature type; use one of {', '.join(_FEATURE_MODELS)}"
            if hint:
                line += f" (did you mean {hint[0]!r}?)"
        elif kind == "union_tag_not_found":
            _, path = _model_at(root, loc)
            line = f"{path}: missing key 'type' (one of {', '.join(_FEATURE_MODELS)})"
        elif kind == "missing":
            _, path = _model_at(root, loc)
            line = f"{path}: required key is missing"
        else:
            _, path = _model_at(root, loc)
            msg = err["msg"].removeprefix("Value error, ")
            value = err.get("input")
            if isinstance(value, Mapping):  # a model-level rule: the message names the values
                line = f"{path or '<spec>'}: {msg}"
            else:
                line = f"{path or '<spec>'}: value {_short(value)} breaks rule: {msg}"
        lines.append(line)
    head = f"invalid feature spec{f' {source!r}' if source else ''}"
    if len(lines) == 1:
        return f"{head}: {lines[0]}"
    return head + ":\n" + "\n".join(f"  - {line}" for line in lines)
