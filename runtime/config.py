"""Typed, validated configs for what a user writes: training jobs and Serve app args.

Every model forbids unknown keys; :func:`load_config` turns pydantic's errors into one
:class:`~runtime.errors.ConfigError` that names the file, the field path, the bad value and
the rule, with a did-you-mean hint for misspelt keys. Defaults live here and only here.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from runtime.errors import ConfigError

__all__ = [
    "DataConfig",
    "ModelConfig",
    "OptimizerConfig",
    "RegistryConfig",
    "ServeAppArgs",
    "StrictModel",
    "TrainJobConfig",
    "TrainingConfig",
    "expand_path",
    "format_validation_error",
    "load_config",
    "read_yaml",
    "resolve_path",
]

M = TypeVar("M", bound=BaseModel)


class StrictModel(BaseModel):
    """Base of every user-written config: unknown keys are errors, values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(StrictModel):
    path: str = Field(
        description="Parquet/CSV file or directory; a local path or any pyarrow.fs URI. "
        "`~` and environment variables are expanded; ${SKEWLESS_HOME} defaults to ~/.skewless."
    )
    format: Literal["parquet", "csv"] | None = Field(
        default=None, description="File format; guessed from the file suffix when omitted."
    )
    holdout_fraction: float = Field(
        default=0.2,
        gt=0.0,
        lt=1.0,
        description="Fraction of rows held out for evaluation; a row's side is a hash of its content and the seed.",
    )
    fit_sample_rows: int = Field(
        default=1_000_000,
        ge=1000,
        description="The preprocessing is fit on at most this many training rows (a uniform sample; "
        "all of them when the training split is smaller). Bounds the driver's memory.",
    )

    @field_validator("path")
    @classmethod
    def _expand(cls, value: str) -> str:
        return value if "://" in value else expand_path(value)


class ModelConfig(StrictModel):
    hidden: list[Annotated[int, Field(gt=0)]] = Field(default=[64, 32], description="Hidden layer widths of the MLP.")
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0, description="Dropout after each hidden layer.")
    activation: Literal["relu", "gelu", "tanh"] = Field(default="relu")


class OptimizerConfig(StrictModel):
    name: Literal["adamw", "adam", "sgd"] = Field(default="adamw")
    lr: float = Field(default=1e-3, gt=0.0, description="Learning rate.")
    weight_decay: float = Field(default=0.0, ge=0.0)
    momentum: float = Field(default=0.9, ge=0.0, lt=1.0, description="SGD only.")


class TrainingConfig(StrictModel):
    epochs: int = Field(default=5, ge=1)
    batch_size: int = Field(default=256, ge=1, description="Global batch size across all workers.")
    num_workers: int = Field(default=2, ge=1, description="Ray Train workers.")
    use_gpu: bool = Field(default=False, description="One GPU per worker.")
    cpus_per_worker: float = Field(default=1.0, gt=0.0)
    seed: int = Field(default=0, ge=0)
    micro_batch_size: int | None = Field(
        default=None,
        ge=1,
        description="Rows per forward/backward on one worker; gradients accumulate up to "
        "batch_size / num_workers. Default: the whole per-worker batch.",
    )
    precision: Literal["fp32", "bf16"] = Field(default="fp32", description="bf16 autocast on GPU; a no-op on CPU.")
    lr_schedule: Literal["constant", "cosine"] = Field(default="constant")
    checkpoint_every_steps: int | None = Field(
        default=None, ge=1, description="Checkpoint every N optimizer steps as well as every epoch."
    )
    keep_checkpoints: int = Field(default=2, ge=1, description="Checkpoints kept (Ray Train CheckpointConfig).")
    max_failures: int = Field(
        default=0, ge=-1, description="Worker-group restarts from the latest checkpoint (-1: unlimited)."
    )
    run_name: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        description="Ray Train run name; re-running with the same name resumes from its latest checkpoint.",
    )

    @model_validator(mode="after")
    def _batch_divides(self) -> TrainingConfig:
        if self.batch_size < self.num_workers:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be >= num_workers ({self.num_workers}): "
                "each worker takes batch_size / num_workers rows per step"
            )
        per_worker = self.batch_size // self.num_workers
        if self.micro_batch_size is not None and self.micro_batch_size > per_worker:
            raise ValueError(
                f"micro_batch_size ({self.micro_batch_size}) must be <= batch_size / num_workers "
                f"({self.batch_size} / {self.num_workers} = {per_worker}); lower it or raise batch_size"
            )
        return self


class RegistryConfig(StrictModel):
    model_name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="Registered model name in MLflow.")
    experiment: str | None = Field(default=None, description="MLflow experiment; default: model_name.")
    promote: bool = Field(
        default=True,
        description="Move alias 'champion' to the new version when it beats the current champion.",
    )


class WatchdogConfig(StrictModel):
    enabled: bool = Field(default=True, description="One host-memory watchdog per node, outside the workers.")
    soft_fraction: float = Field(
        default=0.9,
        gt=0.0,
        le=1.0,
        description="Above this fraction of the limit, workers dump stacks and allocations.",
    )
    memory_limit_bytes: int | None = Field(
        default=None,
        ge=64 << 20,
        description="Put the training workers in a memory cgroup with this limit (needs a writable cgroup); "
        "default: watch the limit they already have (their cgroup's, else the node's memory).",
    )
    poll_interval_s: float = Field(default=0.5, gt=0.0, le=10.0)


class MemoryConfig(StrictModel):
    track: bool = Field(default=True, description="Per-rank memory timeline, peaks and plot (MLflow, Prometheus).")
    sample_interval_s: float = Field(default=1.0, gt=0.0, le=60.0, description="Background sampler period.")
    oom_guard: bool = Field(
        default=True, description="Survive CUDA OOMs by halving the micro-batch (effective batch unchanged)."
    )
    record_history: bool = Field(
        default=True, description="Record allocator history (python stacks) on GPU for the OOM bundle's snapshot."
    )
    watchdog: WatchdogConfig = WatchdogConfig()


class TrainJobConfig(StrictModel):
    """What ``python -m jobs.train --config <file>`` reads."""

    data: DataConfig
    features: str | dict[str, Any] = Field(
        description="Feature spec: a YAML path (relative to this config file) or the spec inline."
    )
    model: ModelConfig = ModelConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    training: TrainingConfig = TrainingConfig()
    memory: MemoryConfig = MemoryConfig()
    registry: RegistryConfig

    def feature_spec_dict(self, base_dir: Path | None = None) -> dict[str, Any]:
        if isinstance(self.features, dict):
            return self.features
        path = resolve_path(self.features, base_dir)
        return read_yaml(path)


class ServeAppArgs(StrictModel):
    """The ``args`` of the predictor Serve application."""

    model_uri: str = Field(
        pattern=r"^(models:/|runs:/|file:|/).+",
        description="MLflow model URI, e.g. models:/churn@champion, or a packaged model directory.",
    )
    allow_fingerprint_mismatch: bool = Field(
        default=False,
        description="Load even when the installed preprocessing code differs (logged loudly).",
    )
    max_instances: int = Field(default=10_000, ge=1, description="Most instances in one request.")
    max_body_bytes: int = Field(default=10 << 20, ge=1024, description="Largest request body accepted (413 above).")
    max_batch_size: int = Field(
        default=32, ge=1, description="Most requests one model call serves (Ray Serve dynamic batching)."
    )
    batch_wait_timeout_s: float = Field(
        default=0.002, ge=0.0, le=1.0, description="How long a batch waits to fill before the model runs."
    )
    api_key: str | None = Field(
        default=None,
        description="Bearer API key required on /predict (off when unset and api_key_env is unset or empty). "
        "Prefer api_key_env: a key in a config file is a secret in a file.",
    )
    api_key_env: str | None = Field(
        default=None, description="Environment variable holding the bearer API key, e.g. SKEWLESS_API_KEY."
    )
    gpu_memory_bytes: int | None = Field(
        default=None,
        ge=1,
        description="GPU memory one replica needs (declared); checked against its num_gpus share before deploying.",
    )
    gpu_headroom_bytes: int | None = Field(
        default=None, ge=0, description="CUDA context headroom kept out of a fractional-GPU budget (default 600 MiB)."
    )


def expand_path(value: str) -> str:
    """``~`` and environment variables expanded; ``$SKEWLESS_HOME`` defaults to ``~/.skewless``."""
    if "SKEWLESS_HOME" in value and not os.environ.get("SKEWLESS_HOME"):
        value = value.replace("${SKEWLESS_HOME}", "~/.skewless").replace("$SKEWLESS_HOME", "~/.skewless")
    return os.path.expanduser(os.path.expandvars(value))


def resolve_path(path: str, base_dir: Path | None) -> Path:
    p = Path(os.path.expandvars(os.path.expanduser(path)))
    if not p.is_absolute() and base_dir is not None and (base_dir / p).exists():
        return base_dir / p
    return p


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config {str(path)!r}: {exc.strerror or exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def _known_fields(model: type[BaseModel], loc: tuple[int | str, ...]) -> list[str]:
    """The valid keys at ``loc`` (the parent of an unknown key), for did-you-mean hints."""
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        fields = getattr(current, "model_fields", None)
        if not fields or part not in fields:
            return []
        ann = fields[part].annotation
        current = next(
            (a for a in (ann, *getattr(ann, "__args__", ())) if isinstance(a, type) and issubclass(a, BaseModel)),
            None,
        )
        if current is None:
            return []
    return list(getattr(current, "model_fields", {}))


def format_validation_error(model: type[BaseModel], exc: ValidationError, source: str) -> str:
    lines = [f"{source}: {exc.error_count()} invalid field(s)"]
    for err in exc.errors():
        loc = tuple(err["loc"])
        path = ".".join(str(p) for p in loc) or "<root>"
        if err["type"] == "extra_forbidden":
            known = _known_fields(model, loc[:-1])
            close = difflib.get_close_matches(str(loc[-1]), known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else (f"; valid keys: {', '.join(known)}" if known else "")
            lines.append(f"  {path}: unknown key{hint}")
        elif err["type"] == "missing":
            lines.append(f"  {path}: required field is missing")
        else:
            value = err.get("input")
            lines.append(f"  {path} = {value!r}: {err['msg']}")
    return "\n".join(lines)


def load_config(model: type[M], source: str | os.PathLike[str] | dict[str, Any]) -> M:
    """Validate a YAML file (or an already-parsed mapping) against ``model``."""
    if isinstance(source, dict):
        data, name = source, "config"
    else:
        path = Path(source)
        data, name = read_yaml(path), str(path)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(model, exc, name)) from None
