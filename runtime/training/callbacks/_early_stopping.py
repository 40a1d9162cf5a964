"""Early stopping: stop when the validation metric stops improving, keep the best epoch's weights.

Every rank sees the same all-reduced validation metrics, so every rank decides the same way
at the same epoch. The best weights are kept in memory (a CPU copy) and in each checkpoint
(``best_weights.safetensors`` + ``early_stopping.json``), so a restarted worker group resumes
the same decision (a group restarted after the stop stops again). At the last epoch,
stopped or not, the best epoch's weights go back into the model, so the final checkpoint
(and the packaged model) is the best epoch's; its validation metrics are reported as
``best_valid_*`` beside the last epoch's ``valid_*``.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from runtime.errors import ConfigError
from runtime.training.callbacks._base import Callback, LoopState

logger = logging.getLogger(__name__)

BEST_WEIGHTS, STATE_FILE = "best_weights.safetensors", "early_stopping.json"


class EarlyStopping(Callback):
    def __init__(self, metric: str, higher_is_better: bool, patience: int, min_delta: float = 0.0) -> None:
        if patience < 1:
            raise ConfigError(f"early_stopping.patience ({patience}) must be >= 1 epoch")
        self.metric, self.higher_is_better = metric, higher_is_better
        self.patience, self.min_delta = patience, min_delta
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.bad_epochs = 0
        self.stopped_epoch: int | None = None
        self.best_metrics: dict[str, float] = {}  # the best epoch's validation metrics
        self._weights: dict[str, Any] | None = None

    def _improved(self, value: float) -> bool:
        if math.isnan(value):
            return False
        if self.best is None:
            return True
        delta = value - self.best if self.higher_is_better else self.best - value
        return delta > self.min_delta

    def on_epoch_end(self, state: LoopState) -> None:
        if self.metric not in state.metrics:
            raise ConfigError(
                f"training.early_stopping.metric {self.metric!r} is not a validation metric of this run; "
                f"it reports {', '.join(sorted(k for k in state.metrics if k.startswith('valid_')))}"
            )
        value = float(state.metrics[self.metric])
        if self._improved(value):
            self.best, self.best_epoch, self.bad_epochs = value, state.epoch, 0
            self.best_metrics = {k: float(v) for k, v in state.metrics.items() if k.startswith("valid_")}
            self._weights = {k: v.detach().cpu().clone() for k, v in _module(state).state_dict().items()}
        else:
            self.bad_epochs += 1
        last = state.epoch == state.epochs - 1
        if self.bad_epochs >= self.patience and not last:
            state.stop_requested = True
            self.stopped_epoch = state.epoch
            logger.info(
                "early stopping at epoch %d: %s has not improved on %.6g (epoch %d) for %d epoch(s)",
                state.epoch,
                self.metric,
                self.best,
                self.best_epoch,
                self.patience,
            )
        if (state.stop_requested or last) and self._weights is not None and self.best_epoch != state.epoch:
            _module(state).load_state_dict(self._weights)  # the final checkpoint holds the best epoch
        if state.stop_requested or last:
            state.metrics.update({f"best_{k}": v for k, v in self.best_metrics.items()})
        state.metrics["early_stopping/best_epoch"] = float(self.best_epoch if self.best_epoch is not None else -1)
        state.metrics[f"early_stopping/best_{self.metric}"] = float("nan") if self.best is None else self.best
        if self.stopped_epoch is not None:
            state.metrics["early_stopping/stopped_epoch"] = float(self.stopped_epoch)

    def on_checkpoint(self, state: LoopState, directory: Path) -> None:
        from safetensors.torch import save_file

        if self._weights is not None:
            save_file({k: v.contiguous() for k, v in self._weights.items()}, str(directory / BEST_WEIGHTS))
        (directory / STATE_FILE).write_text(
            json.dumps(
                {
                    "best": self.best,
                    "best_epoch": self.best_epoch,
                    "bad_epochs": self.bad_epochs,
                    "stopped_epoch": self.stopped_epoch,
                    "best_metrics": self.best_metrics,
                }
            )
        )

    def on_resume(self, state: LoopState, directory: Path) -> None:
        from safetensors.torch import load_file

        if not (directory / STATE_FILE).exists():
            return
        saved = json.loads((directory / STATE_FILE).read_text())
        self.best, self.best_epoch, self.bad_epochs = saved["best"], saved["best_epoch"], saved["bad_epochs"]
        self.stopped_epoch, self.best_metrics = saved.get("stopped_epoch"), saved.get("best_metrics", {})
        if self.stopped_epoch is not None:
            state.stop_requested = True  # the checkpoint was taken at the stop: the run is over
        if (directory / BEST_WEIGHTS).exists():
            self._weights = load_file(str(directory / BEST_WEIGHTS))


def _module(state: LoopState) -> Any:
    return getattr(state.model, "module", state.model)  # the model inside DDP
