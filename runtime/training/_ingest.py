"""Ingestion for training: Ray Data over the files, a content-hash split, one bounded-memory
pass that yields what fitting the preprocessing needs, and the choice between training from
memory and streaming.

The driver never holds the dataset:

- the files are read by Ray Data (Parquet in pieces of row groups, only the columns the
  job uses, :func:`read_dataset`; CSV with ``read_csv``);
- the train / validation / test split is a per-row function of the row's *content* and the
  seed (:func:`runtime.data.split_side`), so it needs no global shuffle or row index, is the
  same however the files are chunked or ordered, and sends duplicate rows to the same side
  (no leakage through duplicates);
- the driver streams the training split once, counting its rows and keeping a uniform
  sample of at most ``fit_sample_rows`` of them (the rows with the smallest hash: a
  bottom-k sample, deterministic), on which the preprocessing is fit. Up to that size the
  sample *is* the training split, so the fit is exact; above it, memory stays bounded by
  the sample plus one batch;
- the fitted preprocessing is then a stage of the workers' pipeline
  (:func:`features_stage`): Ray Data tasks turn raw rows into ``{"x", "y"}`` arrays;
- :func:`plan_ingest` decides how the workers get them. When the preprocessed training split
  fits comfortably in Ray's object store, it is materialized there once and every worker
  iterates it in memory each epoch (:class:`InMemoryData`: no per-epoch pipeline cost, and
  rows ordered by a content key, so what each worker sees is the same on any cluster shape);
  otherwise Ray Data re-reads and re-preprocesses the files each epoch and streams them to
  the workers (``get_dataset_shard``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from runtime.data import ORDER_KEY, list_data_files, plan_pieces, read_pieces, split_side, split_unit
from runtime.errors import ConfigError, DataError, SkewlessError
from runtime.redact import redact

if TYPE_CHECKING:
    import ray.data

Progress = Callable[[str], None]
DRIVER_BATCH_ROWS = 65_536
STAGE_BATCH_ROWS = 65_536  # rows per call of the preprocessing stage (see features_stage)
STAGE_BATCH_BYTES = 64 << 20  # at most about this much dense output per call


def read_dataset(uri: str, fmt: str | None, columns: list[str] | None = None) -> ray.data.Dataset:
    """The dataset as a lazy Ray Data ``Dataset`` (files in path order; nothing read yet);
    Parquet pieces read only ``columns`` when given.

    Parquet is read in pieces of whole row groups (:func:`runtime.data.plan_pieces`): one
    read task per piece, which Ray fuses with the split and the preprocessing after it, so a
    single large file is read and preprocessed by as many tasks as it has room for, and raw
    rows never go through the object store. CSV goes through ``ray.data.read_csv``.
    """
    import ray.data

    fs, files, found = list_data_files(uri, fmt)  # type: ignore[arg-type]
    try:
        if found == "parquet":
            pieces = plan_pieces(fs, files)
            if pieces:
                return read_pieces(fs, pieces, columns)
        # Ray 2.60's DataSourceV2 path (ListFiles -> ReadFiles) spends ~5 s per execution in
        # its ListFiles task here, against ~0.1 s for V1; we list the files ourselves, and a
        # dataset is re-executed every epoch, so use V1 (and for files with no rows at all,
        # whose schema it still reads).
        ctx = ray.data.DataContext.get_current()
        previous, ctx.use_datasource_v2 = ctx.use_datasource_v2, False
        try:
            reader = ray.data.read_parquet if found == "parquet" else ray.data.read_csv
            ds = reader(files, filesystem=fs)
        finally:
            ctx.use_datasource_v2 = previous
        return ds  # not projected: the split names a missing column better than Ray's projection
    except SkewlessError as exc:
        raise DataError(f"dataset {redact(uri)!r}: {exc}") from exc
    except Exception as exc:  # reading the schema/metadata fails eagerly for broken files
        raise DataError(f"dataset {redact(uri)!r}: cannot read it as {found}: {redact(str(exc))}") from exc


def open_split(
    uri: str, fmt: str | None, columns: list[str], test_fraction: float, validation_fraction: float, seed: int
) -> dict[str, ray.data.Dataset]:
    """Fresh lazy datasets over the files, one per side (``train``, ``validation``, ``test``):
    filters by :func:`runtime.data.split_side`. Training and validation rows carry the order
    key :data:`runtime.data.ORDER_KEY`.

    Fresh for each consumer: Ray Train configures the datasets it is given for its workers
    (resource limits net of the workers' reservation), which then starves a later pass on
    the driver over the same objects.
    """
    ds = read_dataset(uri, fmt, columns)
    return {
        side: ds.map_batches(
            partial(
                split_side,
                columns=columns,
                test_fraction=test_fraction,
                validation_fraction=validation_fraction,
                seed=seed,
                side=side,
                order_key=side != "test",
            ),
            batch_format="pyarrow",
            batch_size=None,
        )
        for side in ("train", "validation", "test")
    }


def features_stage(ds: ray.data.Dataset, prep: Any) -> ray.data.Dataset:
    """``ds`` through the shared preprocessing transform: ``{"x": float32 features, "y":
    labels, ORDER_KEY: the row key}``.

    The state travels as JSON (parsed once per Ray Data worker process); a row that breaks
    the feature spec fails the stage with the column and rule (its row number counts within
    the stage's batch). The stage takes whole blocks (``batch_size=None``: a stage that asks
    for a batch size is not fused with the read before it, so every block would go through
    the object store between them) and transforms them in slices of ``stage_batch_rows``: the
    reader's 64k-row blocks whole, wide outputs (many one-hot columns) in smaller slices, so
    one call's dense float32 output stays near ``STAGE_BATCH_BYTES``.
    """
    from runtime.preprocessing import transform_batches

    return ds.map_batches(
        partial(transform_batches, state=prep.to_json(), keep=(ORDER_KEY,), rows=stage_batch_rows(prep.output_dim)),
        batch_format="pyarrow",
        batch_size=None,
    )


def stage_batch_rows(output_dim: int) -> int:
    """Rows per preprocessing call: ``STAGE_BATCH_ROWS``, fewer for wide feature vectors."""
    return max(1024, min(STAGE_BATCH_ROWS, STAGE_BATCH_BYTES // (4 * max(output_dim, 1))))


class BottomK:
    """The ``k`` rows with the smallest keys seen so far, in memory O(k + one batch)."""

    def __init__(self, k: int) -> None:
        self.k = k
        self._tables: list[pa.Table] = []
        self._keys: list[np.ndarray] = []
        self._held = 0

    def add(self, table: pa.Table, keys: np.ndarray) -> None:
        self._tables.append(table)
        self._keys.append(keys)
        self._held += table.num_rows
        if self._held > 2 * self.k:
            self._compact()

    def _compact(self) -> None:
        table = pa.concat_tables(self._tables, promote_options="default")
        keys = np.concatenate(self._keys)
        if len(keys) > self.k:
            keep = np.argpartition(keys, self.k - 1)[: self.k]
            table, keys = table.take(keep), keys[keep]
        self._tables, self._keys, self._held = [table], [keys], table.num_rows

    def result(self) -> pa.Table:
        """The sample, ordered by key (so it is the same whatever order rows arrived in)."""
        if not self._tables:
            raise DataError("the training split is empty")
        self._compact()
        order = np.argsort(self._keys[0], kind="stable")
        return self._tables[0].take(order)


@dataclass(frozen=True)
class FitPass:
    sample: pa.Table
    train_rows: int


def fit_pass(
    train: ray.data.Dataset, columns: list[str], seed: int, sample_rows: int, uri: str, progress: Progress
) -> FitPass:
    """Stream the training split once: its row count and a bottom-k sample of it."""
    sampler = BottomK(sample_rows)
    rows = 0
    for batch in driver_batches(train, uri):
        sampler.add(batch, split_unit(batch, columns, seed + 1))
        rows += batch.num_rows
        if rows % (DRIVER_BATCH_ROWS * 16) < batch.num_rows:
            progress(f"  fit pass: {rows:,} training rows read")
    if rows == 0:
        raise ConfigError(
            f"data: no training rows in {redact(uri)!r} after the split; add data or lower test_fraction / "
            "validation_fraction"
        )
    sample = sampler.result()
    return FitPass(sample=sample, train_rows=rows)


def driver_batches(ds: ray.data.Dataset, uri: str) -> Iterator[pa.Table]:
    """Batches of ``ds`` on the driver, with read failures turned into a ``DataError``."""
    try:
        yield from ds.iter_batches(batch_size=DRIVER_BATCH_ROWS, batch_format="pyarrow", prefetch_batches=1)
    except SkewlessError:
        raise
    except Exception as exc:
        cause = exc.__cause__ if isinstance(exc.__cause__, SkewlessError) else None
        if cause is not None:
            raise cause from exc
        raise DataError(f"dataset {redact(uri)!r}: reading it failed: {redact(_last_line(exc))}") from exc


def _last_line(exc: BaseException) -> str:
    """The last line of a Ray error: where it puts the cause's own message."""
    text = str(exc).strip().splitlines()
    return text[-1] if text else type(exc).__name__


def ingest_options() -> Any:
    """Ray Train's default ingest options with the block order preserved, so a run (and a
    resumed run) sees the same rows in the same order on each rank."""
    from ray.train import DataConfig

    options = DataConfig.default_ingest_options()
    options.preserve_order = True
    return options


# ---------------------------------------------------------------------- memory or stream

# The preprocessed training split goes to the object store (once) and each worker keeps a
# copy to draw its batches from; "comfortably" means all of that stays under this share of
# the object store.
MEMORY_SHARE = 0.25


@dataclass(frozen=True)
class IngestPlan:
    mode: str  # "memory" or "stream"
    reason: str  # in words, for the progress output and the lineage
    estimated_bytes: int


def plan_ingest(requested: str, rows: int, output_dim: int, workers: int, object_store_bytes: float) -> IngestPlan:
    """``memory`` when asked, or (``auto``) when the preprocessed training split fits comfortably;
    ``stream`` otherwise. ``reason`` says which and why."""
    size = rows * (4 * output_dim + 16)  # float32 features, the label, the row key
    need = size * (workers + 1)  # the object store's copy and each worker's
    budget = MEMORY_SHARE * object_store_bytes
    fits = need <= budget
    what = f"{rows:,} training rows x {output_dim} features = {size / 2**20:,.1f} MiB preprocessed"
    if requested == "stream" or (requested == "auto" and not fits):
        why = (
            "data.ingest: stream"
            if requested == "stream"
            else (
                f"{workers} worker copies + the object store's need {need / 2**20:,.0f} MiB, more than "
                f"{MEMORY_SHARE:.0%} of the object store ({object_store_bytes / 2**30:,.1f} GiB)"
            )
        )
        return IngestPlan("stream", f"{what}; streamed from the files every epoch ({why})", size)
    why = (
        "data.ingest: memory"
        if requested == "memory"
        else (f"fits in {MEMORY_SHARE:.0%} of the object store ({object_store_bytes / 2**30:,.1f} GiB)")
    )
    return IngestPlan("memory", f"{what}; preprocessed once into the object store, iterated in memory ({why})", size)


@dataclass(frozen=True)
class InMemoryData:
    """A split preprocessed once into Ray's object store: refs to ``{x, y, ORDER_KEY}`` blocks.

    What the driver hands the workers (refs pickle as references; the driver owns the
    blocks while the run lasts). See :class:`runtime.training._sources.InMemorySource`.
    """

    train: tuple[Any, ...]
    validation: tuple[Any, ...]


def materialize(ds: ray.data.Dataset, uri: str) -> tuple[tuple[Any, ...], int]:
    """Run ``ds`` once; its blocks, as refs to dicts of numpy arrays, stay in the object store.
    Returns the refs and the row count."""
    try:
        done = ds.materialize()
        return tuple(done.to_numpy_refs()), done.count()
    except SkewlessError:
        raise
    except Exception as exc:
        cause = exc.__cause__ if isinstance(exc.__cause__, SkewlessError) else None
        if cause is not None:
            raise cause from exc
        raise DataError(f"dataset {redact(uri)!r}: preprocessing it failed: {redact(_last_line(exc))}") from exc
