"""One MLflow run's writer for code that must not fail because tracking does.

A training worker logs metrics, memory figures and diagnostics bundles into its driver's
MLflow run. A locked SQLite store or a tracking server answering 5xx must not kill a rank:
:class:`RunLogger` retries each call a few times with backoff, warns (once per kind of
failure, then at debug level), keeps the metrics it could not log (bounded) and sends them
with the next call that gets through, and never raises. It pickles without its client, so
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
    ) -> None:
        if attempts < 1:
            raise ValueError(f"attempts ({attempts}) must be >= 1")
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.attempts = attempts
        self.backoff_s = backoff_s
        self.max_pending = max_pending
        self._setup()

    def _setup(self) -> None:
        self._client: Any = None
        self._lock = threading.Lock()
        self._pending: deque[Any] = deque(maxlen=self.max_pending)
        self._warned: set[str] = set()
        self.failures = 0

    def __getstate__(self) -> dict[str, Any]:
        return {k: self.__dict__[k] for k in ("tracking_uri", "run_id", "attempts", "backoff_s", "max_pending")}

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

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> bool:
        """Log ``metrics`` (and any held back by earlier failures) in one batch."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        with self._lock:
            self._pending.extend(Metric(k, float(v), now, step or 0) for k, v in sorted(metrics.items()))
            batch = list(self._pending)
            if not batch:
                return True
            ok = self._call("metrics", lambda: self._log_batch(batch))
            if ok:
                self._pending.clear()
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
        delay = self.backoff_s
        for attempt in range(1, self.attempts + 1):
            try:
                action()
                return True
            except Exception as exc:  # any store failure: never the caller's problem
                if attempt == self.attempts:
                    self.failures += 1
                    level = logging.WARNING if what not in self._warned else logging.DEBUG
                    self._warned.add(what)
                    logger.log(
                        level,
                        "MLflow run %s at %s: logging %s failed after %d attempt(s) (%s); training goes on%s",
                        self.run_id,
                        redact(self.tracking_uri),
                        what,
                        self.attempts,
                        redact(_first_line(exc)),
                        f", {len(self._pending)} metric value(s) held for the next call" if what == "metrics" else "",
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
