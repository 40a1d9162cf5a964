"""The transform as a Ray Data stage: raw rows in, model-ready arrays out.

Training applies the fitted preprocessing inside the data pipeline
(``dataset.map_batches(partial(transform_batch, state=fp.to_json()))``), so Ray Data's
CPU tasks do it while the training workers only train; each worker receives
``{"x": float32 (rows, output_dim), "y": labels}`` batches. The state is parsed once per
process (a small LRU cache keyed by the JSON text), not once per batch.
"""

from __future__ import annotations

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
