"""Named events of the training loop, and the one callback base that hooks them.

The worker loop, as pseudocode (``state`` is the :class:`LoopState` every hook receives)::

    model, optimizer built; the latest checkpoint (if any) restored, then
    on_resume(directory)                  callbacks read their own files from it
    try:
        on_run_start
        for epoch in range(state.epoch, epochs):
            on_epoch_start
            for each global step (one effective batch on this rank):
                for each micro-batch of it:          # gradient accumulation
                    forward, backward                # an exception here -> on_oom (if OOM)
                optimizer step, scheduler step
                on_step_end                          # state.step counts optimizer steps
                if checkpoint due (every N steps): on_checkpoint, then report
            on_epoch_train_end                       # the epoch's steps are done (timers stop here)
            evaluate on the validation split (all-reduced)
            on_epoch_end                             # state.metrics holds the epoch's metrics
            on_checkpoint, then report              # per-epoch checkpoint
            if state.stop_requested: break           # e.g. early stopping
    finally:
        on_run_end                        # always, also when the loop raised (state.error)

Memory tracking, metrics logging, early stopping and the OOM guard plug in here rather than
being written into the loop. A callback that returns ``True`` from :meth:`Callback.on_oom`
claims the error as handled (the loop then retries the step with whatever the callback
changed, e.g. a smaller micro-batch); otherwise the error propagates.

This module knows nothing of the callbacks built on it (they import it, never the reverse).
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


class Event(str, enum.Enum):
    RUN_START = "on_run_start"
    EPOCH_START = "on_epoch_start"
    STEP_END = "on_step_end"
    EPOCH_TRAIN_END = "on_epoch_train_end"
    EPOCH_END = "on_epoch_end"
    CHECKPOINT = "on_checkpoint"
    RESUME = "on_resume"
    OOM = "on_oom"
    RUN_END = "on_run_end"


@dataclass
class LoopState:
    """What the loop knows; callbacks read it and may adjust ``micro_batch_size``."""

    rank: int
    world_size: int
    epochs: int
    batch_size: int  # per rank, per optimizer step (the effective batch / world size)
    micro_batch_size: int  # rows per forward/backward on this rank
    epoch: int = 0
    step: int = 0  # optimizer steps taken so far, over the whole run
    step_in_epoch: int = 0
    model: Any = None
    optimizer: Any = None
    last_loss: Any = float("nan")  # the last step's mean loss: a 0-dim tensor (float() waits for the GPU)
    last_count: int = 0  # what the last step's loss was averaged over: rows, or tokens
    metrics: dict[str, float] = field(default_factory=dict)
    stop_requested: bool = False  # a callback asks the loop to stop after this epoch
    error: BaseException | None = None  # set before on_run_end when the loop raised
    extra: dict[str, Any] = field(default_factory=dict)  # free space for callbacks


class Callback:
    """Override any subset of the hooks; each receives the loop state.

    ``on_run_end`` runs whether the loop finished or raised (``state.error`` tells which),
    so a callback that started something (a thread, a file) stops it there.
    """

    def on_run_start(self, state: LoopState) -> None: ...
    def on_epoch_start(self, state: LoopState) -> None: ...
    def on_step_end(self, state: LoopState) -> None: ...
    def on_epoch_train_end(self, state: LoopState) -> None: ...
    def on_epoch_end(self, state: LoopState) -> None: ...
    def on_checkpoint(self, state: LoopState, directory: Path) -> None: ...
    def on_resume(self, state: LoopState, directory: Path) -> None: ...
    def on_run_end(self, state: LoopState) -> None: ...

    def on_oom(self, state: LoopState, error: BaseException) -> bool:
        """Return True when the error is handled and the step should be retried."""
        return False


class CallbackList(Callback):
    """Fans each event out to the callbacks in order."""

    def __init__(self, callbacks: list[Callback] | None = None) -> None:
        self.callbacks = list(callbacks or [])

    def fire(self, event: Event, state: LoopState, *args: Any) -> None:
        for cb in self.callbacks:
            getattr(cb, event.value)(state, *args)

    def on_run_start(self, state: LoopState) -> None:
        self.fire(Event.RUN_START, state)

    def on_epoch_start(self, state: LoopState) -> None:
        self.fire(Event.EPOCH_START, state)

    def on_step_end(self, state: LoopState) -> None:
        self.fire(Event.STEP_END, state)

    def on_epoch_train_end(self, state: LoopState) -> None:
        self.fire(Event.EPOCH_TRAIN_END, state)

    def on_epoch_end(self, state: LoopState) -> None:
        self.fire(Event.EPOCH_END, state)

    def on_checkpoint(self, state: LoopState, directory: Path) -> None:
        self.fire(Event.CHECKPOINT, state, directory)

    def on_resume(self, state: LoopState, directory: Path) -> None:
        self.fire(Event.RESUME, state, directory)

    def on_run_end(self, state: LoopState) -> None:
        """Every callback's ``on_run_end``, even when one of them raises; the first error is
        raised afterwards unless the loop itself already failed (that error wins)."""
        first: BaseException | None = None
        for cb in self.callbacks:
            try:
                cb.on_run_end(state)
            except Exception as exc:
                logger.exception("%s.on_run_end failed", type(cb).__name__)
                first = first or exc
        if first is not None and state.error is None:
            raise first

    def on_oom(self, state: LoopState, error: BaseException) -> bool:
        return any([cb.on_oom(state, error) for cb in self.callbacks])
