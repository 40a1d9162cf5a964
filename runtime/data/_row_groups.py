"""Parquet read pieces: row groups grouped into read tasks of a bounded size.

Ray Data's Parquet reader (V1) makes one read task per *file*. A dataset of one large file is
then read by one task, whose output Ray splits into small blocks for the stages after it, and
that split stops Ray from fusing the read with those stages: every block makes a round trip
through the object store between the read and the preprocessing. Cutting the files along
their row groups (Parquet's own unit of parallel reading) gives as many read tasks as the
data has room for, each of which Ray fuses with the split and the transform into one task.

This module is plain pyarrow (a read task imports it on a Ray worker);
:mod:`runtime.data._ray_source` wraps the pieces as a Ray Data ``Datasource``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from runtime.errors import DataError
from runtime.redact import redact

if TYPE_CHECKING:
    import ray.data

PIECE_ROWS = 262_144  # rows per read task at most, unless one row group alone is larger
PIECE_BYTES = 128 << 20  # uncompressed bytes per read task at most (same exception)
READ_BATCH_ROWS = 65_536  # rows per table a read task yields
_FOOTER_THREADS = 16  # footers read at once (a remote filesystem answers each in a round trip)


@dataclass(frozen=True)
class Piece:
    """Consecutive row groups of one file: what one read task reads."""

    path: str
    row_groups: tuple[int, ...]
    rows: int
    bytes: int  # uncompressed, as the footer says


def _row_groups(fs: pafs.FileSystem, path: str) -> list[tuple[int, int]]:
    try:
        meta = pq.ParquetFile(path, filesystem=fs).metadata
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"cannot read {redact(path)!r} as parquet: {redact(str(exc))}") from exc
    return [(meta.row_group(g).num_rows, meta.row_group(g).total_byte_size) for g in range(meta.num_row_groups)]


def plan_pieces(
    fs: pafs.FileSystem, files: Sequence[str], max_rows: int = PIECE_ROWS, max_bytes: int = PIECE_BYTES
) -> list[Piece]:
    """The files' row groups, in file and row-group order, grouped into pieces of at most
    ``max_rows`` rows and ``max_bytes`` uncompressed bytes (a larger row group is a piece on
    its own). Empty row groups are left out; a file with none still reads its schema."""
    with ThreadPoolExecutor(max_workers=min(_FOOTER_THREADS, max(len(files), 1))) as pool:
        footers = list(pool.map(lambda p: _row_groups(fs, p), files))
    pieces: list[Piece] = []
    for path, groups in zip(files, footers, strict=True):
        current: list[int] = []
        rows = size = 0
        for g, (n, b) in enumerate(groups):
            if n == 0:
                continue
            if current and (rows + n > max_rows or size + b > max_bytes):
                pieces.append(Piece(path, tuple(current), rows, size))
                current, rows, size = [], 0, 0
            current.append(g)
            rows, size = rows + n, size + b
        if current:
            pieces.append(Piece(path, tuple(current), rows, size))
    return pieces


def read_piece(
    fs: pafs.FileSystem, piece: Piece, columns: Sequence[str] | None, batch_rows: int = READ_BATCH_ROWS
) -> Iterator[pa.Table]:
    """The piece's rows as tables of at most ``batch_rows`` rows (a Ray read task's body)."""
    try:
        f = pq.ParquetFile(piece.path, filesystem=fs)
        cols = list(columns) if columns is not None else None
        if cols is not None:
            missing = [c for c in cols if c not in f.schema_arrow.names]
            if missing:
                raise DataError(f"{redact(piece.path)!r} has no column(s) {missing}; it has {f.schema_arrow.names}")
        for batch in f.iter_batches(batch_size=batch_rows, row_groups=list(piece.row_groups), columns=cols):
            yield pa.Table.from_batches([batch])
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"cannot read {redact(piece.path)!r} as parquet: {redact(str(exc))}") from exc


def read_pieces(fs: pafs.FileSystem, pieces: Sequence[Piece], columns: Sequence[str] | None) -> ray.data.Dataset:
    """A lazy Ray Data dataset over ``pieces``: one read task each, fused by Ray with the
    ``map_batches`` stages that follow (imports Ray Data)."""
    from runtime.data._ray_source import read

    return read(fs, pieces, columns)
