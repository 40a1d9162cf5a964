"""Where live monitoring data lands: window summaries, the prediction log, labels.

One store per deployment of skewless, a directory or any ``pyarrow.fs`` URI (``s3://``,
``gs://``, ``hdfs://``; a cluster whose nodes share no disk points every replica at one). The
default is ``$SKEWLESS_HOME/monitoring``. Per application::

    <app>/summaries/v=<version>/<start_ms>-<end_ms>-<replica>.json   one flush of one replica
    <app>/predictions/v=<version>/<end_ms>-<replica>.parquet         the same flush's prediction log
    <app>/labels/<ms>-<nonce>.parquet                                one batch of labels
    <app>/references/v=<version>.json                                the version's training reference

Every file is written once, whole, under a name nobody else writes (a replica's id and the
flush's times), so writers need no lock and readers never see half a window: a local write
goes to a temporary name and is renamed; object stores make a whole-object put visible at once.
Readers select files by the times in their names.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from runtime.errors import ConfigError, DataError
from runtime.redact import redact

_SAFE = re.compile(r"[^A-Za-z0-9_.-]+")

PREDICTION_COLUMNS = ("request_id", "row", "ts", "version", "prediction", "score", "input_hash")
LABEL_SCHEMA = pa.schema(
    [("request_id", pa.string()), ("row", pa.int32()), ("label", pa.string()), ("labelled_at", pa.float64())]
)


def default_store_uri() -> str:
    from runtime.registry import skewless_home

    return str(skewless_home() / "monitoring")


def _safe(name: str) -> str:
    """``name`` as one path segment: other characters become ``_``, and ``.``/``..`` are refused."""
    safe = _SAFE.sub("_", name) or "_"
    if safe in (".", ".."):
        raise ConfigError(f"{name!r} cannot name an application or version in the monitoring store")
    return safe


@dataclass(frozen=True)
class SummaryFile:
    """One flushed window summary with its metadata."""

    version: str
    model: str
    replica: str
    start: float
    end: float
    rows: int
    dropped: int
    summary: dict[str, Any]


class MonitoringStore:
    """Summaries, predictions and labels of every application, under one root (see the module docstring)."""

    def __init__(self, uri: str | None = None) -> None:
        self.uri = uri or default_store_uri()
        try:
            self.fs, root = pafs.FileSystem.from_uri(self.uri if "://" in self.uri else os.path.abspath(self.uri))
        except (pa.ArrowInvalid, OSError, ValueError) as exc:
            raise ConfigError(
                f"monitoring.store: {redact(self.uri)!r} is not a directory or pyarrow.fs URI ({redact(str(exc))}); "
                "use a path or s3://bucket/prefix, gs://..., hdfs://..."
            ) from None
        self.root = root.rstrip("/")
        self.local = isinstance(self.fs, pafs.LocalFileSystem)

    def __repr__(self) -> str:
        return f"MonitoringStore({redact(self.uri)!r})"

    # ------------------------------------------------------------------ writing

    def _path(self, app: str, *parts: str) -> str:
        return "/".join([self.root, _safe(app), *parts])

    def _write(self, path: str, data: bytes) -> None:
        self.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        if self.local:
            tmp = f"{path}.{secrets.token_hex(4)}.tmp"
            with self.fs.open_output_stream(tmp) as out:
                out.write(data)
            self.fs.move(tmp, path)
        else:
            with self.fs.open_output_stream(path) as out:
                out.write(data)

    def _write_table(self, path: str, table: pa.Table) -> None:
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        self._write(path, sink.getvalue().to_pybytes())

    def write_summary(
        self,
        app: str,
        version: str,
        replica: str,
        start: float,
        end: float,
        summary: dict[str, Any],
        dropped: int = 0,
        model: str = "",
    ) -> str:
        path = self._path(app, "summaries", f"v={_safe(version)}", f"{_ms(start)}-{_ms(end)}-{_safe(replica)}.json")
        body = {
            "version": version,
            "model": model,
            "replica": replica,
            "start": start,
            "end": end,
            "rows": int(summary.get("n_rows", 0)),
            "dropped": dropped,
            "summary": summary,
        }
        # allow_nan: an extreme input (1e300 squared) makes a moment inf; Python's JSON reads it back
        self._write(path, json.dumps(body).encode())
        return path

    def write_predictions(self, app: str, version: str, replica: str, end: float, table: pa.Table) -> str:
        path = self._path(app, "predictions", f"v={_safe(version)}", f"{_ms(end)}-{_safe(replica)}.parquet")
        self._write_table(path, table)
        return path

    def write_labels(self, app: str, table: pa.Table) -> str:
        """Append a batch of labels (``request_id``, ``label``; ``row`` defaults to 0)."""
        table = labels_table(table)
        path = self._path(app, "labels", f"{_ms(time.time())}-{secrets.token_hex(4)}.parquet")
        self._write_table(path, table)
        return path

    def write_reference(self, app: str, version: str, reference_json: str) -> None:
        path = self._path(app, "references", f"v={_safe(version)}.json")
        try:
            if self.fs.get_file_info(path).type == pafs.FileType.File:
                return  # written once per version: every replica would write the same bytes
        except OSError:
            pass
        self._write(path, reference_json.encode())

    # ------------------------------------------------------------------ reading

    def _files(self, directory: str) -> list[str]:
        info = self.fs.get_file_info(pafs.FileSelector(directory, allow_not_found=True, recursive=True))
        return sorted(i.path for i in info if i.type == pafs.FileType.File and not i.path.endswith(".tmp"))

    def apps(self) -> list[str]:
        info = self.fs.get_file_info(pafs.FileSelector(self.root, allow_not_found=True))
        return sorted(i.base_name for i in info if i.type == pafs.FileType.Directory)

    def versions(self, app: str) -> list[str]:
        """Versions with summaries, oldest first by their latest flush."""
        latest: dict[str, float] = {}
        for path in self._files(self._path(app, "summaries")):
            version, (_, end) = _version_of(path), _times(path)
            latest[version] = max(latest.get(version, 0.0), end)
        return sorted(latest, key=lambda v: latest[v])

    def summaries(
        self, app: str, version: str | None = None, since: float | None = None, until: float | None = None
    ) -> Iterator[SummaryFile]:
        """Flushes that ended in ``[since, until)`` (of one version, or all)."""
        directory = self._path(app, "summaries", f"v={_safe(version)}") if version else self._path(app, "summaries")
        for path in self._files(directory):
            _, end = _times(path)
            if (since is not None and end < since) or (until is not None and end >= until):
                continue
            with self.fs.open_input_stream(path) as f:
                data = json.loads(f.read())
            yield SummaryFile(
                str(data["version"]),
                str(data.get("model", "")),
                str(data["replica"]),
                float(data["start"]),
                float(data["end"]),
                int(data["rows"]),
                int(data.get("dropped", 0)),
                data["summary"],
            )

    def predictions(
        self, app: str, version: str | None = None, since: float | None = None, until: float | None = None
    ) -> pa.Table:
        """The prediction log's core columns (:data:`PREDICTION_COLUMNS`) for rows predicted in
        ``[since, until)``, by file time first, then by row time."""
        directory = self._path(app, "predictions", f"v={_safe(version)}") if version else self._path(app, "predictions")
        tables = []
        for path in self._files(directory):
            end = _ms_of(path.rsplit("/", 1)[-1].split("-", 1)[0]) / 1000
            if since is not None and end < since:
                continue  # a file holds rows predicted before its flush
            with self.fs.open_input_file(path) as f:
                table = pq.read_table(f, columns=list(PREDICTION_COLUMNS))
            tables.append(table)
        if not tables:
            return _empty_predictions()
        table = pa.concat_tables(tables, promote_options="default")
        import pyarrow.compute as pc

        mask = None
        if since is not None:
            mask = pc.greater_equal(table["ts"], since)
        if until is not None:
            upper = pc.less(table["ts"], until)
            mask = upper if mask is None else pc.and_(mask, upper)
        return table if mask is None else table.filter(mask)

    def labels(self, app: str, since: float | None = None) -> pa.Table:
        """The labels received (in files written since ``since``), the latest per (request_id, row)."""
        tables = []
        for path in self._files(self._path(app, "labels")):
            if since is not None and _times(path)[0] < since:
                continue  # a label is written after its prediction: older files hold older predictions' labels
            with self.fs.open_input_file(path) as f:
                tables.append(pq.read_table(f))
        if not tables:
            return LABEL_SCHEMA.empty_table()
        table = pa.concat_tables(tables)
        frame = table.to_pandas()
        frame = frame.sort_values("labelled_at", kind="stable").drop_duplicates(["request_id", "row"], keep="last")
        return pa.Table.from_pandas(frame, schema=LABEL_SCHEMA, preserve_index=False)

    def reference(self, app: str, version: str) -> str | None:
        path = self._path(app, "references", f"v={_safe(version)}.json")
        try:
            with self.fs.open_input_stream(path) as f:
                return bytes(f.read()).decode()
        except (FileNotFoundError, OSError):
            return None


def labels_table(table: pa.Table) -> pa.Table:
    """Labels in the store's schema: ``request_id`` and ``label`` required, ``row`` 0 by default,
    ``labelled_at`` now by default. Labels are kept as strings (a classifier's class as it was
    written; a regression's number is parsed back at the join)."""
    names = table.column_names
    if missing := [c for c in ("request_id", "label") if c not in names]:
        raise DataError(
            f"labels: no column(s) {missing}; got {names}. A labels file has request_id (from the x-request-id "
            "header or the request_id field of the answer), label, and optionally row (0 for one-row requests)"
        )
    rows = table.num_rows
    if table["request_id"].null_count or table["label"].null_count:
        raise DataError("labels: request_id and label must not be null; drop the rows without a label")
    row = table["row"] if "row" in names else pa.array([0] * rows, pa.int32())
    labelled_at = table["labelled_at"] if "labelled_at" in names else pa.array([time.time()] * rows, pa.float64())
    try:
        return pa.table(
            {
                "request_id": table["request_id"].cast(pa.string()),
                "row": row.cast(pa.int32()),
                "label": table["label"].cast(pa.string()),
                "labelled_at": labelled_at.cast(pa.float64()),
            },
            schema=LABEL_SCHEMA,
        )
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise DataError(f"labels: cannot read the columns as (string, int, string, time): {exc}") from None


def _empty_predictions() -> pa.Table:
    return pa.table(
        {
            "request_id": pa.array([], pa.string()),
            "row": pa.array([], pa.int32()),
            "ts": pa.array([], pa.float64()),
            "version": pa.array([], pa.string()),
            "prediction": pa.array([], pa.string()),
            "score": pa.array([], pa.float64()),
            "input_hash": pa.array([], pa.uint64()),
        }
    )


def _ms(t: float) -> str:
    return f"{round(t * 1000):013d}"


def _ms_of(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        return 0


def _times(path: str) -> tuple[float, float]:
    parts = path.rsplit("/", 1)[-1].split("-")
    return _ms_of(parts[0]) / 1000, (_ms_of(parts[1]) / 1000 if len(parts) > 1 else 0.0)


def _version_of(path: str) -> str:
    for part in path.split("/"):
        if part.startswith("v="):
            return part[2:]
    return "?"
