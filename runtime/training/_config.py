"""What a user writes for a training job: ``python -m jobs.train --config <file>``.

Validated once, at the edge (:func:`load_train_config`): unknown keys, wrong types and
impossible values fail before any Ray work starts, naming the field and the value.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from runtime.config import StrictModel, expand_path, load_config, read_yaml, resolve_path
from runtime.models import MLPConfig, ModelConfig

__all__ = [
    "DataConfig",
    "EarlyStoppingConfig",
    "MemoryConfig",
    "OptimizerConfig",
    "RegistryConfig",
    "TrainJobConfig",
    "TrainingConfig",
    "WatchdogConfig",
    "job_files",
    "load_train_config",
]


class DataConfig(StrictModel):
    path: str = Field(
        description="Parquet/CSV file or directory; a local path or any pyarrow.fs URI. "
        "`~` and environment variables are expanded; ${SKEWLESS_HOME} defaults to ~/.skewless."
    )
    format: Literal["parquet", "csv"] | None = Field(
        default=None, description="File format; guessed from the file suffix when omitted."
    )
    test_fraction: float = Field(
        default=0.2,
        gt=0.0,
        lt=1.0,
        description="Rows held out for the final metrics and the champion comparison (the holdout); "
        "a row's split is a hash of its content and the seed.",
    )
    validation_fraction: float = Field(
        default=0.1,
        gt=0.0,
        lt=1.0,
        description="Rows for the per-epoch validation metrics: early stopping and Tune's trial selection.",
    )
    fit_sample_rows: int = Field(
        default=1_000_000,
        ge=1000,
        description="The preprocessing is fit on at most this many training rows (a uniform sample; "
        "all of them when the training split is smaller). Bounds the driver's memory.",
    )
    ingest: Literal["auto", "memory", "stream"] = Field(
        default="auto",
        description="memory: preprocess the training split once into Ray's object store and iterate it in "
        "memory every epoch (exactly reproducible on any cluster shape); stream: re-read and preprocess the "
        "files every epoch; auto: memory when it fits comfortably.",
    )

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        if isinstance(data, dict) and "holdout_fraction" in data:
            raise ValueError(
                f"holdout_fraction ({data['holdout_fraction']!r}) is now test_fraction (the holdout for the final "
                "metrics and the champion comparison); validation_fraction (default 0.1) is held out for early "
                "stopping and Tune"
            )
        return data

    @field_validator("path")
    @classmethod
    def _expand(cls, value: str) -> str:
        return value if "://" in value else expand_path(value)

    @model_validator(mode="after")
    def _fractions(self) -> DataConfig:
        if self.test_fraction + self.validation_fraction >= 0.9:
            raise ValueError(
                f"test_fraction ({self.test_fraction}) + validation_fraction ({self.validation_fraction}) must "
                "leave at least 10% of the rows for training"
            )
        return self


class OptimizerConfig(StrictModel):
    name: Literal["adamw", "adam", "sgd"] = Field(default="adamw")
    lr: float = Field(default=1e-3, gt=0.0, description="Learning rate (the peak, after any warmup).")
    weight_decay: float = Field(default=0.0, ge=0.0, description="Applied to weight matrices, not biases or norms.")
    momentum: float = Field(default=0.9, ge=0.0, lt=1.0, description="SGD only.")
    betas: tuple[float, float] = Field(default=(0.9, 0.999), description="Adam/AdamW only.")


class EarlyStoppingConfig(StrictModel):
    patience: int = Field(ge=1, description="Epochs without improvement before training stops.")
    min_delta: float = Field(default=0.0, ge=0.0, description="The least change that counts as an improvement.")
    metric: str | None = Field(
        default=None,
        description="A per-epoch validation metric, e.g. valid_loss; default: the task's primary one "
        "(valid_accuracy for classifiers, valid_rmse for regression).",
    )

    @field_validator("metric")
    @classmethod
    def _validation_metric(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith("valid_"):
            raise ValueError(
                f"must be a validation metric (valid_loss, valid_accuracy, valid_rmse, ...), got {value!r}"
            )
        return value


class TrainingConfig(StrictModel):
    epochs: int = Field(default=5, ge=1)
    batch_size: int = Field(default=256, ge=1, description="Global batch size across all workers.")
    num_workers: int = Field(default=2, ge=1, description="Ray Train workers.")
    use_gpu: bool = Field(default=False, description="Train on GPUs (gpus_per_worker each).")
    gpus_per_worker: float = Field(
        default=1.0,
        gt=0.0,
        le=1.0,
        description="With use_gpu: each worker's share of a GPU. Below 1 several workers share one GPU and "
        "their collectives go over gloo (NCCL refuses two ranks on one device).",
    )
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
    warmup_steps: int = Field(default=0, ge=0, description="Linear learning-rate warmup, in optimizer steps.")
    grad_clip: float = Field(default=0.0, ge=0.0, description="Max global gradient norm; 0 turns clipping off.")
    early_stopping: EarlyStoppingConfig | None = Field(
        default=None,
        description="Stop when the validation metric stops improving, and keep the best epoch's weights.",
    )
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
    def _gpu_share(self) -> TrainingConfig:
        if self.gpus_per_worker != 1.0 and not self.use_gpu:
            raise ValueError(
                f"gpus_per_worker ({self.gpus_per_worker}) is a share of a GPU: set use_gpu: true as well, or drop it"
            )
        return self

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
    record_history: Literal["always", "after_first_oom", "never"] = Field(
        default="after_first_oom",
        description="Allocator history (a python stack per CUDA allocation) for the OOM bundle's snapshot: "
        "after_first_oom (the default) arms it when the first OOM is caught, so later bundles name the lines; "
        "always costs 0.1-0.2 ms a step on an H200 (6-12% of a 2 ms step, 0.3% of a 69 ms one); "
        "true/false mean always/never.",
    )

    @field_validator("record_history", mode="before")
    @classmethod
    def _history_bool(cls, value: Any) -> Any:
        if value is True or value is False:
            return "always" if value else "never"
        return value

    watchdog: WatchdogConfig = WatchdogConfig()


class TrainJobConfig(StrictModel):
    """What ``python -m jobs.train --config <file>`` reads."""

    data: DataConfig
    features: str | dict[str, Any] = Field(
        description="Feature spec: a YAML path (relative to this config file) or the spec inline."
    )
    model: Annotated[ModelConfig, Field(description="The architecture and its hyperparameters (default: mlp).")] = (
        MLPConfig()
    )
    optimizer: OptimizerConfig = OptimizerConfig()
    training: TrainingConfig = TrainingConfig()
    memory: MemoryConfig = MemoryConfig()
    registry: RegistryConfig

    @field_validator("model")
    @classmethod
    def _takes_features(cls, value: Any) -> Any:
        if value.inputs != "features":
            raise ValueError(
                f"architecture {value.architecture!r} takes {value.inputs}, not the preprocessed feature matrix "
                "this job trains on; train it with its own job (e.g. python -m jobs.lm)"
            )
        return value

    def feature_spec_dict(self, base_dir: Path | None = None) -> dict[str, Any]:
        if isinstance(self.features, dict):
            return self.features
        return read_yaml(resolve_path(self.features, base_dir), "feature spec")


def load_train_config(path: str | Path) -> TrainJobConfig:
    """Read and validate a training job YAML (a :class:`~runtime.errors.ConfigError` names what is wrong)."""
    return load_config(TrainJobConfig, Path(path))


def job_files(path: str | Path) -> list[Path]:
    """Validate a training job YAML and its feature spec; the files a submission must ship
    with it (the config, and the spec when it is a file)."""
    from runtime.preprocessing import FeatureSpec

    config = Path(path)
    cfg = load_train_config(config)
    FeatureSpec.model_validate(cfg.feature_spec_dict(config.parent))
    files = [config]
    if isinstance(cfg.features, str):
        files.append(resolve_path(cfg.features, config.parent))
    return files
