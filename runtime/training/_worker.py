"""The per-worker training loop Ray Train runs on every rank, for every job.

What the driver hands a worker is one frozen, versioned :class:`WorkerConfig` (no dict read
with defaults); the loop builds its callbacks from it (:func:`build_callbacks`), and the
job-specific part is the config's :class:`~runtime.training._objective.Objective` (what a step
minimizes, how validation is scored) and its data (where batches come from, see
:mod:`runtime.training._sources`). The events the loop fires are documented in
:mod:`runtime.training.callbacks._base`; ``on_run_end`` runs in a ``finally``.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from runtime.registry import RunLogger
from runtime.training._checkpoint import load_checkpoint, save_checkpoint, save_rng_state
from runtime.training._objective import Objective
from runtime.training._progress import RESUMED_FROM
from runtime.training._step import (
    guarded_step,
    make_optimizer,
    make_scheduler,
    micro_batch_agreement,
    train_step,
)
from runtime.training.callbacks import (
    Callback,
    CallbackList,
    EarlyStopping,
    LoopState,
    MemoryTracker,
    MlflowMetrics,
    OomGuard,
    WatchdogClient,
    all_reduce_sum,
)

WORKER_MLFLOW_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}

# In every report: 1.0 on the run's last one (the last epoch, or early stopping's), so a Tune
# scheduler is not asked to judge a trial that has finished training (see runtime.training._tune).
LAST_REPORT = "last_report"


@dataclass(frozen=True)
class WorkerMemory:
    """The memory side of a worker: tracking, the OOM guard, the host-memory watchdog."""

    track: bool = True
    sample_interval_s: float = 1.0
    oom_guard: bool = True
    record_history: str = "after_first_oom"  # always | after_first_oom | never
    diagnostics_dir: str | None = None  # OOM bundles (a path or a pyarrow.fs URI)
    report_dir: str | None = None  # the memory timeline, plot and peaks
    watchdog_run: str | None = None  # the watchdog actors' run id; None: no watchdog
    host_diagnostics_dir: str | None = None


@dataclass(frozen=True)
class EarlyStop:
    metric: str
    higher_is_better: bool
    patience: int
    min_delta: float


@dataclass(frozen=True)
class WorkerConfig:
    """Everything a training worker needs, validated by the driver (frozen, versioned)."""

    VERSION: ClassVar[int] = 1

    objective: Objective
    data: Any  # InMemoryData | StreamingData | TokenData
    model: dict[str, Any]  # the packaged model's model.json: build_model() rebuilds it
    optimizer: Any  # OptimizerConfig (frozen)
    seed: int
    epochs: int
    batch_size: int  # global, per optimizer step
    run_fingerprint: str  # a checkpoint of another run is refused
    micro_batch_size: int | None = None
    precision: str = "fp32"
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    grad_clip: float = 0.0
    compile: bool = False
    checkpoint_every_steps: int | None = None
    checkpoint_each_epoch: bool = True  # False: each epoch reports metrics, the last a checkpoint too
    evaluate_at_start: bool = False  # the LM reports the loss before the first step
    early_stopping: EarlyStop | None = None
    memory: WorkerMemory = WorkerMemory()
    run_logger: RunLogger | None = None
    checkpoint_files: dict[str, str] = field(default_factory=dict)  # e.g. preprocessor.json
    callbacks: tuple[Callback, ...] = ()  # added after the built-in ones
    progress: Any = None  # a ProgressChannel: rank 0 posts the job's progress to the driver
    version: int = VERSION


@dataclass(frozen=True)
class StreamingData:
    """The splits as Ray Train dataset shards named ``train`` and ``validation``."""

    train_rows: int


@dataclass(frozen=True)
class TokenData:
    """A token array in the object store (one read-only copy per node) and how to cut it."""

    tokens: Any  # ObjectRef of a uint8/int array
    valid_fraction: float
    seq_len: int
    steps: int
    log_every: int
    eval_batches: int
    on_device: bool = True  # on a GPU: the tokens there, windows cut there (no copy per step)


def build_callbacks(config: WorkerConfig) -> list[Callback]:
    """The built-in callbacks a config asks for, then its own; the metrics logger last, so it
    logs what the others added to ``state.metrics``."""
    memory = config.memory
    callbacks: list[Callback] = []
    if memory.track:
        callbacks.append(MemoryTracker(memory.sample_interval_s, memory.report_dir, config.run_logger))
    if memory.watchdog_run and memory.host_diagnostics_dir:
        callbacks.append(WatchdogClient(memory.watchdog_run, memory.host_diagnostics_dir))
    if memory.oom_guard:
        from runtime.memory import private_diagnostics_dir

        context = {  # what the bundle records of the run (no tracking URI: it may carry credentials)
            "seed": config.seed,
            "epochs": config.epochs,
            "batch_size": config.batch_size,
            "precision": config.precision,
            "model": config.model,
        }
        callbacks.append(
            OomGuard(
                memory.diagnostics_dir or str(private_diagnostics_dir()),
                run_logger=config.run_logger,
                record_history=memory.record_history,
                context=context,
            )
        )
    if config.early_stopping is not None:
        e = config.early_stopping
        callbacks.append(EarlyStopping(e.metric, e.higher_is_better, e.patience, e.min_delta))
    callbacks += list(config.callbacks)
    if config.run_logger is not None:
        callbacks.append(MlflowMetrics(config.run_logger))
    if config.progress is not None:  # last: an epoch's event carries every callback's metrics
        from runtime.training._progress import ProgressReporter

        callbacks.append(ProgressReporter(config.progress))
    return callbacks


def _source(config: WorkerConfig, rank: int, world: int, per_rank: int, device: Any = None) -> Any:
    from runtime.training._ingest import InMemoryData
    from runtime.training._sources import InMemorySource, StreamingSource, TokenSource

    data = config.data
    if isinstance(data, InMemoryData):
        return InMemorySource(data, rank, world, per_rank, config.seed)
    if isinstance(data, StreamingData):
        return StreamingSource(data.train_rows, rank, world, per_rank, config.seed)
    if isinstance(data, TokenData):
        import ray

        from runtime.training._lm import split_tokens

        tokens = ray.get(data.tokens) if isinstance(data.tokens, ray.ObjectRef) else data.tokens
        train, valid = split_tokens(tokens, data.valid_fraction, data.seq_len)
        on = device if data.on_device and getattr(device, "type", None) == "cuda" else None
        return TokenSource(
            train, valid, rank, per_rank, data.seq_len, data.steps, data.log_every, data.eval_batches, config.seed, on
        )
    raise TypeError(f"unknown worker data {type(data).__name__}")


def evaluate(model: Any, source: Any, objective: Objective, device: Any, micro_batch_size: int) -> dict[str, float]:
    """Validation metrics over every rank's share, all-reduced (every rank gets the same).

    Forward passes take ``micro_batch_size`` rows at most: a size that fits with gradients
    fits without them (after the OOM guard halved it, too)."""
    import torch

    model.eval()
    sums: dict[str, float] = {}
    with torch.inference_mode():
        for batch in source.eval_batches():
            for start in range(0, objective.rows(batch), micro_batch_size):
                micro = {k: v[start : start + micro_batch_size] for k, v in batch.items()}
                for key, value in objective.eval_sums(model, micro, device).items():
                    sums[key] = sums.get(key, 0.0) + value
    model.train()
    keys = objective.eval_keys()  # the same vector on every rank, whatever rows it had
    reduced = all_reduce_sum([sums.get(k, 0.0) for k in keys], device)
    return objective.eval_metrics(dict(zip(keys, reduced, strict=True)))


def train_loop_per_worker(loop_config: dict[str, Any]) -> dict[str, Any] | None:
    """The Ray Train worker function: ``loop_config["worker"]`` is a :class:`WorkerConfig`.
    Rank 0 returns the run's summary (the metrics history), which Ray Train V2 keeps."""
    import ray.train
    import ray.train.torch
    import torch

    from runtime.errors import ConfigError
    from runtime.models import build_model

    config: WorkerConfig = loop_config["worker"]
    if getattr(config, "version", None) != WorkerConfig.VERSION:
        raise ConfigError(
            f"worker config version {getattr(config, 'version', None)!r} is not {WorkerConfig.VERSION}: "
            "the driver and the workers run different skewless versions"
        )
    # Batches may be zero-copy, read-only views of Ray's object store; the model reads its
    # input and never writes it, so torch's warning about non-writable arrays is noise here.
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)
    # A tracking server that is down must cost an epoch seconds, not MLflow's default minutes of
    # HTTP retries: the run logger retries on its own and holds the values for the next call.
    for key, value in WORKER_MLFLOW_ENV.items():
        os.environ.setdefault(key, value)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(config.seed)  # identical initial weights on every rank
    np.random.seed(config.seed + rank)
    per_rank = max(1, config.batch_size // world)
    device = ray.train.torch.get_device()
    source = _source(config, rank, world, per_rank, device)
    objective = config.objective

    base = build_model(config.model)
    torch.manual_seed(config.seed * 1_000_003 + rank)  # then one stream per rank (dropout masks)
    opt = config.optimizer
    optimizer = make_optimizer(
        base, opt.name, opt.lr, opt.weight_decay, opt.momentum, tuple(opt.betas), fused=device.type == "cuda"
    )
    total_steps = source.total_steps(config.epochs)
    scheduler = make_scheduler(optimizer, config.lr_schedule, total_steps, config.warmup_steps, config.min_lr_ratio)
    state = LoopState(
        rank=rank,
        world_size=world,
        epochs=config.epochs,
        batch_size=per_rank,
        micro_batch_size=min(config.micro_batch_size or per_rank, per_rank),
    )
    state.extra["steps_per_epoch"] = -(-total_steps // max(config.epochs, 1)) if total_steps else None
    callbacks = CallbackList(build_callbacks(config))
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        state.extra[RESUMED_FROM] = Path(checkpoint.path).name  # checkpoint_<time>: the run's storage has it
        with checkpoint.as_directory() as d:
            resume = load_checkpoint(
                Path(d), base, optimizer, scheduler, expected_fingerprint=config.run_fingerprint, rank=rank
            )
            callbacks.on_resume(state, Path(d))
        state.epoch, state.step, state.step_in_epoch = resume.epoch, resume.step, resume.step_in_epoch
        state.micro_batch_size = min(resume.micro_batch_size, per_rank)
    guard = config.memory.oom_guard
    # With the guard, no collective may run inside a step's forward/backward (a rank retrying
    # after an OOM would mismatch it): no per-forward buffer broadcast, one explicit
    # gradient all-reduce per step (see runtime.training.callbacks._oom).
    kwargs = {"broadcast_buffers": False} if guard and world > 1 else {}
    model = ray.train.torch.prepare_model(base, parallel_strategy_kwargs=kwargs or None)
    state.model = torch.compile(model) if config.compile else model
    state.optimizer = optimizer
    agree = micro_batch_agreement(world) if guard else None
    history: list[dict[str, float]] = []

    def report(metrics: dict[str, float], epoch_done: bool, last: bool = False) -> None:
        memory = state.extra.get("memory") or {}
        reported = {**metrics, **{f"memory/{k}": v for k, v in memory.items()}, LAST_REPORT: float(last)}
        if epoch_done and not last and not config.checkpoint_each_epoch:
            ray.train.report(reported)  # metrics only: this job checkpoints at the end
            return
        with tempfile.TemporaryDirectory() as tmp:
            if rank == 0:
                save_checkpoint(
                    Path(tmp),
                    base,
                    optimizer,
                    scheduler,
                    rank=rank,
                    epoch=state.epoch + 1 if epoch_done else state.epoch,
                    step=state.step,
                    step_in_epoch=0 if epoch_done else state.step_in_epoch,
                    micro_batch_size=state.micro_batch_size,
                    run_fingerprint=config.run_fingerprint,
                    extra_files=config.checkpoint_files,
                )
                callbacks.on_checkpoint(state, Path(tmp))
            else:  # the other ranks add their RNG states; Ray Train merges the directories
                save_rng_state(Path(tmp), rank)
            ray.train.report(reported, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    initial: dict[str, float] = {}
    try:
        if config.evaluate_at_start and state.step == 0:
            first = evaluate(base, source, objective, device, state.micro_batch_size)
            initial = {f"initial_{k}": v for k, v in first.items()}
        callbacks.on_run_start(state)
        state.model.train()
        while state.epoch < config.epochs and not state.stop_requested:
            callbacks.on_epoch_start(state)
            total: Any = 0.0  # a device tensor once a step ran: read once an epoch (no per-step sync)
            count = 0
            for batch in source.batches(state.epoch, skip=state.step_in_epoch):
                if guard:
                    loss = guarded_step(
                        state, batch, objective, device, config.precision, callbacks, agree, config.grad_clip
                    )
                else:
                    loss = train_step(state, batch, objective, device, config.precision, config.grad_clip)
                if scheduler is not None:
                    scheduler.step()
                state.step += 1
                state.step_in_epoch += 1
                n = objective.count(batch)
                state.last_loss, state.last_count = loss / n, n  # a 0-dim tensor: float() waits for the GPU
                total = total + loss
                count += n
                callbacks.on_step_end(state)
                if config.checkpoint_every_steps and state.step % config.checkpoint_every_steps == 0:
                    mean_loss = float(state.last_loss)
                    report({"epoch": state.epoch, "step": state.step, "train_loss": mean_loss}, epoch_done=False)
            callbacks.on_epoch_train_end(state)
            loss_sum, counted = all_reduce_sum([float(total), count], device)
            state.metrics = {
                "epoch": state.epoch,
                "step": state.step,
                "train_loss": loss_sum / max(counted, 1),
                **(initial if not history else {}),
                # the bare module: no DDP collective in a pass whose length differs by rank
                **evaluate(base, source, objective, device, state.micro_batch_size),
            }
            callbacks.on_epoch_end(state)
            history.append(dict(state.metrics))
            last = state.stop_requested or state.epoch == config.epochs - 1
            report(state.metrics, epoch_done=True, last=last)
            state.epoch += 1
            state.step_in_epoch = 0
    except BaseException as exc:
        state.error = exc
        raise
    finally:
        callbacks.on_run_end(state)
    if rank != 0:
        return None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"history": history, "world_size": world, "device": name}
