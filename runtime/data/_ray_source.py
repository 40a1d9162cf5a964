"""The Parquet row-group pieces of :mod:`runtime.data._row_groups` as a Ray Data source.

Imported only when a dataset is read through Ray (it imports ``ray.data``); the read tasks'
body, :func:`~runtime.data._row_groups.read_piece`, is plain pyarrow.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import pyarrow.fs as pafs
import ray.data
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from runtime.data._row_groups import Piece, read_piece


class RowGroupSource(Datasource):
    """One read task per :class:`~runtime.data._row_groups.Piece`, in file and row-group order."""

    def __init__(self, fs: pafs.FileSystem, pieces: Sequence[Piece], columns: Sequence[str] | None) -> None:
        super().__init__()
        self._fs, self._pieces = fs, list(pieces)
        self._columns = list(columns) if columns is not None else None

    def get_name(self) -> str:
        return "ParquetRowGroups"

    def estimate_inmemory_data_size(self) -> int:
        return sum(p.bytes for p in self._pieces)

    def get_read_tasks(
        self, parallelism: int, per_task_row_limit: int | None = None, data_context: Any = None
    ) -> list[ReadTask]:
        # ``parallelism`` is ignored: the pieces are the unit, and ``read`` asks for exactly as
        # many blocks as there are pieces (so Ray neither merges nor splits them).
        return [
            ReadTask(
                partial(read_piece, self._fs, piece, self._columns),
                BlockMetadata(num_rows=piece.rows, size_bytes=piece.bytes, input_files=(piece.path,), exec_stats=None),
                per_task_row_limit=per_task_row_limit,
            )
            for piece in self._pieces
        ]


def read(fs: pafs.FileSystem, pieces: Sequence[Piece], columns: Sequence[str] | None) -> ray.data.Dataset:
    """A lazy dataset over ``pieces``, one block stream per piece.

    ``override_num_blocks`` equal to the number of pieces keeps Ray from splitting each read
    task's output into more blocks, which would also stop it fusing the read with the
    ``map_batches`` stages after it.
    """
    return ray.data.read_datasource(RowGroupSource(fs, pieces, columns), override_num_blocks=max(len(pieces), 1))
