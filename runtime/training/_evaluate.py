"""Holdout metrics, computed on the packaged model exactly as it will be served."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import pyarrow as pa

from runtime.errors import ConfigError
from runtime.redact import redact
from runtime.registry import LoadedModel

HOLDOUT_SAMPLE_ROWS = 4096
EVAL_BATCH_ROWS = 2048


def evaluate(model: LoadedModel, data: pa.Table | Iterable[pa.Table]) -> dict[str, float]:
    """Score raw holdout rows (features + label) with ``model``; keys are ``holdout_*``.

    ``data`` is a table or an iterable of tables (batches streamed from Ray Data); the metrics
    accumulate batch by batch (the task's sums; binary AUC keeps one score per row).

    The model runs on one intra-op thread: a CPU matmul's sums depend on how many threads
    share it (on the churn model, 1 and 2 threads differ in the 10th digit of the log loss), and
    the holdout metrics must be the same wherever a run is reproduced (``skewless reproduce``
    compares them exactly; a Ray job's driver and a laptop shell get different thread counts).
    For the same reason the rows are re-cut into batches of ``EVAL_BATCH_ROWS`` whatever the
    reader's block layout: the per-batch sums, added in another grouping, differ in the last
    digit (a reproduction that read the file as 7 blocks did).
    """
    import torch

    task = model.task
    if task is None or model.preprocessor is None:
        raise ConfigError(f"{model.directory}: only a model over rows of features has holdout metrics")
    acc = task.accumulator()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for batch in fixed_batches([data] if isinstance(data, pa.Table) else data, EVAL_BATCH_ROWS):
            acc.add(model.predict_table(batch), model.preprocessor.transform_label(batch))
    finally:
        torch.set_num_threads(threads)
    return {f"holdout_{k}": v for k, v in acc.result().items()}


def fixed_batches(tables: Iterable[pa.Table], rows: int) -> Iterator[pa.Table]:
    """The rows of ``tables``, in order, as tables of exactly ``rows`` rows (the last one shorter)."""
    pending: list[pa.Table] = []
    held = 0
    for table in tables:
        while table.num_rows:
            take = min(rows - held, table.num_rows)
            pending.append(table.slice(0, take))
            table, held = table.slice(take), held + take
            if held == rows:
                yield pa.concat_tables(pending).combine_chunks()
                pending, held = [], 0
    if held:
        yield pa.concat_tables(pending).combine_chunks()


class HoldoutStream:
    """The test split, iterable any number of times (each pass streams it from the files).

    Counts its rows and keeps its first ``HOLDOUT_SAMPLE_ROWS`` rows on the first pass.
    """

    def __init__(self, batches: Callable[[], Iterable[pa.Table]], uri: str) -> None:
        self.batches, self.uri = batches, uri
        self.rows = 0
        self._head: list[pa.Table] = []
        self._passes = 0

    def __iter__(self) -> Iterator[pa.Table]:
        first = self._passes == 0
        self._passes += 1
        for batch in self.batches():
            if first:
                kept = sum(t.num_rows for t in self._head)
                if kept < HOLDOUT_SAMPLE_ROWS:
                    self._head.append(batch.slice(0, HOLDOUT_SAMPLE_ROWS - kept))
                self.rows += batch.num_rows
            yield batch
        if first and self.rows == 0:
            raise ConfigError(
                f"data.test_fraction: no test rows in {redact(self.uri)!r}; raise test_fraction or add data"
            )

    @property
    def sample(self) -> pa.Table:
        """The first test rows (all of them up to ``HOLDOUT_SAMPLE_ROWS``), for parity checks."""
        if not self._passes:
            for _ in self:
                pass
        return pa.concat_tables(self._head)


def summary(metrics: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float))
