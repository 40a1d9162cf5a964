"""The train/holdout split as a function of each row's content.

Kept in ``runtime.data`` (light imports) because Ray Data runs :func:`split_side` in its
read tasks: importing it must not pull in torch.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa

from runtime.errors import DataError


def split_unit(table: pa.Table, columns: list[str], seed: int) -> np.ndarray:
    """A number in [0, 1) per row, a function of the row's values in ``columns`` and ``seed``.

    pandas' vectorized SipHash of each column, combined across columns (``hash_key`` is
    derived from the seed); the top 53 bits become a float64.
    """
    import pandas as pd

    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise DataError(f"the dataset has no column(s) {missing}; it has {table.column_names}")
    if table.num_rows == 0:
        return np.zeros(0, dtype=np.float64)
    key = hashlib.sha256(f"skewless-split-{seed}".encode()).hexdigest()[:16]
    frame = table.select(columns).to_pandas()
    hashed = pd.util.hash_pandas_object(frame, index=False, hash_key=key).to_numpy(dtype=np.uint64)
    return (hashed >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def split_side(batch: pa.Table, columns: list[str], fraction: float, seed: int, holdout: bool) -> pa.Table:
    """The rows of ``batch`` on one side of the split (a Ray Data ``map_batches`` function)."""
    u = split_unit(batch, columns, seed)
    return batch.filter(pa.array(u < fraction if holdout else u >= fraction))
