"""What a training job shows: rank 0's events, the driver's lines, the failure line, and the
engines' logs kept in the job's log file."""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any

import pytest

from runtime.training._logs import engine_logs
from runtime.training._progress import (
    ProgressReporter,
    TrainingDisplay,
    _short_error,
    epoch_line,
    failure_line,
    step_line,
)
from runtime.training.callbacks import LoopState


class ListChannel:
    """The queue's interface over a list (the real one is a ray.util.queue.Queue)."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def post(self, event: dict[str, Any]) -> None:
        self.events.append(event)

    def drain(self) -> list[dict[str, Any]]:
        out, self.events = self.events, []
        return out


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def _state(rank: int = 0, world: int = 2) -> LoopState:
    state = LoopState(rank=rank, world_size=world, epochs=3, batch_size=64, micro_batch_size=64)
    state.extra["steps_per_epoch"] = 40
    return state


def _steps(reporter: ProgressReporter, state: LoopState, clock: Clock, n: int, dt: float, rows: int = 64) -> None:
    for _ in range(n):
        clock.t += dt
        state.step += 1
        state.step_in_epoch += 1
        state.last_loss, state.last_count = 0.5 / state.step, rows
        reporter.on_step_end(state)


def test_rank_zero_posts_a_step_about_once_a_second_with_the_loss_and_all_ranks_rows() -> None:
    channel, clock = ListChannel(), Clock()
    reporter = ProgressReporter(channel, interval_s=1.0, clock=clock)  # type: ignore[arg-type]
    state = _state()
    reporter.on_run_start(state)
    reporter.on_epoch_start(state)
    _steps(reporter, state, clock, 30, dt=0.125)  # 3.75 s of 1/8 s steps
    start, *steps = channel.drain()
    assert start["kind"] == "start" and start["resumed_from"] is None
    # the epoch's first step, then one a second (every 8th step)
    assert [e["step"] for e in steps] == [1, 9, 17, 25]
    assert steps[0]["rows_per_s"] is None  # the attempt's first step waited for its first batch
    last = steps[-1]
    assert last["loss"] == pytest.approx(0.5 / 25)
    # 8 steps of 64 rows on each of 2 ranks in 1 s
    assert last["rows_per_s"] == pytest.approx(1024.0)
    assert step_line(last) == "epoch 1/3  step 25/40  loss 0.0200  1,024 rows/s"


def test_other_ranks_post_nothing_and_an_epoch_carries_its_metrics() -> None:
    channel, clock = ListChannel(), Clock()
    other = ProgressReporter(channel, clock=clock)  # type: ignore[arg-type]
    state = _state(rank=1)
    other.on_run_start(state)
    _steps(other, state, clock, 20, dt=0.2)
    other.on_epoch_end(state)
    assert channel.drain() == []

    reporter, state = ProgressReporter(channel, clock=clock), _state()  # type: ignore[arg-type]
    reporter.on_run_start(state)
    reporter.on_epoch_start(state)
    _steps(reporter, state, clock, 40, dt=0.05)
    state.metrics = {"epoch": 0, "step": 40, "train_loss": 0.41, "valid_accuracy": 0.8125}
    reporter.on_epoch_end(state)
    epoch = channel.drain()[-1]
    assert epoch["kind"] == "epoch" and epoch["seconds"] == pytest.approx(2.0)
    assert epoch["rows_per_s"] == pytest.approx(40 * 64 * 2 / 2.0)
    assert epoch_line(epoch) == (
        "epoch 1/3 done in 2.0s (2,560 rows/s, step 40): train_loss 0.4100  valid_accuracy 0.8125"
    )


def test_a_checkpoint_posts_where_the_run_is_and_a_resumed_loop_says_from_what() -> None:
    channel, clock = ListChannel(), Clock()
    reporter = ProgressReporter(channel, interval_s=60, clock=clock)  # type: ignore[arg-type]
    state = _state()
    state.epoch, state.step, state.step_in_epoch = 0, 10, 10
    state.extra["resumed_from"] = "checkpoint_2026-12-01_14-00-00.000001"
    reporter.on_run_start(state)
    _steps(reporter, state, clock, 5, dt=0.1)
    reporter.on_checkpoint(state, Path("."))
    start, check = channel.drain()
    assert start == {
        "kind": "start",
        "epoch": 0,
        "epochs": 3,
        "step": 10,
        "step_in_epoch": 10,
        "steps_per_epoch": 40,
        "world_size": 2,
        "resumed_from": "checkpoint_2026-12-01_14-00-00.000001",
    }
    assert check["kind"] == "step" and check["step"] == 15


def _display(channel: ListChannel, max_failures: int, log: Path | None = None) -> tuple[TrainingDisplay, list[str]]:
    out: list[str] = []
    return TrainingDisplay(channel, max_failures=max_failures, out=out.append, live=False, log_file=log), out  # type: ignore[arg-type]


def _step(step: int, epoch: int = 0) -> dict[str, Any]:
    return {
        "kind": "step",
        "epoch": epoch,
        "epochs": 2,
        "step": step,
        "step_in_epoch": step,
        "steps_per_epoch": 24,
        "world_size": 2,
        "loss": 0.5,
        "rows_per_s": 1000.0,
    }


def test_a_worker_failure_and_its_resume_are_one_line(tmp_path: Path) -> None:
    channel = ListChannel()
    display, out = _display(channel, max_failures=2, log=tmp_path / "job.log")
    with display:
        display.handle(
            [
                _step(1),
                _step(10),
                {"kind": "failure", "errors": {"1": "ActorDiedError: The actor died unexpectedly"}},
                {**_step(10), "kind": "start", "resumed_from": "checkpoint_000001"},
            ]
        )
    failures = [line for line in out if line.startswith("worker failure")]
    assert failures == [
        "worker failure: rank 1 (ActorDiedError: The actor died unexpectedly) (last reported: epoch 1/2, step 10); "
        "resumed from checkpoint checkpoint_000001 (epoch 1, step 10); 1 restart left of 2"
    ]
    assert failures[0] not in (tmp_path / "job.log").read_text()  # `out` has it (the driver's tees to the log)


def test_a_failure_that_ends_the_run_says_so_when_the_display_closes() -> None:
    channel = ListChannel()
    display, out = _display(channel, max_failures=0)
    with display:
        channel.post(_step(3))
        channel.post({"kind": "failure", "errors": {"0": "RuntimeError: boom", "1": "ActorDiedError: gone"}})
    assert out[-1] == (
        "worker failure: rank 0 (RuntimeError: boom), rank 1 (ActorDiedError: gone) "
        "(last reported: epoch 1/2, step 3); not resumed; 0 restarts left of 0"
    )


def test_unlimited_restarts_and_a_restart_before_any_checkpoint() -> None:
    line = failure_line({0: "X"}, None, {"resumed_from": None, "epoch": 0, "step": 0}, 5, -1)
    assert line == (
        "worker failure: rank 0 (X) before its first reported step; restarted from the beginning "
        "(no checkpoint yet); restarts unlimited (max_failures -1)"
    )


def test_plain_step_lines_are_throttled_but_all_go_to_the_log(tmp_path: Path) -> None:
    channel = ListChannel()
    out: list[str] = []
    display = TrainingDisplay(
        channel,  # type: ignore[arg-type]
        max_failures=0,
        out=out.append,
        live=False,
        log_file=tmp_path / "job.log",
        line_interval_s=3600,
    )
    display.handle([_step(i) for i in range(1, 6)])
    assert len(out) == 1 and out[0].startswith("epoch 1/2  step 1/24")
    assert (tmp_path / "job.log").read_text().count("loss 0.5000") == 4  # and the one shown went to `out`


def test_a_live_display_draws_a_bar_and_prints_the_lines_above_it() -> None:
    from rich.console import Console

    channel = ListChannel()
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, width=120)
    out: list[str] = []
    display = TrainingDisplay(
        channel,  # type: ignore[arg-type]
        max_failures=1,
        out=out.append,
        live=True,
        poll_s=0.05,
        console=console,
    )
    epoch = {"kind": "epoch", "epoch": 0, "epochs": 2, "step": 24, "seconds": 1.0, "rows_per_s": 10.0}
    with display:
        channel.post(_step(12))
        channel.post({**epoch, "metrics": {"train_loss": 0.3}})
    # the epoch line goes through `out` (print: the live bar shows it above itself)
    assert out == ["epoch 1/2 done in 1.0s (10 rows/s, step 24): train_loss 0.3000"]
    assert "loss 0.5000" in buffer.getvalue()  # the bar, with the step's loss
    assert display._progress.tasks[0].completed == 12 and display._progress.tasks[0].total == 24


def test_the_error_is_its_type_and_first_line_with_credentials_redacted() -> None:
    err = RuntimeError(
        'Traceback (most recent call last):\n  File "x.py"\nconnect to s3://AKIA:secret@bucket failed\nmore'
    )
    short = _short_error(err)
    assert short.startswith("RuntimeError: connect to s3://") and "secret" not in short and "more" not in short


def test_engine_info_goes_to_the_job_log_not_the_terminal_unless_verbose(tmp_path: Path) -> None:
    import ray.data

    data_logger = logging.getLogger("ray.data")
    console = [
        h for h in data_logger.handlers if type(h) is not logging.FileHandler and isinstance(h, logging.StreamHandler)
    ]
    assert console, "Ray Data has its own console handler"
    captured = io.StringIO()
    stream = console[0].setStream(captured)  # type: ignore[attr-defined]
    try:
        log = tmp_path / "job.log"
        with engine_logs(log):
            assert ray.data.DataContext.get_current().enable_progress_bars is False
            data_logger.info("Execution plan: ReadParquet->MapBatches")
            data_logger.warning("Failed to resolve path 's3://AKIAKEY:hunter2@bucket/churn.parquet'")
            data_logger.warning("a real problem")
            logging.getLogger("ray.train").info("attempt 1 started")  # the driver's side of Ray Train
        assert "Execution plan" in log.read_text() and "attempt 1 started" in log.read_text()
        assert oct(log.stat().st_mode & 0o777) == "0o600"
        assert "s3://" in log.read_text() and "hunter2" not in log.read_text()  # the log goes to MLflow
        assert "Execution plan" not in captured.getvalue() and "a real problem" in captured.getvalue()
        assert log.read_text().count("attempt 1 started") == 1  # "ray.train" propagates once, to "ray"
        ray_console = next(h for h in logging.getLogger("ray").handlers if isinstance(h, logging.StreamHandler))
        ray_captured = io.StringIO()
        ray_stream = ray_console.setStream(ray_captured)
        try:
            with engine_logs(log):  # Ray's notice that token auth is on: file only; that it is off: shown
                for message in (
                    "Token authentication is enabled for this cluster.",
                    "Token authentication is disabled",
                ):
                    record = logging.LogRecord(
                        "ray", logging.WARNING, "authentication_token_setup.py", 85, message, None, None
                    )
                    logging.getLogger("ray").handle(record)
        finally:
            ray_console.setStream(ray_stream)
        assert "is enabled" in log.read_text() and "is disabled" in log.read_text()
        assert "is enabled" not in ray_captured.getvalue() and "is disabled" in ray_captured.getvalue()
        with engine_logs(tmp_path / "verbose.log", verbose=True):
            data_logger.info("shown when verbose")
        assert "shown when verbose" in captured.getvalue()
        data_logger.info("after: Ray's own settings again")
        assert "after: Ray's own settings again" in captured.getvalue()
        assert "after" not in log.read_text()
    finally:
        console[0].setStream(stream)  # type: ignore[attr-defined]


def test_connect_keeps_the_ray_level_a_job_log_asked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    """ray.init sets the "ray" logger's level: inside engine_logs it must stay INFO (for the file)."""
    import ray

    from runtime import connect as connect_module

    seen: list[dict[str, Any]] = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: seen.append(kw))
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    monkeypatch.setenv("SKEWLESS_VERBOSE", "0")
    ray_logger = logging.getLogger("ray")
    level = ray_logger.level
    try:
        ray_logger.setLevel(logging.NOTSET)
        connect_module.connect()
        ray_logger.setLevel(logging.INFO)
        connect_module.connect()
        monkeypatch.setenv("SKEWLESS_VERBOSE", "1")
        ray_logger.setLevel(logging.NOTSET)
        connect_module.connect()
    finally:
        ray_logger.setLevel(level)
    assert [(kw["logging_level"], kw["log_to_driver"]) for kw in seen] == [
        (logging.WARNING, False),
        (logging.INFO, False),
        (logging.INFO, True),
    ]
