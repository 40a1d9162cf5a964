"""Named events of the training loop, and the one callback base that hooks them.

The worker loop, as pseudocode (``state`` is the :class:`LoopState` every hook receives)::

    on_run_start                      model, optimizer built; checkpoint (if any) restored
    for epoch in range(state.epoch, epochs):
        on_epoch_start
        for each global step (one effective batch on this rank):
            for each micro-batch of it:          # gradient accumulation
                forward, backward                # an exception here -> on_oom (if OOM)
            optimizer step, scheduler step
            on_step_end                          # state.step counts optimizer steps
            if checkpoint due (every N steps): on_checkpoint, then report
        evaluate on the holdout shard (all-reduced)
        on_epoch_end                             # state.metrics holds the epoch's metrics
        on_checkpoint, then report              # per-epoch checkpoint
    on_run_end

Memory tracking, metrics logging and the OOM guard plug in here rather than being written
into the loop. A callback that returns ``True`` from :meth:`Callback.on_oom` claims the
error as handled (the loop then retries the step with whatever the callback changed, e.g.
a smaller micro-batch); otherwise the error propagates.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class Event(str, enum.Enum):
    RUN_START = "on_run_start"
    EPOCH_START = "on_epoch_start"
    STEP_END = "on_step_end"
    EPOCH_END = "on_epoch_end"
    CHECKPOINT = "on_checkpoint"
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
    last_loss: float = float("nan")
    metrics: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # free space for callbacks

    @property
    def accumulation_steps(self) -> int:
        return -(-self.batch_size // self.micro_batch_size)


class Callback:
    """Override any subset of the hooks; each receives the loop state."""

    def on_run_start(self, state: LoopState) -> None: ...
    def on_epoch_start(self, state: LoopState) -> None: ...
    def on_step_end(self, state: LoopState) -> None: ...
    def on_epoch_end(self, state: LoopState) -> None: ...
    def on_checkpoint(self, state: LoopState, directory: Path) -> None: ...
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

    def on_epoch_end(self, state: LoopState) -> None:
        self.fire(Event.EPOCH_END, state)

    def on_checkpoint(self, state: LoopState, directory: Path) -> None:
        self.fire(Event.CHECKPOINT, state, directory)

    def on_run_end(self, state: LoopState) -> None:
        self.fire(Event.RUN_END, state)

    def on_oom(self, state: LoopState, error: BaseException) -> bool:
        return any([cb.on_oom(state, error) for cb in self.callbacks])
