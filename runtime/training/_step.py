"""One optimizer step, and the pieces every training job shares: the optimizer and its
schedule, autocast, the all-reduces.

A step takes this rank's share of the effective batch, split into micro-batches whose
gradients accumulate, so the micro-batch size changes memory, not the result (bit for bit on
CPU without dropout; with dropout the masks are drawn per micro-batch, so the same in
distribution). What a step minimizes is the job's :class:`~runtime.training._objective.Objective`:
each micro-batch's summed loss is divided by the whole batch's count (rows, or tokens), so
the accumulated gradient equals the full batch's mean-loss gradient.

:func:`guarded_step` survives a CUDA out-of-memory on any rank (the protocol is in
:mod:`runtime.training.callbacks._oom`); :func:`train_step` is the plain one (DDP's own
gradient sync, no guard).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

from runtime.training.callbacks import Callback, LoopState, all_reduce_sum, release_memory

__all__ = [
    "accumulate",
    "all_reduce_sum",
    "autocast",
    "guarded_step",
    "lr_factor",
    "make_optimizer",
    "make_scheduler",
    "micro_batch_agreement",
    "sync_gradients",
    "train_step",
]


def autocast(device: Any, precision: str) -> Any:
    """bf16 (or fp16) autocast on CUDA when asked; a no-op elsewhere (CPU trains in fp32)."""
    import torch

    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    if precision in dtypes and getattr(device, "type", None) == "cuda":
        return torch.autocast(device_type="cuda", dtype=dtypes[precision])
    return contextlib.nullcontext()


def make_optimizer(
    model: Any,
    name: str,
    lr: float,
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    betas: tuple[float, float] = (0.9, 0.999),
    fused: bool = False,
) -> Any:
    """The optimizer; weight decay applies to weight matrices and embeddings (``dim >= 2``),
    not to biases and norms."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    cls = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
    return cls(groups, lr=lr, betas=betas, fused=fused or None)


def lr_factor(step: int, schedule: str, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0) -> float:
    """Multiplier of the peak lr after ``step`` optimizer steps: linear warmup, then constant
    or cosine decay to ``min_lr_ratio``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_scheduler(
    optimizer: Any, schedule: str, total_steps: int, warmup_steps: int = 0, min_lr_ratio: float = 0.0
) -> Any:
    """A ``LambdaLR`` over :func:`lr_factor`, or None for a constant rate without warmup."""
    import torch

    if schedule == "constant" and warmup_steps == 0:
        return None
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, schedule, warmup_steps, total_steps, min_lr_ratio)
    )


def accumulate(
    state: LoopState,
    batch: dict[str, Any],
    objective: Any,
    device: Any,
    precision: str = "fp32",
    sync_last: bool = True,
) -> Any:
    """Forward and backward over this rank's ``batch`` in micro-batches of
    ``state.micro_batch_size`` rows; returns the summed loss as a 0-dim tensor on the device
    (``float()`` it to read: that waits for the GPU, so the loop does it once an epoch). Under
    DDP, gradients are all-reduced on the last micro-batch only when ``sync_last``; otherwise no
    collective runs here (see :func:`sync_gradients`)."""
    import torch

    model = state.model
    count = objective.count(batch)
    rows = objective.rows(batch)
    state.optimizer.zero_grad(set_to_none=True)
    total = torch.zeros((), dtype=torch.float64, device=device)
    starts = list(range(0, rows, state.micro_batch_size))
    for i, start in enumerate(starts):
        micro = {k: v[start : start + state.micro_batch_size] for k, v in batch.items()}
        state.extra["input_shape"] = objective.input_shape(micro)
        last = i == len(starts) - 1
        sync = contextlib.nullcontext() if (last and sync_last) or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with autocast(device, precision):
                loss = objective.loss_sum(model, micro, device)
            (loss / count).backward()
        total += loss.detach()
    return total


def _clip(state: LoopState, grad_clip: float) -> None:
    if grad_clip > 0:
        from torch import nn

        nn.utils.clip_grad_norm_(state.model.parameters(), grad_clip)


def train_step(
    state: LoopState,
    batch: dict[str, Any],
    objective: Any,
    device: Any,
    precision: str = "fp32",
    grad_clip: float = 0.0,
) -> float:
    """One optimizer step over this rank's ``batch``, gradients synced by DDP (no OOM guard)."""
    total = accumulate(state, batch, objective, device, precision)
    _clip(state, grad_clip)
    state.optimizer.step()
    return total


def guarded_step(
    state: LoopState,
    batch: dict[str, Any],
    objective: Any,
    device: Any,
    precision: str,
    callbacks: Callback,
    agree: Any,
    grad_clip: float = 0.0,
) -> Any:
    """One optimizer step that survives an OOM on any rank; returns what :func:`train_step` does.

    Micro-batches run with no collective in between; an OOM goes to ``callbacks.on_oom``
    (which halves ``state.micro_batch_size``) and the step is retried on this rank. Then
    ``agree`` (a MIN all-reduce of the micro-batch size over all ranks) makes every rank
    use the smallest one, recomputing if it was larger; then one gradient all-reduce.
    """
    import torch

    from runtime.errors import TrainingError

    total: Any = None
    stale = True  # this rank's gradients are not yet computed at its current micro-batch
    # A recomputed step draws the dropout masks it drew the first time: the run ends as one
    # started at the smaller micro-batch would. Reading the generators' state is a host read,
    # no device sync.
    rng = rng_snapshot(device)
    first = True
    while True:
        if stale and state.micro_batch_size > 0:
            if not first:
                rng_restore(rng, device)
            first = False
            try:
                total = accumulate(state, batch, objective, device, precision, sync_last=False)
            except torch.cuda.OutOfMemoryError as exc:
                before = state.micro_batch_size
                # the bundle is written here, while the failed attempt's memory is still held
                if not callbacks.on_oom(state, exc) or state.micro_batch_size >= before:
                    raise  # unhandled, or "handled" without a smaller micro-batch: no retry loop
                exc.__traceback__ = None  # its frames hold the failed attempt's activations
                del exc
            else:
                stale = False
            if stale:
                # Out of the except block the traceback (and the activations its frames hold)
                # is gone: free it all, cached segments too, so the retry at the smaller size
                # starts from the steady state, not from the failed attempt's fragments.
                total = None
                release_memory(state)
                continue
        # Every rank calls agree() once per round, so collectives always match.
        agreed, largest = agree(state.micro_batch_size)
        if agreed == 0:
            where = state.extra.get("oom_bundle")
            raise TrainingError(
                f"out of memory at micro-batch 1 (step {state.step}, "
                + (
                    f"rank {state.rank}); diagnostics: {where}"
                    if state.micro_batch_size == 0 and where
                    else "another rank)"
                )
                + "; free memory (smaller model, bf16, fewer workers per GPU) or use a larger GPU"
            )
        if agreed == largest:
            break  # every rank accumulated with the same micro-batch
        if agreed < state.micro_batch_size:
            state.micro_batch_size = agreed  # another rank shrank: accumulate the same way
            stale = True
    try:
        sync_gradients(state.model, state.world_size)
        _clip(state, grad_clip)
        state.optimizer.step()
    except torch.cuda.OutOfMemoryError as exc:
        # Not a micro-batch matter (the gradient buffer, the optimizer's state): no retry.
        raise TrainingError(
            f"rank {state.rank} ran out of GPU memory in the gradient all-reduce or the optimizer step "
            f"(step {state.step}); a smaller micro-batch cannot help: use a smaller model, a lighter "
            "optimizer, bf16, or a larger GPU"
        ) from exc
    return total


def rng_snapshot(device: Any) -> tuple[Any, Any, int]:
    """The generator state a recomputed step restores: the CPU's (5 KB, 2-3 µs) and, on a
    GPU, the device generator's Philox offset (an int: no copy, no sync)."""
    import torch

    gen = None
    if getattr(device, "type", None) == "cuda":
        gen = torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]
    return torch.get_rng_state(), gen, gen.get_offset() if gen is not None else 0


def rng_restore(snapshot: tuple[Any, Any, int], device: Any) -> None:
    import torch

    cpu, gen, offset = snapshot
    torch.set_rng_state(cpu)
    if gen is not None:
        gen.set_offset(offset)


def sync_gradients(model: Any, world_size: int) -> None:
    """Average gradients over ranks with one coalesced all-reduce (what DDP would have done)."""
    import torch
    import torch.distributed as dist

    if world_size == 1 or not (dist.is_available() and dist.is_initialized()):
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch._utils._flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    flat.div_(world_size)
    for g, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads), strict=True):
        g.copy_(synced)


def micro_batch_agreement(world_size: int) -> Any:
    """``agree(n) -> (min, max) over ranks of n``: a 16-byte all-reduce on a CPU (gloo) group."""
    if world_size == 1:
        return lambda n: (n, n)
    import torch
    import torch.distributed as dist

    group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
    cell = torch.zeros(2, dtype=torch.int64)

    def agree(n: int) -> tuple[int, int]:
        cell[0], cell[1] = n, -n
        dist.all_reduce(cell, op=dist.ReduceOp.MIN, group=group)
        return int(cell[0]), -int(cell[1])

    return agree
