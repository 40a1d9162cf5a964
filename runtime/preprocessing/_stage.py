"""The transform as a Ray Data stage: raw rows in, model-ready arrays out.

Training applies the fitted preprocessing inside the data pipeline
(``dataset.map_batches(partial(transform_batch, state=fp.to_json()))``), so Ray Data's
CPU tasks do it while the training workers only train; each worker receives
``{"x": float32 (rows, output_dim), "y": labels}`` batches. The state is parsed once per
process (a small LRU cache keyed by the JSON text), not once per batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import lru_cache

import numpy as np
import pyarrow as pa

from runtime.preprocessing._transform import FittedPreprocessor

FEATURES, LABEL = "x", "y"


@lru_cache(maxsize=4)  # a process may serve a few fits (Tune trials); thread-safe
def cached_preprocessor(state: str) -> FittedPreprocessor:
    return FittedPreprocessor.from_json(state)


def features_and_labels(prep: FittedPreprocessor, table: pa.Table) -> dict[str, np.ndarray]:
    """``{"x": features, "y": labels}`` for the rows of ``table`` (what a training step takes)."""
    return {FEATURES: prep.transform(table), LABEL: prep.transform_label(table)}


def transform_batch(batch: pa.Table, *, state: str, keep: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """The Ray Data stage: ``state`` is :meth:`FittedPreprocessor.to_json`; the columns named
    in ``keep`` (e.g. a row key) pass through unchanged.

    A row that breaks the feature spec raises :class:`~runtime.errors.SchemaValidationError`
    naming the column and the rule; its row number counts within this batch, not the dataset.
    """
    out = features_and_labels(cached_preprocessor(state), batch)
    for name in keep:
        out[name] = batch.column(name).to_numpy()
    return out


def transform_batches(batch: pa.Table, *, state: str, rows: int, keep: tuple[str, ...] = ()) -> Iterator[pa.Table]:
    """:func:`transform_batch` as a Ray Data ``map_batches`` generator: ``batch`` in slices of at
    most ``rows`` rows (so the stage can take whole blocks, ``batch_size=None``, and still bound
    each call's dense output), each yielded as a Ray Data Arrow block whose features are a
    tensor column.

    The block is built here rather than by Ray from a dict of arrays: Ray infers the Arrow type
    of each 1-D NumPy column element by element (about 6 ms per 100k-row column), while
    ``pa.table`` takes them as they are. A failing row's number counts within its slice.
    """
    from ray.data.extensions import ArrowTensorArray

    for start in range(0, max(batch.num_rows, 1), rows):
        out = transform_batch(batch.slice(start, rows), state=state, keep=keep)
        yield pa.table({name: ArrowTensorArray.from_numpy(v) if v.ndim > 1 else v for name, v in out.items()})
