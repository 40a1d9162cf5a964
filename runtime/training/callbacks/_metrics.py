"""Rank 0 logs each epoch's metrics into the driver's MLflow run, through the one run logger."""

from __future__ import annotations

from runtime.registry import RunLogger
from runtime.training.callbacks._base import Callback, LoopState


class MlflowMetrics(Callback):
    """``state.metrics`` at every epoch end, step = epoch. A failing tracking store never stops
    training: :class:`~runtime.registry.RunLogger` retries, holds the values back and carries on."""

    def __init__(self, run_logger: RunLogger) -> None:
        self.run_logger = run_logger

    def on_epoch_end(self, state: LoopState) -> None:
        if state.rank == 0:
            self.run_logger.log_metrics(state.metrics, step=state.epoch)

    def on_run_end(self, state: LoopState) -> None:
        if state.rank == 0:
            self.run_logger.flush()
