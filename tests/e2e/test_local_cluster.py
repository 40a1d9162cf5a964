"""`skewless cluster up|status|down`: a real three-node Ray cluster on this machine (a head and
two workers as Ray's own `ray start` processes), one MLflow tracking server for all of them, a
training job whose two workers land on two nodes, a Serve app, and nothing left behind."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import free_port, subprocess_env, wait_for_condition

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _run(args: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def _ours(state_dir: str, gcs_port: str) -> list[str]:
    """Processes whose command line names this cluster (its state directory or its GCS)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if state_dir in cmd or f"127.0.0.1:{gcs_port}" in cmd:
            found.append(f"{proc.name}: {cmd[:160]}")
    return found


def test_a_local_cluster_trains_across_nodes_serves_and_leaves_nothing(tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = subprocess_env(SKEWLESS_HOME=str(home), PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    for key in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH"):
        env.pop(key, None)
    spec = tmp_path / "local.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "name": "e2e",
                "head": {"num_cpus": 1},
                "workers": [{"count": 2, "num_cpus": 2, "resources": {"zone_x": 1}}],
            }
        )
    )
    skewless = str(BIN / "skewless")
    up = _run([skewless, "cluster", "up", str(spec)], env, timeout=400)
    state_path = home / "clusters" / "e2e" / "cluster.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else None
    try:
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        assert state is not None
        token = Path(state["token_path"]).read_text().strip()
        assert token not in up.stdout + up.stderr  # never printed
        assert stat.S_IMODE(Path(state["token_path"]).stat().st_mode) == 0o600

        status = _run([skewless, "cluster", "status", "--json"], env)
        assert status.returncode == 0, status.stderr
        st = json.loads(status.stdout)
        alive = [n for n in st["nodes"] if n["state"] == "ALIVE"]
        assert len(alive) == 3 and sum(n["head"] for n in alive) == 1
        assert sorted(n["resources"].get("zone_x", 0) for n in alive) == [0, 1, 1]  # declared resources
        # what Ray lets us bind is on loopback: the dashboard, the client server, the tracking
        # server; the GCS and the agents listen on every interface whatever the node IP (no Ray
        # setting), guarded by the token, and status lists them
        by_port = {x["port"]: x["host"] for x in st["listeners"]}
        dashboard_port = int(state["dashboard"].rsplit(":", 1)[1])
        mlflow_port = int(state["tracking_uri"].rsplit(":", 1)[1])
        assert by_port.get(dashboard_port) == "127.0.0.1" and by_port.get(mlflow_port) == "127.0.0.1", by_port
        assert httpx.get(f"{state['tracking_uri']}/health", timeout=5).status_code == 200

        # a training job through the Jobs API (no --address: the cluster `up` started), its two
        # workers on two nodes (each worker node has 2 CPUs, the head 1), registered on the head's server
        gen = _run([skewless, "data", "generate", str(home / "data" / "churn.parquet"), "--rows", "3000"], env)
        assert gen.returncode == 0, gen.stderr
        job = _run([skewless, "train", "submit", "tests/e2e/configs/churn_two_nodes.yaml"], env, timeout=600)
        assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-2000:]
        assert "models:/churn/1" in job.stdout
        # the submitted job's log shows the job (its epochs), the engines' INFO is in its log file
        assert re.search(r"epoch 1/\d+ done in [\d.]+s \([\d,]+ rows/s", job.stdout), job.stdout[-4000:]
        assert "Starting execution of Dataset" not in job.stdout and "engine logs: " in job.stdout
        headers = {"Authorization": f"Bearer {token}"}
        actors = httpx.get(
            f"{state['dashboard']}/api/v0/actors?limit=1000&detail=1", headers=headers, timeout=30
        ).json()["data"]["result"]["result"]
        workers = {a["node_id"] for a in actors if "RayTrainWorker" in str(a.get("class_name"))}
        assert len(workers) == 2, [(a.get("class_name"), a.get("node_id")) for a in actors]
        versions = httpx.get(
            f"{state['tracking_uri']}/api/2.0/mlflow/registered-models/get", params={"name": "churn"}, timeout=10
        ).json()
        assert versions["registered_model"]["name"] == "churn"
        assert not (home / "mlflow.db").exists()  # nobody fell back to the local SQLite store

        # serve on it (no --address either), then status shows the app and its replicas
        config = yaml.safe_load((REPO / "serve_apps/configs/churn.yaml").read_text())
        port = free_port()
        config["http_options"]["port"] = port
        app = config["applications"][0]
        app["args"]["model_uri"] = "models:/churn@champion"
        app["deployments"][0]["ray_actor_options"]["num_cpus"] = 0.25
        path = tmp_path / "serve.yaml"
        path.write_text(yaml.safe_dump(config))
        deployed = _run([skewless, "serve", "deploy", str(path)], env)
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr
        endpoint = f"http://127.0.0.1:{port}/churn-demo"
        wait_for_condition(
            lambda: httpx.get(f"{endpoint}/healthz", timeout=5).status_code == 200, timeout=180, message="healthz"
        )
        row = {"age": 40.0, "income": 50000.0, "tenure_months": 10.0, "support_calls": 1.0,
               "plan": "basic", "region": "region_01", "device": "ios"}  # fmt: skip
        assert httpx.post(f"{endpoint}/predict", json={"instances": [row]}, timeout=30).status_code == 200
        shown = json.loads(_run([skewless, "cluster", "status", "--json"], env).stdout)
        assert shown["applications"]["churn-demo"]["replicas"]["Predictor"] >= 1
        assert any(j["status"] == "SUCCEEDED" for j in shown["jobs"])
        table = _run([skewless, "cluster", "status"], env)
        assert "listeners:" in table.stdout and "churn-demo" in table.stdout, table.stdout
    finally:
        down = _run([skewless, "cluster", "down"], env, timeout=180)
        assert down.returncode == 0, down.stdout + down.stderr
    if state is not None:
        gcs_port = state["gcs_address"].rsplit(":", 1)[1]
        wait_for_condition(
            lambda: not _ours(state["state_dir"], gcs_port), timeout=60, message="no process of the cluster left"
        )
        assert not list(Path("/tmp").glob(f"skw-{os.getuid()}-{gcs_port}-*"))  # the nodes' temp dirs
    missing = _run([skewless, "cluster", "status"], env)
    assert missing.returncode != 0 and "no cluster is up" in missing.stdout + missing.stderr
