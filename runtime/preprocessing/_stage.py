"""The transform as a Ray Data stage: raw rows in, model-ready arrays out.

Training applies the fitted preprocessing inside the data pipeline
(``dataset.map_batches(partial(transform_batch, state=fp.to_json()))``), so Ray Data's
CPU tasks do it while the training workers only train; each worker receives
``{"x": float32 (rows, output_dim), "y": labels}`` batches. The state is parsed once per
process (a small cache keyed by the JSON's hash), not once per batch.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np
import pyarrow as pa

from runtime.preprocessing._transform import FittedPreprocessor

FEATURES, LABEL = "x", "y"
_CACHE: OrderedDict[str, FittedPreprocessor] = OrderedDict()
_CACHE_SIZE = 4  # a Tune trial's worker process may see a few fits; keep the latest ones


def cached_preprocessor(state: str) -> FittedPreprocessor:
    key = hashlib.sha256(state.encode()).hexdigest()
    prep = _CACHE.get(key)
    if prep is None:
        prep = _CACHE[key] = FittedPreprocessor.from_json(state)
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    else:
        _CACHE.move_to_end(key)
    return prep


def features_and_labels(prep: FittedPreprocessor, table: pa.Table) -> dict[str, np.ndarray]:
    """``{"x": features, "y": labels}`` for the rows of ``table`` (what a training step takes)."""
    return {FEATURES: prep.transform(table), LABEL: prep.transform_label(table)}


def transform_batch(batch: pa.Table, *, state: str) -> dict[str, np.ndarray]:
    """The Ray Data stage: ``state`` is :meth:`FittedPreprocessor.to_json`."""
    return features_and_labels(cached_preprocessor(state), batch)
