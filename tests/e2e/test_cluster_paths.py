"""Ray's own tools against a real `ray start --head` cluster: `ray job submit`, `serve deploy`.

This module starts its own head node (token auth on, everything on 127.0.0.1) and stops it
with `ray stop` at the end; it must not run beside another Ray cluster on this machine.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import free_port, wait_for_condition

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@dataclass(frozen=True)
class Cluster:
    dashboard: str
    env: dict[str, str]
    home: Path


def _run(args: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    home = tmp_path_factory.mktemp("cluster-home")
    env = {
        **os.environ,
        "SKEWLESS_HOME": str(home),
        "RAY_AUTH_MODE": "token",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    for var in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI"):
        env.pop(var, None)
    dash = free_port()
    started = _run(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            f"--port={free_port()}",
            f"--dashboard-port={dash}",
            "--dashboard-host=127.0.0.1",
            "--num-cpus=8",
            "--disable-usage-stats",
        ],
        env,
        timeout=120,
    )
    assert started.returncode == 0, started.stdout + started.stderr
    try:
        yield Cluster(f"http://127.0.0.1:{dash}", env, home)
    finally:
        _run([str(BIN / "ray"), "stop", "--force"], env, timeout=120)


def test_ray_job_submit_then_serve_deploy(cluster: Cluster, tmp_path: Path) -> None:
    env = cluster.env
    gen = _run(
        [str(BIN / "skewless"), "data", "generate", str(cluster.home / "data" / "churn.parquet"), "--rows", "3000"], env
    )
    assert gen.returncode == 0, gen.stderr

    job = _run(
        [
            str(BIN / "ray"),
            "job",
            "submit",
            "--address",
            cluster.dashboard,
            "--working-dir",
            ".",
            "--",
            "python",
            "-m",
            "jobs.train",
            "--config",
            "jobs/configs/churn.yaml",
        ],
        env,
        timeout=600,
    )
    assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-2000:]
    assert "models:/churn/1" in job.stdout

    # The shipped Serve config, pointed at this job's model and a free port.
    config = yaml.safe_load((REPO / "serve_apps/configs/churn.yaml").read_text())
    port = free_port()
    config["http_options"]["port"] = port
    config["applications"][0]["args"]["model_uri"] = "models:/churn@champion"
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    deployed = _run([str(BIN / "serve"), "deploy", str(path), "--address", cluster.dashboard], env)
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr

    endpoint = f"http://127.0.0.1:{port}/churn-demo"
    health = wait_for_condition(
        lambda: httpx.get(f"{endpoint}/healthz", timeout=5).json(), timeout=180, message="serve deploy healthz"
    )
    assert health["model"]["name"] == "churn"
    row = {
        "age": 40.0,
        "income": 76912.85,
        "tenure_months": 10.3,
        "support_calls": None,
        "plan": "basic",
        "region": "region_05",
        "device": "desktop",
    }
    resp = httpx.post(f"{endpoint}/predict", json={"instances": [row]}, timeout=30)
    assert resp.status_code == 200 and resp.json()["predictions"][0] in (0, 1)

    # `skewless serve deploy` validates the app args before anything reaches the cluster.
    config["applications"][0]["args"] = {"model_url": "models:/churn@champion"}
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(config))
    refused = _run([str(BIN / "skewless"), "serve", "deploy", str(bad), "--address", cluster.dashboard], env)
    assert refused.returncode == 2 and "did you mean 'model_uri'" in refused.stderr, refused.stderr
    assert httpx.get(f"{endpoint}/healthz", timeout=5).status_code == 200  # untouched
