"""The per-worker training loop that Ray Train runs on every rank.

Each rank streams its shard from Ray Data, already turned into features by the shared
``runtime.preprocessing`` transform (the code serving runs) as a stage of the data pipeline
(:func:`runtime.preprocessing.transform_batch`), so Ray Data's CPU tasks preprocess while
the workers train. One optimizer step takes the rank's share of the effective batch, split
into micro-batches whose gradients accumulate, so the micro-batch size changes memory, not
the result (bit for bit on CPU without dropout; with dropout the masks are drawn per
micro-batch, so the same in distribution). bf16 autocast
applies on GPU when asked (a no-op on CPU). Checkpoints (per epoch, or every N steps) hold
everything :mod:`runtime.training._checkpoint` lists; a restarted worker group resumes from
the latest one. The loop's events are in :mod:`runtime.training._events`.
"""

from __future__ import annotations

import contextlib
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from runtime.preprocessing._stage import FEATURES, LABEL
from runtime.training._checkpoint import load_checkpoint, save_checkpoint, save_rng_state
from runtime.training._events import Callback, CallbackList, LoopState


def _loss_fn(task: str) -> Any:
    from torch import nn

    cls = {"binary": nn.BCEWithLogitsLoss, "multiclass": nn.CrossEntropyLoss}.get(task, nn.MSELoss)
    return cls(reduction="sum")


def _targets(task: str, labels: np.ndarray, target_scale: tuple[float, float]) -> Any:
    import torch

    if task == "multiclass":
        return torch.from_numpy(labels.astype(np.int64))
    y = labels.astype(np.float32)
    if task == "regression":
        y = (y - np.float32(target_scale[0])) / np.float32(target_scale[1])
    return torch.from_numpy(y).unsqueeze(1)


def _make_optimizer(params: Any, cfg: dict[str, Any]) -> Any:
    import torch

    if cfg["name"] == "sgd":
        return torch.optim.SGD(params, lr=cfg["lr"], momentum=cfg["momentum"], weight_decay=cfg["weight_decay"])
    cls = torch.optim.AdamW if cfg["name"] == "adamw" else torch.optim.Adam
    return cls(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])


def _make_scheduler(optimizer: Any, name: str, total_steps: int) -> Any:
    import torch

    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total_steps, 1))
    return None


def _all_reduce_sum(values: list[float]) -> list[float]:
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return [float(v) for v in t.tolist()]


def _autocast(device: Any, precision: str) -> Any:
    import torch

    if precision == "bf16" and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def accumulate(
    state: LoopState,
    batch: dict[str, Any],
    loss_fn: Any,
    task: str,
    target_scale: tuple[float, float],
    device: Any,
    precision: str = "fp32",
    sync_last: bool = True,
) -> float:
    """Forward and backward over this rank's ``batch`` (``{"x": features, "y": labels}``, as
    the preprocessing stage of the data pipeline gives them), in micro-batches.

    Each micro-batch's summed loss is divided by the rank's whole batch size, so the
    accumulated gradient equals the full batch's mean-loss gradient whatever the
    micro-batch size. Under DDP, gradients are all-reduced on the last micro-batch only
    when ``sync_last``; otherwise no collective runs here (see :func:`sync_gradients`).
    """
    model = state.model
    features, labels = batch[FEATURES], batch[LABEL]
    rows = len(labels)
    state.optimizer.zero_grad(set_to_none=True)
    total = 0.0
    starts = list(range(0, rows, state.micro_batch_size))
    for i, start in enumerate(starts):
        x = features[start : start + state.micro_batch_size]
        y = labels[start : start + state.micro_batch_size]
        state.extra["input_shape"] = x.shape
        last = i == len(starts) - 1
        sync = contextlib.nullcontext() if (last and sync_last) or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with _autocast(device, precision):
                out = model(_to(x, device))
                loss = loss_fn(out.float(), _targets(task, y, target_scale).to(device))
            (loss / rows).backward()
        total += float(loss.detach())
    return total


def train_step(
    state: LoopState,
    batch: dict[str, Any],
    loss_fn: Any,
    task: str,
    target_scale: tuple[float, float],
    device: Any,
    precision: str = "fp32",
) -> float:
    """One optimizer step over this rank's ``batch``, gradients synced by DDP (no OOM guard)."""
    total = accumulate(state, batch, loss_fn, task, target_scale, device, precision)
    state.optimizer.step()
    return total


def guarded_step(
    state: LoopState,
    batch: dict[str, Any],
    loss_fn: Any,
    task: str,
    target_scale: tuple[float, float],
    device: Any,
    precision: str,
    callbacks: Callback,
    agree: Any,
) -> float:
    """One optimizer step that survives an OOM on any rank (protocol in :mod:`runtime.gpu._oom`).

    Micro-batches run with no collective in between; an OOM goes to ``callbacks.on_oom``
    (which halves ``state.micro_batch_size``) and the step is retried on this rank. Then
    ``agree`` (a MIN all-reduce of the micro-batch size over all ranks) makes every rank
    use the smallest one, recomputing if it was larger; then one gradient all-reduce.
    """
    import torch

    from runtime.errors import TrainingError

    total = 0.0
    stale = True  # this rank's gradients are not yet computed at its current micro-batch
    # A recomputed step draws the dropout masks it drew the first time: the run ends as one
    # started at the smaller micro-batch would. Reading the generators' state is a host copy
    # (CUDA's is a seed and an offset), no device sync.
    rng = _rng_snapshot(device)
    first = True
    while True:
        if stale and state.micro_batch_size > 0:
            if not first:
                _rng_restore(rng, device)
            first = False
            try:
                total = accumulate(state, batch, loss_fn, task, target_scale, device, precision, sync_last=False)
            except torch.cuda.OutOfMemoryError as exc:
                before = state.micro_batch_size
                if not callbacks.on_oom(state, exc) or state.micro_batch_size >= before:
                    raise  # unhandled, or "handled" without a smaller micro-batch: no retry loop
                continue
        stale = False
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
        state.optimizer.step()
    except torch.cuda.OutOfMemoryError as exc:
        # Not a micro-batch matter (the gradient buffer, the optimizer's state): no retry.
        raise TrainingError(
            f"rank {state.rank} ran out of GPU memory in the gradient all-reduce or the optimizer step "
            f"(step {state.step}); a smaller micro-batch cannot help: use a smaller model, a lighter "
            "optimizer, bf16, or a larger GPU"
        ) from exc
    return total


def _rng_snapshot(device: Any) -> tuple[Any, Any]:
    import torch

    cuda = torch.cuda.get_rng_state(device) if getattr(device, "type", None) == "cuda" else None
    return torch.get_rng_state(), cuda


def _rng_restore(snapshot: tuple[Any, Any], device: Any) -> None:
    import torch

    cpu, cuda = snapshot
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


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


def _to(x: np.ndarray, device: Any) -> Any:
    import torch

    return torch.from_numpy(x).to(device)


def _evaluate(
    model: Any,
    shard: Any,
    loss_fn: Any,
    task: str,
    target_scale: tuple[float, float],
    device: Any,
    eval_rows: int = 4096,
) -> dict[str, float]:
    import torch

    model.eval()
    v_total, v_rows, v_correct = 0.0, 0, 0.0
    with torch.inference_mode():
        for batch in shard.iter_batches(batch_size=eval_rows, batch_format="numpy"):
            y = _targets(task, batch[LABEL], target_scale).to(device)
            out = model(_to(batch[FEATURES], device))
            v_total += float(loss_fn(out, y))
            v_rows += len(batch[LABEL])
            if task == "binary":
                v_correct += float(((out > 0).float() == y).sum())
            elif task == "multiclass":
                v_correct += float((out.argmax(dim=1) == y).sum())
    model.train()
    v_total, n, v_correct = _all_reduce_sum([v_total, v_rows, v_correct])
    metrics = {"valid_loss": v_total / max(n, 1)}
    if task != "regression":
        metrics["valid_accuracy"] = v_correct / max(n, 1)
    return metrics


class MlflowMetrics(Callback):
    """Rank 0 logs each epoch's metrics into the driver's MLflow run."""

    def __init__(self, tracking_uri: str, run_id: str) -> None:
        import mlflow

        self.client = mlflow.MlflowClient(tracking_uri=tracking_uri)
        self.run_id = run_id

    def on_epoch_end(self, state: LoopState) -> None:
        if state.rank == 0:
            for key, value in state.metrics.items():
                self.client.log_metric(self.run_id, key, value, step=state.epoch)


def default_callbacks(config: dict[str, Any]) -> list[Callback]:
    callbacks: list[Callback] = []
    run_id, tracking = config.get("mlflow_run_id"), config.get("tracking_uri")
    if run_id:
        callbacks.append(MlflowMetrics(config["tracking_uri"], run_id))
    memory = config.get("memory") or {}
    if memory.get("track", False):
        from runtime.gpu._tracker import MemoryTracker

        callbacks.append(
            MemoryTracker(
                interval_s=memory.get("sample_interval_s", 1.0),
                output_dir=memory.get("report_dir"),
                mlflow_run_id=run_id,
                tracking_uri=tracking,
            )
        )
    if memory.get("watchdog_run"):
        from runtime.gpu._watchdog import WatchdogClient

        callbacks.append(WatchdogClient(memory["watchdog_run"], memory["host_diagnostics_dir"]))
    if memory.get("oom_guard", False):
        from runtime.gpu._oom import OomGuard

        # no tracking URI in the bundle: it may carry credentials
        context = {k: v for k, v in config.items() if k not in ("callbacks", "preprocessor", "tracking_uri")}
        callbacks.append(
            OomGuard(
                memory.get("diagnostics_dir") or tempfile.mkdtemp(prefix="skewless-diagnostics-"),
                mlflow_run_id=run_id,
                tracking_uri=tracking,
                record_history=memory.get("record_history", True),
                context=context,
            )
        )
    return callbacks


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch
    import torch

    from runtime.models import build_model
    from runtime.preprocessing import FittedPreprocessor

    # Batches are zero-copy, read-only views of Ray's object store; the model reads its input
    # and never writes it, so torch's warning about non-writable arrays is noise here.
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    seed: int = config["seed"]
    torch.manual_seed(seed)  # identical initial weights on every rank
    np.random.seed(seed + rank)
    task: str = config["task"]
    target_scale = tuple(config.get("target_scale", (0.0, 1.0)))
    prep = FittedPreprocessor.from_json(config["preprocessor"])
    per_rank = max(1, config["batch_size"] // world)
    epochs: int = config["epochs"]
    steps_per_epoch = -(-config["train_rows"] // (per_rank * world))

    model = build_model(config["model"])
    torch.manual_seed(seed * 1_000_003 + rank)  # then one stream per rank (dropout masks)
    optimizer = _make_optimizer(model.parameters(), config["optimizer"])
    scheduler = _make_scheduler(optimizer, config.get("lr_schedule", "constant"), steps_per_epoch * epochs)
    state = LoopState(
        rank=rank,
        world_size=world,
        epochs=epochs,
        batch_size=per_rank,
        micro_batch_size=min(config.get("micro_batch_size") or per_rank, per_rank),
    )
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            resume = load_checkpoint(
                Path(d), model, optimizer, scheduler, expected_preprocessor=prep.fingerprint, rank=rank
            )
        state.epoch, state.step, state.step_in_epoch = resume.epoch, resume.step, resume.step_in_epoch
        state.micro_batch_size = min(resume.micro_batch_size, per_rank)
    guard = bool((config.get("memory") or {}).get("oom_guard", False))
    # With the guard, no collective may run inside a step's forward/backward (a rank retrying
    # after an OOM would mismatch it): no per-forward buffer broadcast, one explicit
    # gradient all-reduce per step (see runtime.gpu._oom).
    kwargs = {"broadcast_buffers": False} if guard and world > 1 else {}
    state.model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs=kwargs or None)
    state.optimizer = optimizer
    device = ray.train.torch.get_device()
    loss_fn = _loss_fn(task)
    precision: str = config.get("precision", "fp32")
    every: int | None = config.get("checkpoint_every_steps")
    train_shard = ray.train.get_dataset_shard("train")
    valid_shard = ray.train.get_dataset_shard("valid")
    callbacks = CallbackList([*default_callbacks(config), *config.get("callbacks", [])])
    agree = micro_batch_agreement(world) if guard else None

    def report(metrics: dict[str, float], epoch_done: bool) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            if rank == 0:
                save_checkpoint(
                    Path(tmp),
                    state.model,
                    optimizer,
                    scheduler,
                    rank=rank,
                    epoch=state.epoch + 1 if epoch_done else state.epoch,
                    step=state.step,
                    step_in_epoch=0 if epoch_done else state.step_in_epoch,
                    micro_batch_size=state.micro_batch_size,
                    preprocessor_json=config["preprocessor"],
                    preprocessor_fingerprint=prep.fingerprint,
                )
                callbacks.on_checkpoint(state, Path(tmp))
            else:  # the other ranks add their RNG states; Ray Train merges the directories
                save_rng_state(Path(tmp), rank)
            ckpt = ray.train.Checkpoint.from_directory(tmp)
            memory = state.extra.get("memory") or {}
            ray.train.report({**metrics, **{f"memory/{k}": v for k, v in memory.items()}}, checkpoint=ckpt)

    callbacks.on_run_start(state)
    state.model.train()
    while state.epoch < epochs:
        callbacks.on_epoch_start(state)
        total, rows = 0.0, 0
        batches = train_shard.iter_batches(
            batch_size=per_rank,
            batch_format="numpy",
            local_shuffle_buffer_size=max(per_rank * 8, 1024),
            local_shuffle_seed=seed * 100_003 + state.epoch * 101 + rank,
        )
        for i, batch in enumerate(batches):
            if i < state.step_in_epoch:
                continue  # resumed mid-epoch: these steps are in the checkpoint already
            if guard:
                loss = guarded_step(state, batch, loss_fn, task, target_scale, device, precision, callbacks, agree)
            else:
                loss = train_step(state, batch, loss_fn, task, target_scale, device, precision)
            if scheduler is not None:
                scheduler.step()
            state.step += 1
            state.step_in_epoch += 1
            n = len(batch[LABEL])
            state.last_loss = loss / n
            total += loss
            rows += n
            callbacks.on_step_end(state)
            if every and state.step % every == 0:
                report({"epoch": state.epoch, "step": state.step, "train_loss": state.last_loss}, epoch_done=False)
        total, n_rows = _all_reduce_sum([total, rows])
        state.metrics = {
            "train_loss": total / max(n_rows, 1),
            # in micro-batches: a size that fits with gradients fits without them
            **_evaluate(state.model, valid_shard, loss_fn, task, target_scale, device, state.micro_batch_size),
        }
        callbacks.on_epoch_end(state)
        report({"epoch": state.epoch, "step": state.step, **state.metrics}, epoch_done=True)
        state.epoch += 1
        state.step_in_epoch = 0
    callbacks.on_run_end(state)
