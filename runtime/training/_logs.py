"""Where a training job's engine logs go: the run's log file, not the terminal (unless verbose).

Ray Data logs each execution's plan, resource budgets and a "Total Progress" line at INFO on its
own console handler (``ray.data`` does not propagate), Ray Train and Ray Core log at INFO, and
Ray Data's progress bars warn that tqdm is missing. A job's terminal (or a submitted job's log)
should show the job: its progress, its epochs, its failures (``runtime.training._progress``).
:func:`engine_logs` sends the engines' INFO records to the job's log file, keeps WARNING and
above on the terminal, and turns Ray Data's progress bars off; ``verbose`` leaves everything as
Ray has it, and workers' output forwarded to the driver too. Ray Train's controller and the
workers run in their own processes: their logs stay in Ray's session logs (``ray logs``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

__all__ = ["ENGINE_LOGGERS", "engine_logs", "job_log_path"]

# Ray Train's and Tune's loggers propagate to "ray"; Ray Data's and MLflow's do not.
ENGINE_LOGGERS = ("ray", "ray.data", "mlflow")
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def job_log_path(kind: str = "train") -> Path:
    """``$SKEWLESS_HOME/logs/<kind>-<time>-<pid>.log``: one per job run (0700 directory)."""
    from runtime.registry import skewless_home

    logs = skewless_home() / "logs"
    logs.mkdir(parents=True, exist_ok=True, mode=0o700)
    return logs / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"


class _Redacted(logging.Filter):
    """The job's log file goes to the MLflow run: credentials in a message (a URI with a key in
    it, in a Ray Data path warning) or a traceback are redacted before it is written. A filter,
    not a formatter: ``ray.init`` replaces the formatters of the "ray" logger's handlers."""

    def filter(self, record: logging.LogRecord) -> bool:
        from runtime.redact import redact

        record.msg, record.args = redact(record.getMessage()), ()
        if record.exc_info and not record.exc_text:  # formatters use the cached text when it is set
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        return True


class _FileOnly(logging.Filter):
    """Keeps Ray's notice that token authentication is on (with how to turn it off) off the
    terminal: skewless keeps it on; the job's log file still has it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (
            record.filename == "authentication_token_setup.py"
            and record.getMessage().startswith("Token authentication is enabled")
        )  # that it is *disabled* is a warning worth seeing: that stays


def _is_console(handler: logging.Handler) -> bool:
    return isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)


@contextlib.contextmanager
def engine_logs(log_file: Path, verbose: bool = False) -> Iterator[Path]:
    """Within the block, the engines' records at INFO and above go to ``log_file``; their
    console handlers show WARNING and above (everything when ``verbose``). Restored after."""
    import ray.data  # configures Ray Data's logger (its own console handler) on import
    from ray.util.debug import log_once

    log_file.touch(mode=0o600)  # the engines' messages are the user's: not world-readable
    handler = logging.FileHandler(log_file)
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter(_FORMAT))
    handler.addFilter(_Redacted())
    quiet = _FileOnly()
    filtered: list[logging.Handler] = []
    saved_levels: list[tuple[logging.Handler, int]] = []
    saved_loggers: list[tuple[logging.Logger, int]] = []
    context = ray.data.DataContext.get_current()
    bars = context.enable_progress_bars
    filters = list(warnings.filters)
    try:
        for name in ENGINE_LOGGERS:
            log = logging.getLogger(name)
            log.addHandler(handler)
            if log.level == logging.NOTSET or log.level > logging.INFO:
                saved_loggers.append((log, log.level))
                log.setLevel(logging.INFO)
            if not verbose:
                for h in log.handlers:
                    if not _is_console(h):
                        continue
                    h.addFilter(quiet)
                    filtered.append(h)
                    if h.level < logging.WARNING:
                        saved_levels.append((h, h.level))
                        h.setLevel(logging.WARNING)
        if not verbose:
            context.enable_progress_bars = False  # the job shows its own progress...
            log_once("ray_data_progress_manager_disabled")  # ...so Ray Data need not warn that it is off
            os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # MLflow's download bars
            # Ray Train's own DataConfig sets a field Ray Data deprecates: nothing a user can act on
            warnings.filterwarnings("ignore", message=r".*ExecutionOptions\.exclude_resources.*")
        yield log_file
    finally:
        context.enable_progress_bars = bars
        warnings.filters[:] = filters  # type: ignore[index]  # a list at run time
        for name in ENGINE_LOGGERS:
            logging.getLogger(name).removeHandler(handler)
        for h, level in saved_levels:
            h.setLevel(level)
        for h in filtered:
            h.removeFilter(quiet)
        for log, level in saved_loggers:
            log.setLevel(level)
        handler.close()
