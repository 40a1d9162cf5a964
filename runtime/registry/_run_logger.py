"""One MLflow run's writer for code that must not fail because tracking does.

A training worker logs metrics, memory figures and diagnostics bundles into its driver's
MLflow run. A locked SQLite store or a tracking server answering 5xx (or not answering) must
not kill a rank, nor stall it: :class:`RunLogger` retries each call a few times with backoff,
warns (once per kind of failure, then at debug level), and after a call that failed it does
not call the store again for ``cooldown_s`` (a circuit breaker: an outage costs the training
loop one failed call, not one per step). Metrics it could not log are held (bounded) and sent
with the next call that gets through, unless the caller says they are not worth holding
(the memory tracker's frequent samples); it never raises. It pickles without its client, so
one instance can be handed to Ray workers; each process makes its own ``MlflowClient``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from runtime.redact import redact

logger = logging.getLogger(__name__)

__all__ = ["RunLogger"]


class RunLogger:
    """Writes to the MLflow run ``run_id`` at ``tracking_uri``; every method returns whether
    it got through, none raises."""

    def __init__(
        self,
        tracking_uri: str,
        run_id: str,
        attempts: int = 3,
        backoff_s: float = 0.5,
        max_pending: int = 10_000,
        cooldown_s: float = 60.0,
    ) -> None:
        if attempts < 1:
            raise ValueError(f"attempts ({attempts}) must be >= 1")
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.attempts = attempts
        self.backoff_s = backoff_s
        self.max_pending = max_pending
        self.cooldown_s = cooldown_s
        self._setup()

    _FIELDS = ("tracking_uri", "run_id", "attempts", "backoff_s", "max_pending", "cooldown_s")

    def _setup(self) -> None:
        self._client: Any = None
        self._lock = threading.Lock()
        self._pending: deque[Any] = deque(maxlen=self.max_pending)
        self._warned: set[str] = set()
        self._open_until = 0.0  # the circuit: no call to the store before this monotonic time
        self.failures = 0

    def __getstate__(self) -> dict[str, Any]:
        return {k: self.__dict__[k] for k in self._FIELDS}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._setup()

    def __repr__(self) -> str:
        return f"RunLogger({redact(self.tracking_uri)!r}, {self.run_id!r})"

    @property
    def pending(self) -> int:
        """Metrics held back by failed calls, to be sent with the next one that gets through."""
        return len(self._pending)

    def client(self) -> Any:
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    # ------------------------------------------------------------------ writes

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None, hold: bool = True) -> bool:
        """Log ``metrics`` (and any held back by earlier failures) in one batch. With
        ``hold=False`` these values are dropped rather than held when the call fails."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        values = [Metric(k, float(v), now, step or 0) for k, v in sorted(metrics.items())]
        with self._lock:
            batch = [*self._pending, *values]
            if not batch:
                return True
            ok = self._call("metrics", lambda: self._log_batch(batch))
            if ok:
                self._pending.clear()
            elif hold:
                self._pending.extend(values)
            return ok

    def _log_batch(self, metrics: list[Any]) -> None:
        for start in range(0, len(metrics), 1000):  # MLflow's limit per log_batch call
            self.client().log_batch(self.run_id, metrics=metrics[start : start + 1000])

    def flush(self) -> bool:
        """Send metrics held back by earlier failures; True when none are left."""
        return self.log_metrics({})

    def set_tags(self, tags: Mapping[str, str]) -> bool:
        from mlflow.entities import RunTag

        return self._call(
            "tags", lambda: self.client().log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        )

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> bool:
        return self._call("artifacts", lambda: self.client().log_artifact(self.run_id, str(local_path), artifact_path))

    def log_artifacts(self, local_dir: str | Path, artifact_path: str | None = None) -> bool:
        return self._call("artifacts", lambda: self.client().log_artifacts(self.run_id, str(local_dir), artifact_path))

    # ------------------------------------------------------------------ retries

    def _call(self, what: str, action: Callable[[], object]) -> bool:
        if time.monotonic() < self._open_until:
            return False  # the store failed moments ago: do not stall the caller on it again
        delay = self.backoff_s
        for attempt in range(1, self.attempts + 1):
            try:
                action()
                return True
            except Exception as exc:  # any store failure: never the caller's problem
                if attempt == self.attempts:
                    self.failures += 1
                    self._open_until = time.monotonic() + self.cooldown_s
                    level = logging.WARNING if what not in self._warned else logging.DEBUG
                    self._warned.add(what)
                    logger.log(
                        level,
                        "MLflow run %s at %s: logging %s failed after %d attempt(s) (%s); training goes on, "
                        "the next attempt in %.0f s%s",
                        self.run_id,
                        redact(self.tracking_uri),
                        what,
                        self.attempts,
                        redact(_first_line(exc)),
                        self.cooldown_s,
                        "; metric values are held for the next call" if what == "metrics" else "",
                    )
                    return False
                if self._client is not None and "closed" in str(exc).lower():
                    self._client = None  # a dead connection: start over
                time.sleep(delay)
                delay *= 2
        return False


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"
