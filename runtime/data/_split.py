"""The train / validation / test split as a function of each row's content.

Each row gets a number ``u`` in [0, 1) from a hash of its values and the seed: ``u <
test_fraction`` is the test split (the holdout), the next ``validation_fraction`` the
validation split, the rest training. No global shuffle or row index: the same however the
files are chunked or ordered, and duplicate rows always land on the same side.

Kept in ``runtime.data`` (light imports) because Ray Data runs :func:`split_side` in its
read tasks: importing it must not pull in torch.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa

from runtime.errors import DataError

# Bumped whenever the hash of a row changes: every split changes with it.
SPLIT_VERSION = 2


def _canonical(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """One representation per value, whatever the column's type in this block: numbers and
    booleans as float64 (nulls stay nulls), dictionaries decoded, text as UTF-8 strings.

    A block's Arrow type can differ from another's for the same value (int64 here, float64 or
    a dictionary there); hashing the value as typed would send one row to two splits.
    """
    t = column.type
    if pa.types.is_dictionary(t):
        column, t = column.cast(t.value_type), t.value_type
    if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t) or pa.types.is_decimal(t):
        return column.cast(pa.float64())
    if pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return column.cast(pa.string())
    return column


def _row_hashes(table: pa.Table, columns: list[str], seed: int) -> np.ndarray:
    """A 64-bit hash per row of the row's values in ``columns`` (see :func:`split_unit`)."""
    import pandas as pd

    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise DataError(f"the dataset has no column(s) {missing}; it has {table.column_names}")
    if table.num_rows == 0:
        return np.zeros(0, dtype=np.uint64)
    key = hashlib.sha256(f"skewless-split-v{SPLIT_VERSION}-{seed}".encode()).hexdigest()[:16]
    canonical = pa.table([_canonical(table.column(c)) for c in columns], names=columns)
    frame = canonical.to_pandas(types_mapper={pa.float64(): pd.Float64Dtype(), pa.string(): pd.StringDtype()}.get)
    return pd.util.hash_pandas_object(frame, index=False, hash_key=key).to_numpy(dtype=np.uint64)


def _unit(hashed: np.ndarray) -> np.ndarray:
    """The top 53 bits of each hash as a float64 in [0, 1)."""
    return (hashed >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def _remix(hashed: np.ndarray) -> np.ndarray:
    """A second, independent-looking 64-bit hash from each hash (SplitMix64's finalizer, a
    bijection): one hashing pass gives a row both its side and its order key."""
    z = hashed + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def split_unit(table: pa.Table, columns: list[str], seed: int) -> np.ndarray:
    """A number in [0, 1) per row, a function of the row's *values* in ``columns`` and ``seed``.

    Each column in a canonical form (:func:`_canonical`: an int 3 and a float 3.0 are the
    same value, in any block), then pandas' vectorized SipHash of each column, combined across
    columns (``hash_key`` is derived from the seed and :data:`SPLIT_VERSION`); the top 53 bits
    become a float64.
    """
    return _unit(_row_hashes(table, columns, seed))


SIDES = ("train", "validation", "test")
ORDER_KEY = "__skewless_order"  # a per-row key that orders rows canonically (see split_side)


def split_side(
    batch: pa.Table,
    columns: list[str],
    test_fraction: float,
    validation_fraction: float,
    seed: int,
    side: str,
    order_key: bool = False,
) -> pa.Table:
    """The rows of ``batch`` on one ``side`` of the split (a Ray Data ``map_batches`` function).

    With ``order_key``, each row also gets :data:`ORDER_KEY`, its content hash remixed into a
    second one (:func:`_remix`, no second hashing pass): sorting
    by it puts rows in an order that depends on nothing but the data and the seed (not on how
    a cluster's readers cut the files into blocks).
    """
    if side not in SIDES:
        raise ValueError(f"side {side!r} must be one of {SIDES}")
    hashed = _row_hashes(batch, columns, seed)
    u = _unit(hashed)
    low, high = {
        "test": (0.0, test_fraction),
        "validation": (test_fraction, test_fraction + validation_fraction),
        "train": (test_fraction + validation_fraction, 1.0),
    }[side]
    mine = (u >= low) & (u < high)
    out = batch.filter(pa.array(mine))
    if order_key:
        out = out.append_column(ORDER_KEY, pa.array(_unit(_remix(hashed[mine]))))
    return out
