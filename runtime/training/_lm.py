"""The byte-level language-model job: its config and the per-worker loop Ray Train runs.

The loop, as pseudocode::

    tokens = ray.get(config["tokens"])          # the corpus, one copy per node (object store)
    train, valid = split_tokens(tokens, ...)    # the tail of the corpus is held out
    model = prepare_model(build_model(...))     # identical init on every rank, DDP if > 1
    for step in 1..steps:
        x, y = sample_batch(train, rng[seed, rank], batch_size, seq_len)   # random windows
        lm_step(model, optimizer, scheduler, x, y)                          # AdamW, warmup+cosine
        every log_every steps: report {step, loss, tokens_per_s, mfu?}
    final report: + eval_loss, initial_eval_loss, checkpoint (rank 0's weights)
    return a summary (rank 0), which the driver reads from ``Result.return_value``

The corpus travels through the Ray object store (``ray.put`` in the driver, the ObjectRef in
``train_loop_config``): every worker on a node maps the same read-only copy. That suits
the small corpora this job is for (tens of MB); a large corpus belongs in a Ray Dataset or
memory-mapped files on shared storage.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, field_validator, model_validator
from torch import nn
from torch.nn import functional as F

from runtime.config import StrictModel, expand_path

CKPT_MODEL, CKPT_CONFIG = "model.safetensors", "model.json"


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


class LMModelConfig(StrictModel):
    d_model: int = Field(default=128, gt=0, description="Width of the residual stream.")
    n_heads: int = Field(default=4, gt=0, description="Attention heads; must divide d_model.")
    n_layers: int = Field(default=2, gt=0, description="Transformer blocks.")
    seq_len: int = Field(default=128, gt=0, description="Context length in bytes.")
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _heads_divide(self) -> LMModelConfig:
        if self.d_model % self.n_heads:
            raise ValueError(
                f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads}): each head gets "
                f"d_model / n_heads dims; e.g. d_model {self.n_heads * max(1, round(self.d_model / self.n_heads))}"
            )
        return self

    def architecture(self) -> dict[str, Any]:
        """The JSON-able model config that :func:`runtime.models.build_model` rebuilds."""
        return {"architecture": "char_lm", "vocab_size": 256, **self.model_dump()}


class LMTrainingConfig(StrictModel):
    steps: int = Field(default=200, ge=1, description="Optimizer steps.")
    batch_size: int = Field(default=32, ge=1, description="Sequences per worker per step.")
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
    log_every: int = Field(default=10, ge=1, description="Report metrics every this many steps.")
    eval_batches: int = Field(default=4, ge=1, description="Held-out batches for the initial/final eval loss.")

    @model_validator(mode="after")
    def _warmup_fits(self) -> LMTrainingConfig:
        if self.warmup_steps > self.steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be <= steps ({self.steps})")
        return self


class LMJobConfig(StrictModel):
    """What ``python -m jobs.lm --config <file>`` reads."""

    data: LMDataConfig
    model: LMModelConfig = LMModelConfig()
    training: LMTrainingConfig = LMTrainingConfig()
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


def sample_batch(
    tokens: np.ndarray, rng: np.random.Generator, batch_size: int, seq_len: int, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch_size`` random windows of ``seq_len + 1`` bytes: inputs and next-byte targets."""
    starts = rng.integers(0, len(tokens) - seq_len, size=batch_size)
    windows = np.lib.stride_tricks.sliding_window_view(tokens, seq_len + 1)[starts]  # a fresh copy
    batch = torch.from_numpy(windows.astype(np.int64))
    if device is not None and device.type == "cuda":
        batch = batch.pin_memory().to(device, non_blocking=True)
    elif device is not None:
        batch = batch.to(device)
    return batch[:, :-1], batch[:, 1:]


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the peak lr after ``step`` optimizer steps: linear warmup, then cosine."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(
    model: nn.Module, cfg: LMTrainingConfig, fused: bool = False
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (weight decay on matrices and embeddings only) and its warmup + cosine schedule."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), fused=fused or None)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio)
    )
    return optimizer, scheduler


def _autocast(device_type: str, amp_dtype: torch.dtype | None) -> contextlib.AbstractContextManager[Any]:
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=amp_dtype)


def lm_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, amp_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Mean next-byte cross-entropy (nats)."""
    with _autocast(x.device.type, amp_dtype):
        logits = model(x)
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())


def lm_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    x: torch.Tensor,
    y: torch.Tensor,
    amp_dtype: torch.dtype | None = None,
    grad_clip: float = 1.0,
) -> torch.Tensor:
    """One optimizer step on one batch; returns the batch loss, detached (no host sync)."""
    model.train()
    loss = lm_loss(model, x, y, amp_dtype)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return loss.detach()


@torch.no_grad()
def evaluate_loss(
    model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], amp_dtype: torch.dtype | None = None
) -> float:
    """Mean loss over fixed batches, in eval mode (no dropout)."""
    was_training = model.training
    model.eval()
    total = sum(float(lm_loss(model, x, y, amp_dtype)) for x, y in batches)
    model.train(was_training)
    return total / len(batches)


def _all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)  # on the device: NCCL needs it
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return [float(v) for v in t.tolist()]


def lm_train_loop(config: dict[str, Any]) -> dict[str, Any] | None:
    """The Ray Train worker function; rank 0 returns the run's summary."""
    import ray
    import ray.train
    import ray.train.torch
    from safetensors.torch import save_model

    from runtime.errors import TrainingError
    from runtime.models import build_model, flops_per_token, num_parameters
    from runtime.training._throughput import Throughput, mfu, peak_flops

    job = LMJobConfig.model_validate(config["job"])
    t, m = job.training, job.model
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    tokens = config["tokens"]
    tokens = ray.get(tokens) if isinstance(tokens, ray.ObjectRef) else tokens
    train, valid = split_tokens(tokens, job.data.valid_fraction, m.seq_len)

    torch.manual_seed(t.seed)  # identical initial weights on every rank
    base = build_model(m.architecture())
    model: nn.Module = ray.train.torch.prepare_model(base)
    device = ray.train.torch.get_device()
    cuda = device.type == "cuda"
    amp_dtype = torch.bfloat16 if (cuda and t.precision == "bf16") else None
    if amp_dtype is not None and not torch.cuda.is_bf16_supported():
        raise TrainingError(f"training.precision = bf16, but {torch.cuda.get_device_name(device)} has no bf16")
    if t.compile:
        model = torch.compile(model)  # type: ignore[assignment]
    optimizer, scheduler = make_optimizer(base, t, fused=cuda)

    device_name = torch.cuda.get_device_name(device) if cuda else "cpu"
    peak_dtype = "bf16" if amp_dtype is not None else ("tf32" if torch.backends.cuda.matmul.allow_tf32 else "fp32")
    peak = peak_flops(device_name, peak_dtype)
    n_params, n_non_emb = num_parameters(base), num_parameters(base, exclude_embeddings=True)
    fpt = flops_per_token(n_non_emb, m.n_layers, m.d_model, m.seq_len)
    meter = Throughput(warmup_steps=min(3, t.steps // 4), sync=torch.cuda.synchronize if cuda else None)

    rng = np.random.default_rng([t.seed, rank])
    eval_rng = np.random.default_rng([t.seed, 1 << 30])
    eval_set = [sample_batch(valid, eval_rng, t.batch_size, m.seq_len, device) for _ in range(t.eval_batches)]
    eval_set = eval_set if rank == 0 else []  # only rank 0 evaluates
    initial_eval = evaluate_loss(base, eval_set, amp_dtype) if rank == 0 else float("nan")

    history: list[dict[str, float]] = []
    window_loss, window_steps = torch.zeros((), device=device), 0
    for step in range(1, t.steps + 1):
        meter.start()
        x, y = sample_batch(train, rng, t.batch_size, m.seq_len, device)
        window_loss += lm_step(model, optimizer, scheduler, x, y, amp_dtype, t.grad_clip)
        meter.stop(x.numel())
        window_steps += 1
        final = step == t.steps
        if step % t.log_every and not final:
            continue
        loss_sum, n, tps = _all_reduce_sum([float(window_loss), window_steps, meter.tokens_per_s or 0.0], device)
        metrics: dict[str, float] = {"step": step, "loss": loss_sum / n, "tokens_per_s": tps}
        utilization = mfu(tps, fpt, peak * world if peak else None)
        if utilization is not None:
            metrics["mfu"] = utilization
        window_loss, window_steps = torch.zeros((), device=device), 0
        if not final:
            history.append(metrics)
            ray.train.report(metrics)
            continue
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0:
                metrics["eval_loss"] = evaluate_loss(base, eval_set, amp_dtype)
                metrics["initial_eval_loss"] = initial_eval
                save_model(base, os.path.join(tmp, CKPT_MODEL))  # tied weights are stored once
                with open(os.path.join(tmp, CKPT_CONFIG), "w") as f:
                    json.dump(m.architecture(), f)
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            history.append(metrics)
            ray.train.report(metrics, checkpoint=checkpoint)
    if rank != 0:
        return None
    return {
        "history": history,
        "n_params": n_params,
        "n_params_non_embedding": n_non_emb,
        "flops_per_token": fpt,
        "device": device_name,
        "world_size": world,
    }
