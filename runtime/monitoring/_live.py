"""Monitoring inside a serving replica: observe every answered request, flush on an interval.

:meth:`LiveMonitor.observe` is all a request pays: one append to a bounded in-memory buffer
(no I/O, no lock the request waits on for long, nothing that raises). A daemon thread, every
``flush_interval_s``, takes the buffer and

- summarises the rows over the model's reference bins (a :class:`WindowSummary`, mergeable
  across replicas and flushes) and writes it to the store;
- writes the prediction log's rows: request id, row, time, version, the prediction, its score
  and a hash of the inputs (Parquet, one file per flush).

When this replica is the evaluator (replica 0 of its deployment), the thread also judges the
trailing window every ``evaluate_interval_s`` (:func:`evaluate_window`, over every replica's
flushes) and publishes the verdicts as Prometheus metrics (:class:`MonitorGauges`).

Past ``max_buffered_rows`` rows between flushes, rows are dropped from monitoring and counted;
a failing store is logged (once a minute) and the rows of that flush are lost, never a request.
A replica stopped gracefully flushes what it holds; one killed loses at most one interval.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from runtime.monitoring._drift import DriftConfig
from runtime.monitoring._profile import WindowSummary
from runtime.monitoring._reference import ModelReference, prediction_scores, prediction_values
from runtime.monitoring._store import MonitoringStore
from runtime.monitoring._window import MonitorReport, evaluate_window

if TYPE_CHECKING:
    from runtime.tasks import Predictions

logger = logging.getLogger("ray.serve")


@dataclass(frozen=True)
class LiveSettings:
    flush_interval_s: float = 10.0
    evaluate_interval_s: float = 60.0
    window_s: float = 3600.0
    label_window_s: float = 7 * 86400.0
    log_inputs: str = "hash"
    max_buffered_rows: int = 200_000


@dataclass
class _Observed:
    ts: float
    request_id: str
    table: pa.Table
    preds: Predictions


class LiveMonitor:
    """One replica's monitoring (see the module docstring)."""

    def __init__(
        self,
        *,
        app: str,
        model: str,
        version: str,
        replica: str,
        task: str,
        reference: ModelReference | None,
        store: MonitoringStore,
        settings: LiveSettings,
        evaluator: bool | Callable[[], bool] = False,
        publish: Callable[[MonitorReport], None] | None = None,
        count_dropped: Callable[[int], None] | None = None,
        drift_config: DriftConfig | None = None,
    ) -> None:
        self.app, self.model, self.version, self.replica, self.task = app, model, version, replica, task
        self.reference, self.store, self.settings = reference, store, settings
        self.evaluator, self.publish, self.count_dropped = evaluator, publish, count_dropped
        self.drift_config = drift_config
        self.features = list(reference.features) if reference is not None else None
        self._buffer: deque[_Observed] = deque()
        self._buffered_rows = 0
        self._dropped = 0
        self._lock = threading.Lock()  # held for an append or a swap, never for I/O
        self._flush_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._window_start = time.time()
        self._last_evaluation = 0.0
        self._last_error_log = 0.0
        if reference is not None:
            try:
                store.write_reference(app, version, reference.to_json())
            except Exception as exc:  # the store may come up later; the CLI can read the model's own copy
                self._log_error("writing the reference", exc)

    # ------------------------------------------------------------------ the request path

    def observe(self, request_id: str, table: pa.Table, preds: Predictions) -> None:
        """Remember one answered request (O(1), about 2 µs; never raises, never blocks on I/O)."""
        rows = table.num_rows
        with self._lock:
            if self._buffered_rows + rows > self.settings.max_buffered_rows:
                self._dropped += rows
                return
            self._buffer.append(_Observed(time.time(), request_id, table, preds))
            self._buffered_rows += rows

    def _kept(self, table: pa.Table) -> list[str]:
        assert self.features is not None
        return [c for c in self.features if c in table.column_names]

    # ------------------------------------------------------------------ the thread

    def start(self) -> LiveMonitor:
        self._thread = threading.Thread(target=self._run, name="skewless-monitor", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the thread and flush what is buffered (gives up after ``timeout_s`` if a flush
        is stuck in the store, so a replica's shutdown never hangs on monitoring)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        self.flush(lock_timeout_s=timeout_s)

    def is_evaluator(self) -> bool:
        """Whether this replica judges the window now (re-read each tick: Serve renumbers
        ranks after a scale-down, so replica 0 may be another replica than at start)."""
        try:
            return bool(self.evaluator()) if callable(self.evaluator) else bool(self.evaluator)
        except Exception:
            return False

    def _run(self) -> None:
        while not self._stop.wait(self.settings.flush_interval_s):
            self.flush()
            if time.time() - self._last_evaluation >= self.settings.evaluate_interval_s and self.is_evaluator():
                self.evaluate()

    def _log_error(self, doing: str, exc: BaseException) -> None:
        now = time.monotonic()
        if now - self._last_error_log >= 60:
            self._last_error_log = now
            logger.warning("monitoring: %s failed (%s: %s); requests are unaffected", doing, type(exc).__name__, exc)

    def flush(self, lock_timeout_s: float = -1) -> int:
        """Write the buffered rows' summary and prediction log; returns the rows written."""
        if not self._flush_lock.acquire(timeout=lock_timeout_s):
            return 0
        try:
            return self._flush()
        finally:
            self._flush_lock.release()

    def _flush(self) -> int:
        with self._lock:
            items, self._buffer = list(self._buffer), deque()
            self._buffered_rows = 0
            dropped, self._dropped = self._dropped, 0
            start, end = self._window_start, time.time()
            self._window_start = end
        if dropped and self.count_dropped is not None:
            try:
                self.count_dropped(dropped)
            except Exception as exc:
                self._log_error("counting dropped rows", exc)
        if not items and not dropped:
            return 0
        try:
            return self._write(items, start, end, dropped)
        except Exception as exc:
            self._log_error(f"flushing {sum(i.table.num_rows for i in items)} rows to {self.store!r}", exc)
            return 0

    def _write(self, items: list[_Observed], start: float, end: float, dropped: int) -> int:
        """The summary and the prediction log, each written on its own: one failing loses only itself."""
        rows = sum(i.table.num_rows for i in items)
        table = _concat([i.table for i in items]) if items else None
        if table is not None and self.features is not None:
            table = table.select(self._kept(table))  # the model's inputs only (an Arrow body may carry more)
        if self.reference is not None:
            try:
                summary = WindowSummary.empty(self.reference.profile)
                if items:
                    summary = self._summarise(items, table)
                self.store.write_summary(
                    self.app, self.version, self.replica, start, end, summary.to_dict(), dropped, model=self.model
                )
            except Exception as exc:
                self._log_error(f"writing the summary of {rows} rows to {self.store!r}", exc)
        if items:
            self.store.write_predictions(self.app, self.version, self.replica, end, self._log_table(items, table))
        return rows

    def _summarise(self, items: list[_Observed], table: pa.Table | None) -> WindowSummary:
        assert self.reference is not None
        values = np.concatenate([prediction_values(self.task, i.preds) for i in items])
        if table is not None:
            return WindowSummary.from_table(self.reference.profile, table, predictions=values)
        summary = WindowSummary.empty(self.reference.profile)  # requests of unlike schemas: each, then merge
        for i in items:
            values = prediction_values(self.task, i.preds)
            summary = summary.merge(WindowSummary.from_table(self.reference.profile, i.table, predictions=values))
        return summary

    def _log_table(self, items: list[_Observed], table: pa.Table | None) -> pa.Table:
        """The prediction log's rows of ``items``, built column by column (no per-row Python)."""
        counts = np.asarray([i.table.num_rows for i in items], dtype=np.int64)
        n = int(counts.sum())
        starts = np.repeat(np.cumsum(counts) - counts, counts)
        values = [v for i in items for v in i.preds.values]
        scores = [prediction_scores(self.task, i.preds) for i in items]
        if self.task == "regression" or any(s is None for s in scores):
            score = np.asarray(values, dtype=np.float64) if self.task == "regression" else np.full(n, np.nan)
        else:
            score = np.concatenate(scores)  # type: ignore[arg-type]
        hashes = pa.nulls(n, pa.uint64())
        if self.settings.log_inputs == "hash":
            try:
                hashes = pa.array(
                    _row_hashes(table) if table is not None else np.concatenate([_row_hashes(i.table) for i in items]),
                    pa.uint64(),
                )
            except Exception as exc:  # an input type pandas cannot hash: the log keeps no hash
                self._log_error("hashing the inputs", exc)
        return pa.table(
            {
                "request_id": pa.array(
                    np.repeat(np.asarray([i.request_id for i in items], dtype=object), counts), pa.string()
                ),
                "row": pa.array(np.arange(n, dtype=np.int64) - starts, pa.int32()),
                "ts": pa.array(np.repeat(np.asarray([i.ts for i in items]), counts), pa.float64()),
                "version": pa.array(np.full(n, self.version, dtype=object), pa.string()),
                "prediction": pa.array([str(v) for v in values], pa.string()),
                "score": pa.array(score, pa.float64()),
                "input_hash": hashes,
            }
        )

    def evaluate(self) -> MonitorReport | None:
        """Judge the trailing window and publish the verdicts (the evaluator replica's job)."""
        self._last_evaluation = time.time()
        if self.reference is None:
            return None
        try:
            now = time.time()
            report = evaluate_window(
                self.store,
                self.app,
                self.version,
                self.reference,
                since=now - self.settings.window_s,
                until=now + 1,
                config=self.drift_config,
                label_since=now - self.settings.label_window_s,
            )
            if self.publish is not None:
                self.publish(report)
            return report
        except Exception as exc:
            self._log_error("evaluating the window", exc)
            return None


def _concat(tables: list[pa.Table]) -> pa.Table | None:
    """The tables as one, in one chunk per column (10,000 one-row requests are otherwise 10,000
    chunks, and pandas hashes an Arrow column chunk by chunk in Python: 220 ms of the GIL a flush),
    or None when their schemas cannot be unified."""
    try:
        return pa.concat_tables(tables, promote_options="permissive").combine_chunks()
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return None


def _row_hashes(table: pa.Table) -> np.ndarray:
    """A 64-bit hash of each row's values (pandas' stable object hash)."""
    import pandas as pd

    frame = table.to_pandas(types_mapper=None)
    return pd.util.hash_pandas_object(frame, index=False).to_numpy(dtype=np.uint64)
