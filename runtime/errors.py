"""The one exception tree of skewless.

Every error a user can cause is a :class:`SkewlessError`; the CLI prints those without a
traceback (set ``SKEWLESS_DEBUG=1`` to see it). Messages name the field, the bad value, the
rule and the fix.

::

    SkewlessError
    ├── ConfigError                  a config file or argument is invalid
    ├── DependencyError              an optional dependency is missing (names the extra)
    ├── DataError                    a dataset cannot be read or has the wrong shape
    │   ├── DatasetNotFoundError     the path or URI does not exist
    │   └── SchemaValidationError    a value breaks the feature spec (column, row, value, rule)
    ├── PreprocessingError           the feature pipeline cannot be fit or applied
    │   └── FingerprintMismatchError the installed preprocessing code differs from the model's
    ├── TrainingError                a training run failed
    ├── ClusterError                 a Ray cluster or its Jobs API cannot be reached or refused
    ├── RegistryError                MLflow tracking / model registry problems
    │   ├── ModelNotFoundError       no such model, version or alias
    │   ├── ArtifactIntegrityError   an artifact's sha256 does not match its manifest
    │   ├── AliasConflictError       an alias no longer points where the mover expected
    │   └── AliasLockTimeoutError    another alias move held the model's lock too long
    ├── ServingError                 a Serve application cannot be built or deployed
    └── GpuError                     a GPU that was there cannot be read (NVML call failed)
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "AliasConflictError",
    "AliasLockTimeoutError",
    "ArtifactIntegrityError",
    "ClusterError",
    "ConfigError",
    "DataError",
    "DatasetNotFoundError",
    "DependencyError",
    "FingerprintMismatchError",
    "GpuError",
    "ModelNotFoundError",
    "PreprocessingError",
    "RegistryError",
    "SchemaValidationError",
    "ServingError",
    "SkewlessError",
    "TrainingError",
]


class SkewlessError(Exception):
    """Base of every error skewless raises on purpose."""


class ConfigError(SkewlessError):
    """A user-written config (YAML, CLI flag, Serve args) is invalid."""


class DependencyError(SkewlessError):
    """An optional dependency is missing; the message names the extra to install."""


class DataError(SkewlessError):
    """A dataset cannot be read, or does not have the expected shape."""


class DatasetNotFoundError(DataError):
    """The dataset path or URI does not exist or cannot be listed."""


class SchemaValidationError(DataError):
    """A value in the input breaks a rule of the feature spec.

    The structured fields let a server answer with a precise 4xx body.
    """

    def __init__(self, column: str, row: int | None, value: Any, rule: str) -> None:
        self.column = column
        self.row = row
        self.value = value
        self.rule = rule
        where = f"row {row}" if row is not None else "all rows"
        super().__init__(f"column {column!r}, {where}: value {value!r} breaks rule: {rule}")

    def __reduce__(self) -> tuple[Any, ...]:  # survives pickling (raised in Ray tasks)
        return (type(self), (self.column, self.row, self.value, self.rule))

    def to_dict(self) -> dict[str, Any]:
        value = self.value
        if not isinstance(value, (str, int, float, bool, type(None))):
            value = repr(value)
        return {"field": self.column, "row": self.row, "value": value, "rule": self.rule}


class PreprocessingError(SkewlessError):
    """The feature pipeline cannot be fit or applied."""


class FingerprintMismatchError(PreprocessingError):
    """The preprocessing code installed here is not the code the model was trained with."""

    def __init__(self, expected: str, actual: str, what: str = "preprocessing code") -> None:
        self.expected = expected
        self.actual = actual
        self.what = what
        super().__init__(
            f"{what} fingerprint mismatch: the model was trained with {expected[:16]}, "
            f"this process has {actual[:16]}. Install the skewless version the model was "
            "trained with (see `skewless models lineage`), or retrain; to load anyway set "
            "allow_fingerprint_mismatch=true (logged as a warning)."
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.expected, self.actual, self.what))


class TrainingError(SkewlessError):
    """A training run failed."""


class ClusterError(SkewlessError):
    """A Ray cluster, or its Jobs/Serve API, cannot be reached or refused the request."""


class RegistryError(SkewlessError):
    """MLflow tracking or model-registry operation failed."""


class ModelNotFoundError(RegistryError):
    """No registered model, version or alias matches the URI."""


class ArtifactIntegrityError(RegistryError):
    """A model artifact's sha256 does not match the manifest written at training time."""


class AliasConflictError(RegistryError):
    """An alias points somewhere else than the mover expected (None: unset); nothing moved."""

    def __init__(self, model: str, alias: str, current: str | None, expected: str | None) -> None:
        self.model = model
        self.alias = alias
        self.current = current
        self.expected = expected

        def where(version: str | None) -> str:
            return "nowhere (unset)" if version is None else f"version {version}"

        super().__init__(
            f"alias {alias!r} of model {model!r} points to {where(current)}, not to {where(expected)} as "
            "expected: it moved meanwhile (another training, a rollback); re-read the alias and decide again"
        )

    def __reduce__(self) -> tuple[Any, ...]:  # survives pickling (raised in Ray tasks)
        return (type(self), (self.model, self.alias, self.current, self.expected))


class AliasLockTimeoutError(RegistryError):
    """Another alias move held the model's lock past the wait; the message names the holder."""


class ServingError(SkewlessError):
    """A Serve application cannot be built or deployed."""


class GpuError(SkewlessError):
    """A GPU that NVML listed cannot be read (lost device, driver error)."""
