"""Offline/online parity: the same raw rows scored by MLflow's pyfunc and over HTTP.

Offline goes through MLflow's own ``mlflow.pyfunc.load_model(...).predict(DataFrame)`` (on a copy
whose every file was verified first: :func:`runtime.registry.load_pyfunc`); online
through ``POST /predict`` on the live Serve app. Both must give identical labels and
bit-identical probabilities, because both run the one ``runtime.preprocessing`` transform
and the same weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa


@dataclass(frozen=True)
class ParityReport:
    rows: int
    labels_equal: bool
    max_abs_diff: float
    model_version: str | None

    @property
    def ok(self) -> bool:
        return self.labels_equal and self.max_abs_diff == 0.0

    def __str__(self) -> str:
        verdict = "PASS" if self.ok else "FAIL"
        return (
            f"{verdict}: {self.rows} rows, labels identical={self.labels_equal}, "
            f"max |offline - online| = {self.max_abs_diff:.3g}"
        )


def _online(endpoint: str, records: list[dict[str, Any]], timeout: float, api_key: str | None) -> dict[str, Any]:
    import httpx

    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    resp = httpx.post(f"{endpoint}/predict", json={"instances": records}, timeout=timeout, headers=headers)
    resp.raise_for_status()
    body: dict[str, Any] = resp.json()
    return body


def check_parity(
    endpoint: str, model_uri: str, rows: pa.Table, timeout: float = 60.0, api_key: str | None = None
) -> ParityReport:
    """Score ``rows`` (raw features; a label column is ignored) offline and online; ``api_key``
    is sent as a bearer token when the endpoint requires one."""
    from runtime.registry import configure_mlflow, load_pyfunc

    configure_mlflow()
    records = rows.to_pylist()
    online = _online(endpoint, records, timeout, api_key)
    offline = load_pyfunc(model_uri).predict(rows.to_pandas())  # verified before MLflow runs its code

    labels_equal = list(offline["prediction"]) == online["predictions"]
    if "probabilities" in online:
        off = np.stack([offline[f"probability_{c}"].to_numpy() for c in online["classes"]], axis=1)
        on = np.asarray(online["probabilities"], dtype=np.float32)
        diff = float(np.max(np.abs(off.astype(np.float64) - on.astype(np.float64))))
    else:
        off = offline["prediction"].to_numpy(dtype=np.float64)
        diff = float(np.max(np.abs(off - np.asarray(online["predictions"], dtype=np.float64))))
        labels_equal = True
    return ParityReport(len(records), labels_equal, diff, online.get("model", {}).get("version"))
