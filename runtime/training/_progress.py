"""What a training job shows while it runs: per-step progress with the loss and rows/s, each
epoch's figures, and one line when a worker fails and the run resumes.

Three parts, joined by one of Ray's own queues (:class:`ProgressChannel`, a
``ray.util.queue.Queue``: an actor with no CPU reservation):

- rank 0 of the workers (:class:`ProgressReporter`, a loop callback) posts the step, the last
  step's loss and the rows/s about once a second, each epoch's metrics at its end, and, when
  the loop started from a checkpoint, which one;
- Ray Train's controller (:func:`failure_notices`, a Ray Train ``UserCallback``) posts which
  ranks failed and why;
- the driver (:class:`TrainingDisplay`) drains the queue in a thread and shows it: a live bar
  on a terminal (rich), plain lines otherwise (a submitted job's log), every line also written
  to the run's log file.

Progress is lossy by design: a full or unreachable queue drops an event and never slows or
fails training.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from runtime.training.callbacks import Callback, LoopState

logger = logging.getLogger(__name__)

__all__ = [
    "ProgressChannel",
    "ProgressReporter",
    "TrainingDisplay",
    "failure_line",
    "failure_notices",
    "step_line",
]

STEP_INTERVAL_S = 1.0  # rank 0 posts a step event at most this often
RESUMED_FROM = "resumed_from"  # LoopState.extra: the checkpoint the loop started from


class ProgressChannel:
    """Events from the workers and the controller to the driver: a ``ray.util.queue.Queue``
    (picklable: the workers and the controller get it in their configs)."""

    def __init__(self, maxsize: int = 10_000) -> None:
        from ray.util.queue import Queue

        self.queue = Queue(maxsize=maxsize, actor_options={"num_cpus": 0})

    def post(self, event: dict[str, Any]) -> None:
        """Enqueue ``event``; a full or gone queue drops it (progress never fails training)."""
        with contextlib.suppress(Exception):  # the actor gone with its driver
            # fire and forget: the caller never waits on the queue (a full queue drops it there);
            # one caller's calls to an actor run in order
            actor: Any = self.queue.actor
            actor.put_nowait.remote(event)

    def drain(self) -> list[dict[str, Any]]:
        try:
            size = self.queue.qsize()
            return list(self.queue.get_nowait_batch(size)) if size else []
        except Exception:
            return []

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.queue.shutdown(force=True)


class ProgressReporter(Callback):
    """Rank 0's part: a ``step`` event about every ``interval_s`` (the loss of the last step and
    the rows/s since the previous event, over all ranks), an ``epoch`` event with the epoch's
    metrics, and a ``resume`` event when the loop started from a checkpoint."""

    def __init__(
        self, channel: ProgressChannel, interval_s: float = STEP_INTERVAL_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.channel, self.interval_s, self.clock = channel, interval_s, clock
        self._last_t = 0.0
        self._rows = 0
        self._epoch_t = 0.0
        self._epoch_rows = 0
        self._warm = False

    def _base(self, state: LoopState) -> dict[str, Any]:
        return {
            "epoch": state.epoch,
            "epochs": state.epochs,
            "step": state.step,
            "step_in_epoch": state.step_in_epoch,
            "steps_per_epoch": state.extra.get("steps_per_epoch"),
            "world_size": state.world_size,
        }

    def on_run_start(self, state: LoopState) -> None:
        self._last_t = self._epoch_t = self.clock()
        self._warm = False  # the attempt's first step is not a rate (it waits for the first batch)
        if state.rank == 0:
            self.channel.post({"kind": "start", **self._base(state), "resumed_from": state.extra.get(RESUMED_FROM)})

    def on_epoch_start(self, state: LoopState) -> None:
        self._epoch_t, self._epoch_rows = self.clock(), 0

    def on_step_end(self, state: LoopState) -> None:
        rows = int(state.last_count) * state.world_size  # the ranks take equal shards of a step
        self._rows += rows
        self._epoch_rows += rows
        if state.rank == 0 and (self.clock() - self._last_t >= self.interval_s or state.step_in_epoch == 1):
            self._post_step(state)

    def on_checkpoint(self, state: LoopState, directory: Path) -> None:
        if state.rank == 0:  # where a failure can resume from: worth saying where the run was
            self._post_step(state)

    def _post_step(self, state: LoopState) -> None:
        now = self.clock()
        loss = float(state.last_loss)  # a 0-dim tensor: waits for the device (about once a second)
        rate = self._rows / (now - self._last_t) if self._warm and now > self._last_t and self._rows else None
        self._warm = True
        self.channel.post({"kind": "step", **self._base(state), "loss": loss, "rows_per_s": rate})
        self._last_t, self._rows = now, 0

    def on_epoch_end(self, state: LoopState) -> None:
        if state.rank != 0:
            return
        seconds = max(self.clock() - self._epoch_t, 1e-9)
        metrics = {k: float(v) for k, v in state.metrics.items() if isinstance(v, int | float)}
        self.channel.post(
            {
                "kind": "epoch",
                **self._base(state),
                "metrics": metrics,
                "seconds": seconds,
                "rows_per_s": self._epoch_rows / seconds,
            }
        )


def _failure_notices_class() -> type:
    from ray.train.v2.api.callback import UserCallback

    class FailureNoticesImpl(UserCallback):
        """Ray Train controller callback: which ranks failed, and with what."""

        def __init__(self, channel: ProgressChannel) -> None:
            self.channel = channel

        def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
            try:  # Ray Train calls this without a guard: an error here would fail the controller
                errors = {int(rank): _short_error(exc) for rank, exc in sorted(worker_exceptions.items())}
                self.channel.post({"kind": "failure", "errors": errors, "t": time.time()})
            except Exception:
                logger.exception("could not post a worker failure to the job's display")

    return FailureNoticesImpl


def failure_notices(channel: ProgressChannel) -> Any:
    """A Ray Train ``UserCallback`` for ``RunConfig(callbacks=...)`` posting each worker failure
    (its class is built on first use: Ray Train is imported only by jobs that train)."""
    return _failure_notices_class()(channel)


def _root_cause(exc: BaseException) -> BaseException:
    """What is inside Ray's wrappers: a failed health check's failure (a dead worker's
    ``ActorDiedError``), a task error's user exception, an explicit ``raise ... from``."""
    seen: set[int] = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        inner = getattr(exc, "health_check_failure", None) or getattr(exc, "cause", None) or exc.__cause__
        if not isinstance(inner, BaseException):
            break
        exc = inner
    return exc


def _short_error(exc: BaseException) -> str:
    """The exception's type and first line, short: what killed the worker, not its traceback."""
    from runtime.redact import redact

    cause = _root_cause(exc)
    lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
    first = next((line for line in lines if not line.startswith(("Traceback", 'File "', "^"))), "")
    text = f"{type(cause).__name__}: {first}" if first else type(cause).__name__
    return redact(text if len(text) <= 200 else text[:197] + "...")


# ----------------------------------------------------------------------------- the driver


def _rate(rows_per_s: float | None) -> str:
    return "-" if rows_per_s is None else f"{rows_per_s:,.0f} rows/s"


def _loss(value: Any) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


def step_line(event: dict[str, Any]) -> str:
    """``epoch 2/5  step 340/800  loss 0.4123  12,345 rows/s`` (step within the epoch)."""
    total = event.get("steps_per_epoch")
    steps = f"{event['step_in_epoch']}/{total}" if total else str(event["step_in_epoch"])
    return (
        f"epoch {event['epoch'] + 1}/{event['epochs']}  step {steps}  loss {_loss(event.get('loss'))}  "
        f"{_rate(event.get('rows_per_s'))}"
    )


def epoch_line(event: dict[str, Any]) -> str:
    metrics = event.get("metrics", {})
    shown = "  ".join(
        f"{k} {v:.4f}" for k, v in metrics.items() if k not in ("epoch", "step") and not k.startswith("initial_")
    )
    return (
        f"epoch {event['epoch'] + 1}/{event['epochs']} done in {event['seconds']:.1f}s "
        f"({_rate(event.get('rows_per_s'))}, step {event['step']}): {shown}"
    )


def failure_line(
    errors: dict[int, str],
    last: dict[str, Any] | None,
    resumed: dict[str, Any] | None,
    failures: int,
    max_failures: int,
) -> str:
    """One line for one failure: which ranks, at which step, what it resumed from, restarts left."""
    ranks = ", ".join(f"rank {rank} ({error})" for rank, error in sorted(errors.items()))
    where = (
        f" (last reported: epoch {last['epoch'] + 1}/{last['epochs']}, step {last['step']})"
        if last
        else " before its first reported step"
    )
    if max_failures < 0:
        left = "restarts unlimited (max_failures -1)"
    else:
        remaining = max(max_failures - failures, 0)
        left = f"{remaining} restart{'s' if remaining != 1 else ''} left of {max_failures}"
    if resumed is None:
        then = "not resumed" if max_failures >= 0 and failures > max_failures else "restarting"
    elif resumed.get("resumed_from"):
        then = (
            f"resumed from checkpoint {resumed['resumed_from']} (epoch {resumed['epoch'] + 1}, step {resumed['step']})"
        )
    else:
        then = "restarted from the beginning (no checkpoint yet)"
    return f"worker failure: {ranks}{where}; {then}; {left}"


class TrainingDisplay:
    """The driver's view of a running job. ``with TrainingDisplay(...) as display:`` around
    ``trainer.fit()``; it drains ``channel`` every ``poll_s`` in a thread.

    ``live`` (default: stdout is a terminal) shows a rich progress bar with the loss and rows/s,
    and prints epoch and failure lines above it; otherwise each is a plain line through ``out``
    (a step line at most every ``line_interval_s``). Epoch and failure lines always go through
    ``out`` (on a live display rich shows them above the bar); ``log_file`` gets every step line.
    """

    def __init__(
        self,
        channel: ProgressChannel,
        *,
        max_failures: int,
        out: Callable[[str], None] = print,
        live: bool | None = None,
        log_file: Path | None = None,
        poll_s: float = 0.5,
        line_interval_s: float = 10.0,
        console: Any = None,
    ) -> None:
        self.channel, self.max_failures, self.out = channel, max_failures, out
        self.live = sys.stdout.isatty() if live is None else live
        self.log_file, self.poll_s, self.line_interval_s = log_file, poll_s, line_interval_s
        self.failures = 0
        self.lines: list[str] = []  # what was shown, in order (the failure lines are what tests read)
        self._last_step: dict[str, Any] | None = None
        self._pending: dict[int, str] | None = None  # a failure waiting for its resume
        self._pending_at: dict[str, Any] | None = None
        self._last_line_t = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._progress: Any = None
        self._task: Any = None
        self._console = console  # the rich Console a live display draws on (default: rich's)

    # -- lifecycle
    def __enter__(self) -> TrainingDisplay:
        if self.live:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}  {task.fields[rate]}"),
                TimeElapsedColumn(),
                transient=True,
                console=self._console,
            )
            self._task = self._progress.add_task("starting", total=None, loss="-", rate="")
            self._progress.start()
        self._thread = threading.Thread(target=self._run, name="skewless-training-display", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.handle(self.channel.drain())
        if self._pending is not None:  # the run ended on this failure
            self._emit(failure_line(self._pending, self._pending_at, None, self.failures, self.max_failures))
            self._pending = None
        if self._progress is not None:
            self._progress.stop()

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.handle(self.channel.drain())
            except Exception:  # the display must never take the job down
                logger.exception("training display: an event could not be shown")

    # -- events
    def handle(self, events: list[dict[str, Any]]) -> None:
        for event in events:
            kind = event.get("kind")
            if kind == "step":
                self._step(event)
            elif kind == "epoch":
                self._emit(epoch_line(event))
            elif kind == "failure":
                self._failure(event)
            elif kind == "start":
                self._start(event)

    def _step(self, event: dict[str, Any]) -> None:
        self._last_step = event
        if self._progress is not None:
            self._progress.update(
                self._task,
                description=f"epoch {event['epoch'] + 1}/{event['epochs']}",
                completed=event["step_in_epoch"],
                total=event.get("steps_per_epoch"),
                loss=_loss(event.get("loss")),
                rate=_rate(event.get("rows_per_s")),
            )
            self._log(step_line(event))
            return
        now = time.monotonic()
        if now - self._last_line_t >= self.line_interval_s:
            self._last_line_t = now
            self._emit(step_line(event))
        else:
            self._log(step_line(event))

    def _failure(self, event: dict[str, Any]) -> None:
        if self._pending is not None:  # a second failure before the first one resumed
            self._emit(failure_line(self._pending, self._pending_at, None, self.failures, self.max_failures))
        self.failures += 1
        self._pending = {int(k): v for k, v in event["errors"].items()}
        self._pending_at = self._last_step

    def _start(self, event: dict[str, Any]) -> None:
        if self._pending is not None:
            self._emit(failure_line(self._pending, self._pending_at, event, self.failures, self.max_failures))
            self._pending = None
        elif event.get("resumed_from"):  # a run resumed from an earlier attempt's checkpoint
            self._emit(
                f"resumed from checkpoint {event['resumed_from']} (epoch {event['epoch'] + 1}, step {event['step']})"
            )

    # -- output
    def _emit(self, line: str) -> None:
        """A line for the caller's ``out`` (a live bar takes what is printed meanwhile and shows it
        above itself); the driver's ``out`` writes the job log too."""
        self.lines.append(line)
        self.out(line)

    def _log(self, line: str) -> None:
        if self.log_file is None:
            return
        try:
            with self.log_file.open("a") as f:
                f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {line}\n")
        except OSError:
            pass
