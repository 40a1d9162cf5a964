"""A real Prometheus for tests: find Debian's binaries, skip (or fail, in CI) without them, and
run one on 127.0.0.1 that scrapes given targets and evaluates given rule files."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import free_port

INSTALL_HINT = "install Debian's prometheus package: apt-get install prometheus"

# The model-monitoring metrics as a scrape of Ray's metrics agent names them (ray_ prefix; a
# counter gains _total): what the alert rules and the Grafana panels are written against. A test
# holds it equal to what runtime.monitoring's gauges declare.
MONITORING_METRICS = frozenset(
    {
        "ray_skewless_drift_score",
        "ray_skewless_drift_detected",
        "ray_skewless_drift_dataset",
        "ray_skewless_drift_share",
        "ray_skewless_data_problem",
        "ray_skewless_monitor_window_rows",
        "ray_skewless_performance_estimated",
        "ray_skewless_performance_realised",
        "ray_skewless_performance_reference",
        "ray_skewless_monitor_label_lag_seconds",
        "ray_skewless_monitor_dropped_rows_total",
    }
)


def _binary(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    debian = Path("/usr/bin") / name
    return str(debian) if os.access(debian, os.X_OK) else None


def promtool() -> str | None:
    """``promtool``'s path: on PATH, else /usr/bin; None when absent."""
    return _binary("promtool")


def prometheus_binary() -> str | None:
    """``prometheus``'s path: on PATH, else /usr/bin; None when absent."""
    return _binary("prometheus")


def require_prometheus() -> None:
    """Skip the calling test when ``prometheus`` or ``promtool`` is missing, or fail it when
    SKEWLESS_REQUIRE_PROMETHEUS=1 (CI sets it, so a broken install cannot pass as a skip)."""
    missing = [name for name, path in (("prometheus", prometheus_binary()), ("promtool", promtool())) if path is None]
    if not missing:
        return
    message = f"{' and '.join(missing)} not found on PATH or in /usr/bin: {INSTALL_HINT}"
    if os.environ.get("SKEWLESS_REQUIRE_PROMETHEUS") == "1":
        pytest.fail(f"{message} (SKEWLESS_REQUIRE_PROMETHEUS=1)")
    pytest.skip(message)


class RunningPrometheus:
    """A started Prometheus's HTTP API."""

    def __init__(self, url: str, process: subprocess.Popen[bytes], log: Path) -> None:
        self.url = url
        self.process = process
        self.log = log
        self._http = httpx.Client(base_url=url, timeout=5.0)

    def _data(self, path: str, **params: str) -> Any:
        response = self._http.get(path, params=params)
        response.raise_for_status()
        body = response.json()
        if body.get("status") != "success":
            raise AssertionError(f"GET {path} {params}: {body}")
        return body["data"]

    def alerts(self) -> list[dict[str, Any]]:
        """Pending and firing alerts (GET /api/v1/alerts); resolved ones are gone."""
        return list(self._data("/api/v1/alerts")["alerts"])

    def query(self, promql: str) -> list[Any]:
        """An instant query's result vector (GET /api/v1/query)."""
        return list(self._data("/api/v1/query", query=promql)["result"])

    def _alerts_named(self, name: str) -> list[dict[str, Any]]:
        return [a for a in self.alerts() if a["labels"].get("alertname") == name]

    def _timeout(self, what: str, timeout_s: float, seen: list[dict[str, Any]]) -> AssertionError:
        try:
            up: Any = self.query("up")
        except (httpx.HTTPError, AssertionError) as exc:
            up = repr(exc)
        return AssertionError(f"{what} within {timeout_s}s; alerts seen: {seen}; last `up`: {up}")

    def wait_for_alert(self, name: str, timeout_s: float, state: str = "firing") -> dict[str, Any]:
        """Poll until alert ``name`` is in ``state``; return it. On timeout, raise an
        AssertionError with the alerts seen and the scrape targets' ``up``."""
        deadline = time.monotonic() + timeout_s
        seen: list[dict[str, Any]] = []
        while True:
            seen = self.alerts()
            for alert in seen:
                if alert["labels"].get("alertname") == name and alert["state"] == state:
                    return alert
            if time.monotonic() > deadline:
                raise self._timeout(f"alert {name} not {state}", timeout_s, seen)
            time.sleep(0.2)

    def wait_for_no_alert(self, name: str, timeout_s: float) -> None:
        """Poll until no alert ``name`` is pending or firing."""
        deadline = time.monotonic() + timeout_s
        while True:
            seen = self._alerts_named(name)
            if not seen:
                return
            if time.monotonic() > deadline:
                raise self._timeout(f"alert {name} still active", timeout_s, seen)
            time.sleep(0.2)

    def close(self) -> None:
        self._http.close()


def _wait_ready(url: str, process: subprocess.Popen[bytes], log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    last: object = None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"prometheus exited with {process.returncode}:\n{log.read_text()[-4000:]}")
        try:
            response = httpx.get(f"{url}/-/ready", timeout=1.0)
            if response.status_code == 200:
                return
            last = response.status_code
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(0.1)
    raise TimeoutError(
        f"prometheus at {url} not ready within {timeout_s}s (last: {last!r}):\n{log.read_text()[-4000:]}"
    )


@contextmanager
def running_prometheus(
    tmp_path: Path,
    targets: list[str],
    rule_files: list[Path],
    scrape_interval: str = "1s",
    evaluation_interval: str = "1s",
    ready_timeout_s: float = 30.0,
) -> Iterator[RunningPrometheus]:
    """Run the real ``prometheus`` on 127.0.0.1 (a free port), scraping ``targets``
    (host:port) and evaluating ``rule_files``; stopped on exit, killed if it will not stop."""
    binary = prometheus_binary()
    if binary is None:
        raise RuntimeError(f"prometheus not found on PATH or in /usr/bin: {INSTALL_HINT}")
    root = tmp_path / "prometheus"
    root.mkdir(parents=True, exist_ok=True)
    config = root / "prometheus.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": scrape_interval, "evaluation_interval": evaluation_interval},
                "rule_files": [str(Path(f).resolve()) for f in rule_files],
                "scrape_configs": [{"job_name": "test", "static_configs": [{"targets": list(targets)}]}],
            }
        )
    )
    address = f"127.0.0.1:{free_port()}"
    log = root / "prometheus.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={root / 'data'}",
                f"--web.listen-address={address}",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://{address}"
    running: RunningPrometheus | None = None
    try:
        _wait_ready(url, process, log, ready_timeout_s)
        running = RunningPrometheus(url, process, log)
        yield running
    finally:
        if running is not None:
            running.close()
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
