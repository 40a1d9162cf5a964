"""The shipped Prometheus files: the alert rules and example config pass promtool's checks, the
rules pass their promtool unit tests, and a real Prometheus scraping a real exporter fires and
resolves SkewlessInputDrift (no Ray: a prometheus_client exporter shows the names Ray would)."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry, Gauge, start_http_server

from tests.conftest import free_port
from tests.prometheus import MONITORING_METRICS, promtool, require_prometheus, running_prometheus

PROMETHEUS_DIR = Path(__file__).resolve().parents[2] / "cluster" / "prometheus"
RULES = PROMETHEUS_DIR / "skewless-rules.yml"
RULE_TESTS = PROMETHEUS_DIR / "skewless-rules.test.yml"
CONFIG = PROMETHEUS_DIR / "prometheus.yml"
ALERTS = {
    "SkewlessInputDrift",
    "SkewlessPredictionDrift",
    "SkewlessDataProblem",
    "SkewlessEstimatedPerformanceDrop",
    "SkewlessRealisedPerformanceDrop",
    "SkewlessPredictionLogDropping",
}


def test_monitoring_metrics_are_the_ones_the_monitor_exports() -> None:
    from runtime.monitoring._gauges import DROPPED, GAUGES

    assert {f"ray_{name}" for name in GAUGES} | {f"ray_{DROPPED}_total"} == MONITORING_METRICS


def test_rules_use_only_monitoring_metrics() -> None:
    """A misspelt name would pass promtool's unit tests that spell it the same way."""
    rules = RULES.read_text()
    used = set(re.findall(r"\bray_skewless_[a-z_]+", rules))
    expressions = "".join(rule["expr"] for group in yaml.safe_load(rules)["groups"] for rule in group["rules"])
    assert used and used <= MONITORING_METRICS, used - MONITORING_METRICS
    assert MONITORING_METRICS - set(re.findall(r"\bray_skewless_[a-z_]+", expressions)) == {
        "ray_skewless_drift_score",  # per-feature scores: on the dashboard, not an alert
        "ray_skewless_monitor_label_lag_seconds",  # context for the realised alert, on the dashboard
    }


def run_promtool(*args: str) -> str:
    tool = promtool()
    assert tool is not None
    done = subprocess.run([tool, *args], capture_output=True, text=True, timeout=60)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"promtool {' '.join(args)} exited {done.returncode}:\n{output}"
    return output


def test_rules_pass_promtool_check() -> None:
    require_prometheus()
    output = run_promtool("check", "rules", "--lint=all", "--lint-fatal", str(RULES))
    assert f"SUCCESS: {len(ALERTS)} rules found" in output, output


def test_rules_pass_their_unit_tests_and_every_alert_is_tested_both_ways() -> None:
    require_prometheus()
    cases = [case for test in yaml.safe_load(RULE_TESTS.read_text())["tests"] for case in test["alert_rule_test"]]
    assert {c["alertname"] for c in cases if c["exp_alerts"]} == ALERTS  # fires
    assert {c["alertname"] for c in cases if not c["exp_alerts"]} == ALERTS  # stays quiet
    shipped = {rule["alert"] for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]}
    assert shipped == ALERTS
    output = run_promtool("test", "rules", str(RULE_TESTS))
    assert "SUCCESS" in output, output


def test_example_config_passes_promtool_check_from_any_directory(tmp_path: Path) -> None:
    """The rules path is relative to the config file, not the working directory; a missing
    service-discovery file (no Ray cluster started yet) is only a warning."""
    require_prometheus()
    tool = promtool()
    assert tool is not None
    done = subprocess.run(
        [tool, "check", "config", "--lint=all", "--lint-fatal", str(CONFIG)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert f"SUCCESS: {len(ALERTS)} rules found" in output, output


@pytest.fixture
def exporter() -> Iterator[tuple[str, CollectorRegistry]]:
    """A prometheus_client exporter on 127.0.0.1 with a private registry."""
    registry = CollectorRegistry()
    port = free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    try:
        yield f"127.0.0.1:{port}", registry
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_input_drift_fires_and_resolves_in_a_real_prometheus(
    tmp_path: Path, exporter: tuple[str, CollectorRegistry]
) -> None:
    require_prometheus()
    target, registry = exporter
    labels = ["model", "version", "SessionName"]  # Ray's metrics agent adds SessionName
    verdict = Gauge("ray_skewless_drift_dataset", "dataset drift verdict", labels, registry=registry)
    share = Gauge("ray_skewless_drift_share", "share of features drifted", labels, registry=registry)
    verdict.labels("m", "1", "s").set(1)
    share.labels("m", "1", "s").set(0.5)

    with running_prometheus(tmp_path, [target], [RULES]) as prom:
        alert = prom.wait_for_alert("SkewlessInputDrift", 60)
        assert alert["labels"] == {
            "alertname": "SkewlessInputDrift",
            "model": "m",
            "version": "1",
            "severity": "warning",
        }
        assert "50% of its features drifted" in alert["annotations"]["description"]
        assert float(alert["value"]) == 0.5

        verdict.labels("m", "1", "s").set(0)
        prom.wait_for_no_alert("SkewlessInputDrift", 30)
