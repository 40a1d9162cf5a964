"""``skewless demo``: the whole path on one machine.

generate data -> train (Ray Train, 2 workers) -> register (MLflow) -> serve (Ray Serve)
-> query over HTTP -> parity check (offline pyfunc vs online HTTP, bit for bit).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Progress = Callable[[str], None]


@dataclass(frozen=True)
class DemoResult:
    endpoint: str
    model_uri: str
    version: str
    metrics: dict[str, float]
    parity: Any
    curl: str
    tracking_uri: str
    data_path: Path


def wait_until_healthy(endpoint: str, timeout_s: float = 120.0) -> dict[str, Any]:
    """Poll ``GET /healthz`` until it answers 200, or raise after ``timeout_s``."""
    import httpx

    deadline = time.monotonic() + timeout_s
    last: Exception | str = "no answer"
    while time.monotonic() < deadline:
        try:
            resp = httpx.get(f"{endpoint}/healthz", timeout=5.0)
            if resp.status_code == 200:
                body: dict[str, Any] = resp.json()
                return body
            last = f"HTTP {resp.status_code}"
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(0.25)
    from runtime.errors import ServingError

    raise ServingError(f"{endpoint}/healthz did not become healthy within {timeout_s:.0f}s (last: {last})")


def run_demo(
    rows: int = 20_000,
    epochs: int = 4,
    workers: int = 2,
    port: int = 8000,
    model_name: str = "churn-demo",
    progress: Progress = print,
) -> DemoResult:
    import json

    from ray import serve

    from runtime.config import validate
    from runtime.connect import connect
    from runtime.data import SyntheticConfig, generate_synthetic, synthetic_feature_spec
    from runtime.registry import skewless_home, tracking_uri
    from runtime.serving import DEFAULT_API_KEY_ENV, build_predictor_app, check_parity, ingress_options, run_app
    from runtime.training import TrainJobConfig, run_training

    home = skewless_home()
    data_path = home / "demo" / "churn.parquet"
    progress(f"[1/5] generating {rows} synthetic rows -> {data_path}")
    generate_synthetic(data_path, SyntheticConfig(rows=rows, seed=7))

    cfg = validate(
        TrainJobConfig,
        {
            "data": {"path": str(data_path)},
            "features": synthetic_feature_spec("binary"),
            "model": {"hidden": [64, 32]},
            "optimizer": {"lr": 3e-3},
            "training": {"epochs": epochs, "batch_size": 256, "num_workers": workers, "seed": 7},
            "registry": {"model_name": model_name},
        },
        "demo config",
    )
    progress(f"[2/5] starting Ray and training ({workers} workers)")
    connect()
    outcome = run_training(cfg, progress=lambda m: progress(f"      {m}"))

    model_uri = f"models:/{model_name}@champion"
    route = f"/{model_name}"
    endpoint = f"http://127.0.0.1:{port}{route}"
    progress(f"[3/5] deploying {model_uri} on Ray Serve at {endpoint}")
    http = {"host": "127.0.0.1", "port": port}
    serve.start(http_options=http, controller_options=ingress_options(http))  # HAProxy in front
    # With $SKEWLESS_API_KEY set, the demo's endpoint requires it (and the parity check sends it).
    api_key = os.environ.get(DEFAULT_API_KEY_ENV) or None
    app_args = {"model_uri": model_uri} | ({"api_key_env": DEFAULT_API_KEY_ENV} if api_key else {})
    run_app(build_predictor_app(app_args), name=model_name, route_prefix=route)
    health = wait_until_healthy(endpoint)
    served = str(health["model"]["version"])
    progress(f"      healthy: serving version {served} ({outcome.decision})")

    label = cfg.feature_spec_dict()["label"]["name"]
    sample = outcome.holdout_sample.slice(0, 256).drop_columns([label])
    progress(f"[4/5] querying: {sample.num_rows} raw holdout rows over HTTP and offline via MLflow pyfunc")
    parity = check_parity(endpoint, model_uri, sample, api_key=api_key)
    progress(f"[5/5] parity {parity}")

    one = json.dumps({"instances": [sample.slice(0, 1).to_pylist()[0]]})
    auth = f' -H "Authorization: Bearer ${DEFAULT_API_KEY_ENV}"' if api_key else ""  # the variable, never the key
    curl = f"curl -s -X POST {endpoint}/predict -H 'Content-Type: application/json'{auth} -d '{one}'"
    return DemoResult(endpoint, model_uri, served, outcome.metrics, parity, curl, tracking_uri(), data_path)
