"""The byte-level language-model job's config and its pieces (the GPU-shaped workload).

The job runs the same worker loop as the tabular job (:mod:`runtime.training._worker`):
events and callbacks, the OOM guard and micro-batching, the memory tracker and watchdog,
checkpoints every reporting interval, MLflow through the run logger. What differs is its
objective (next-byte cross-entropy, :class:`~runtime.training._objective.LMObjective`) and its
data: the corpus travels through the Ray object store (``ray.put`` in the driver, one
read-only copy per node) and each step draws random windows of it
(:class:`~runtime.training._sources.TokenSource`). An "epoch" of this job is one reporting
interval of ``log_every`` steps: the loop evaluates the held-out tail, reports and
checkpoints at its end. That suits the small corpora this job is for (tens of MB); a large
corpus belongs in a Ray Dataset or memory-mapped files on shared storage.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field, field_validator, model_validator

from runtime.config import StrictModel, expand_path
from runtime.models import CharLMConfig
from runtime.training._config import MemoryConfig

__all__ = ["LMDataConfig", "LMJobConfig", "LMTrainingConfig", "split_tokens"]


class LMDataConfig(StrictModel):
    path: str = Field(
        description="UTF-8 text file (local path). `~` and environment variables are expanded; "
        "${SKEWLESS_HOME} defaults to ~/.skewless."
    )
    generate: bool = Field(default=False, description="Write a synthetic corpus of n_bytes at `path` if it is missing.")
    n_bytes: int = Field(default=1_000_000, ge=1024, description="Size of the generated corpus.")
    seed: int = Field(default=0, ge=0, description="Seed of the generated corpus.")
    valid_fraction: float = Field(
        default=0.05, gt=0.0, lt=0.5, description="Tail of the corpus held out for the eval loss."
    )

    @field_validator("path")
    @classmethod
    def _expand(cls, value: str) -> str:
        if "://" in value:
            raise ValueError("must be a local file path; the corpus is read with plain file I/O")
        return expand_path(value)


class LMTrainingConfig(StrictModel):
    steps: int = Field(default=200, ge=1, description="Optimizer steps.")
    batch_size: int = Field(default=32, ge=1, description="Sequences per worker per step.")
    micro_batch_size: int | None = Field(
        default=None, ge=1, description="Sequences per forward/backward; gradients accumulate up to batch_size."
    )
    lr: float = Field(default=3e-4, gt=0.0, description="Peak learning rate (after warmup).")
    warmup_steps: int = Field(default=20, ge=0, description="Linear warmup steps, then cosine decay.")
    min_lr_ratio: float = Field(default=0.1, ge=0.0, le=1.0, description="Final lr as a fraction of lr.")
    weight_decay: float = Field(default=0.1, ge=0.0, description="AdamW decay of the matrices (not biases/norms).")
    grad_clip: float = Field(default=1.0, ge=0.0, description="Max global grad norm; 0 turns clipping off.")
    num_workers: int = Field(default=1, ge=1, description="Ray Train workers (data parallel).")
    use_gpu: bool = Field(default=False, description="One GPU per worker.")
    cpus_per_worker: float = Field(default=1.0, gt=0.0)
    seed: int = Field(default=0, ge=0)
    precision: Literal["bf16", "fp32"] = Field(
        default="bf16", description="bf16 autocast on CUDA; a no-op on CPU, which trains in fp32."
    )
    compile: bool = Field(default=False, description="torch.compile the model (worth it on a GPU).")
    tokens_on_device: bool = Field(
        default=True,
        description="On a GPU: keep the training tokens there and cut each step's windows there (the same windows "
        "as on the host; no copy per step).",
    )
    log_every: int = Field(default=10, ge=1, description="Evaluate, report and checkpoint every this many steps.")
    eval_batches: int = Field(default=4, ge=1, description="Held-out batches for the initial/final eval loss.")

    @model_validator(mode="after")
    def _warmup_fits(self) -> LMTrainingConfig:
        if self.warmup_steps > self.steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be <= steps ({self.steps})")
        if self.micro_batch_size is not None and self.micro_batch_size > self.batch_size:
            raise ValueError(f"micro_batch_size ({self.micro_batch_size}) must be <= batch_size ({self.batch_size})")
        return self


class LMRegistryConfig(StrictModel):
    model_name: str | None = Field(
        default="skewless-lm",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        description="Registered model name in MLflow (alias 'candidate'); null: log the run, register nothing.",
    )


class LMJobConfig(StrictModel):
    """What ``python -m jobs.lm --config <file>`` reads."""

    data: LMDataConfig
    model: CharLMConfig = CharLMConfig()
    training: LMTrainingConfig = LMTrainingConfig()
    memory: MemoryConfig = MemoryConfig()
    registry: LMRegistryConfig = LMRegistryConfig()
    experiment: str | None = Field(
        default="skewless-lm", description="MLflow experiment for the run; null turns tracking off."
    )


def split_tokens(tokens: np.ndarray, valid_fraction: float, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, valid): the last ``valid_fraction`` of the corpus (at least one window) is held out."""
    from runtime.errors import DataError

    window = seq_len + 1
    n_valid = max(window, int(len(tokens) * valid_fraction))
    if len(tokens) - n_valid < window:
        raise DataError(
            f"the corpus has {len(tokens)} bytes: too few for seq_len ({seq_len}) windows in both the training "
            f"part and the {n_valid}-byte held-out tail; use a larger corpus (data.n_bytes) or a smaller "
            "model.seq_len"
        )
    return tokens[:-n_valid], tokens[-n_valid:]
