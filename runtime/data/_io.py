"""Reading datasets and fingerprinting them.

A dataset is a file or a directory of files (Parquet or CSV) on any filesystem pyarrow
knows (local paths, ``file://``, ``s3://``, ``gs://``, ``hdfs://`` ...).
"""

from __future__ import annotations

import hashlib
from typing import Literal

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from runtime.errors import DataError, DatasetNotFoundError
from runtime.redact import redact

Format = Literal["parquet", "csv"]
_SUFFIXES: dict[str, Format] = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv"}
_CHUNK = 8 << 20


def _resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    try:
        return pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, ValueError):
        # A plain relative path: from_uri wants absolute paths or URIs.
        import os

        return pafs.LocalFileSystem(), os.path.abspath(uri)
    except OSError as exc:  # e.g. unknown scheme, missing credentials
        raise DatasetNotFoundError(f"dataset {redact(uri)!r}: cannot open its filesystem: {redact(str(exc))}") from None


def _format_of(path: str) -> Format | None:
    for suffix, fmt in _SUFFIXES.items():
        if path.lower().endswith(suffix):
            return fmt
    return None


def list_data_files(uri: str, format: Format | None = None) -> tuple[pafs.FileSystem, list[str], Format]:
    """The data files of a dataset, sorted by path, and their format.

    Hidden files and ``_``-prefixed files (``_SUCCESS``, ``_metadata``) are skipped, as
    Spark and pyarrow do.
    """
    fs, path = _resolve(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise DatasetNotFoundError(
            f"dataset {redact(uri)!r} does not exist; check the path in your config "
            "(relative paths are resolved against the current directory)"
        )
    if info.type == pafs.FileType.File:
        files = [path]
    else:
        selector = pafs.FileSelector(path, recursive=True)
        files = sorted(
            f.path
            for f in fs.get_file_info(selector)
            if f.type == pafs.FileType.File
            and not f.base_name.startswith((".", "_"))
            and (format is not None or _format_of(f.path) is not None)
        )
        if not files:
            raise DatasetNotFoundError(f"dataset {redact(uri)!r} is a directory with no .parquet or .csv files")
    fmt = format or _format_of(files[0])
    if fmt is None:
        raise DataError(
            f"dataset {redact(uri)!r}: cannot tell the format from the file name {files[0]!r}; "
            "set format: parquet or format: csv"
        )
    return fs, files, fmt


def read_table(uri: str, format: Format | None = None, columns: list[str] | None = None) -> pa.Table:
    """Read a whole dataset into one Arrow table (files concatenated in path order)."""
    fs, files, fmt = list_data_files(uri, format)
    tables = []
    for path in files:
        try:
            if fmt == "parquet":
                tables.append(pq.read_table(path, filesystem=fs, columns=columns))
            else:
                with fs.open_input_stream(path) as stream:
                    t = pacsv.read_csv(stream)
                tables.append(t.select(columns) if columns else t)
        except (pa.ArrowInvalid, OSError, KeyError) as exc:
            raise DataError(f"dataset {redact(uri)!r}: cannot read {path!r} as {fmt}: {exc}") from exc
    try:
        return pa.concat_tables(tables, promote_options="default")
    except pa.ArrowInvalid as exc:
        raise DataError(f"dataset {redact(uri)!r}: its files have incompatible schemas: {exc}") from exc


def dataset_fingerprint(uri: str, format: Format | None = None) -> str:
    """sha256 over every data file's relative path and bytes, in path order.

    Streams the files in 8 MiB chunks, so it is bounded in memory for any size.
    """
    fs, files, _ = list_data_files(uri, format)
    root = files[0] if len(files) == 1 else _resolve(uri)[1]
    digest = hashlib.sha256()
    for path in files:
        rel = path[len(root) :].lstrip("/") if len(files) > 1 else path.rsplit("/", 1)[-1]
        digest.update(rel.encode() + b"\0")
        with fs.open_input_stream(path) as stream:
            while chunk := stream.read(_CHUNK):
                digest.update(chunk)
        digest.update(b"\0")
    return digest.hexdigest()


def table_fingerprint(table: pa.Table) -> str:
    """sha256 over a table's schema and all of its values, independent of chunking.

    Values are hashed through Arrow IPC of the table combined into one chunk per column, so
    two tables with equal content and schema give the same fingerprint.
    """
    digest = hashlib.sha256(table.schema.serialize().to_pybytes())
    combined = table.combine_chunks()
    for batch in combined.to_batches(max_chunksize=1 << 16):
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, batch.schema) as writer:
            writer.write_batch(batch)
        digest.update(sink.getvalue().to_pybytes())
    return digest.hexdigest()
