"""Ray's own tools against a real `ray start --head` cluster: `ray job submit`, `serve deploy`.

This module starts its own head node (token auth on, everything on 127.0.0.1) and stops it
with `ray stop` at the end; it must not run beside another Ray cluster on this machine.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import free_port, listeners, subprocess_env, wait_for_condition

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@dataclass(frozen=True)
class Cluster:
    dashboard: str
    env: dict[str, str]
    home: Path
    serve: dict[str, int] = field(default_factory=dict)  # the Serve HTTP port, once a test started it


def _run(args: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    home = tmp_path_factory.mktemp("cluster-home")
    env = subprocess_env(
        SKEWLESS_HOME=str(home), RAY_AUTH_MODE="token", PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"
    )
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
    address = f"http://127.0.0.1:{dash}"

    # Ready means a job can be submitted: the dashboard agent comes up after `ray start` returns.
    def submits() -> bool:
        done = _run([str(BIN / "ray"), "job", "submit", "--address", address, "--", "python", "-c", "pass"], env, 60)
        if done.returncode != 0:  # the timeout's message then says why
            raise RuntimeError(f"`ray job submit` exited {done.returncode}: {(done.stdout + done.stderr)[-1500:]}")
        return True

    wait_for_condition(submits, timeout=180, interval=2, message="Ray Jobs API ready")
    try:
        yield Cluster(address, env, home)
    finally:
        _run([str(BIN / "ray"), "stop", "--force"], env, timeout=120)
        # nothing of Serve's lives on: an HAProxy whose parent died is an orphan (parent: init)
        wait_for_condition(lambda: not _orphaned_haproxy(), timeout=20, message="no orphaned haproxy")


def _orphaned_haproxy() -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if (
                proc.name.isdigit()
                and (proc / "comm").read_text().strip() == "haproxy"
                and (proc / "stat").read_text().rsplit(")", 1)[1].split()[1] == "1"
            ):
                found.append(int(proc.name))
        except OSError:
            continue
    return found


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
    # `skewless serve deploy` starts Serve the shipped way: HAProxy in front, on 127.0.0.1 only
    deployed = _run([str(BIN / "skewless"), "serve", "deploy", str(path), "--address", cluster.dashboard], env)
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr

    endpoint = f"http://127.0.0.1:{port}/churn-demo"
    cluster.serve["port"] = port
    health = wait_for_condition(
        lambda: httpx.get(f"{endpoint}/healthz", timeout=5).json(), timeout=180, message="serve deploy healthz"
    )
    assert health["model"]["name"] == "churn"
    found = listeners()
    assert [(name, host) for _, name, host, p in found if p == port] == [("haproxy", "127.0.0.1")], found
    assert all(host == "127.0.0.1" for _, name, host, _ in found if name == "haproxy"), found
    # Ray's own `serve deploy` of the same file updates the running apps (Serve keeps its mode)
    redeployed = _run([str(BIN / "serve"), "deploy", str(path), "--address", cluster.dashboard], env)
    assert redeployed.returncode == 0, redeployed.stdout + redeployed.stderr
    assert httpx.get(f"{endpoint}/healthz", timeout=5).status_code == 200
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
    # and, like `serve deploy` and the train commands, it finds the cluster through RAY_ADDRESS
    again = _run([str(BIN / "skewless"), "serve", "deploy", str(path)], {**env, "RAY_ADDRESS": cluster.dashboard})
    assert again.returncode == 0 and cluster.dashboard in again.stdout, again.stdout + again.stderr


def test_skewless_train_submit_lineage_and_reproduce(cluster: Cluster) -> None:
    env = cluster.env
    data = cluster.home / "data" / "churn.parquet"
    if not data.exists():
        assert _run([str(BIN / "skewless"), "data", "generate", str(data), "--rows", "3000"], env).returncode == 0
    sk = str(BIN / "skewless")

    submitted = _run([sk, "train", "submit", "jobs/configs/churn.yaml", "--address", cluster.dashboard], env, 600)
    assert submitted.returncode == 0, submitted.stdout[-4000:] + submitted.stderr[-2000:]
    job_id = submitted.stdout.split("submitted ", 1)[1].split()[0]
    assert "SUCCEEDED" in submitted.stdout and "registered models:/churn/" in submitted.stdout

    status = _run([sk, "train", "status", job_id, "--address", cluster.dashboard], env)
    assert status.returncode == 0 and "SUCCEEDED" in status.stdout
    listed = _run([sk, "train", "list", "--address", cluster.dashboard], env)
    assert job_id in listed.stdout
    logs = _run([sk, "train", "logs", job_id, "--address", cluster.dashboard], env)
    assert "training on 2 Ray Train worker(s)" in logs.stdout

    # The job ran from an uploaded copy without .git: the commit came from the submitter.
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    lineage = _run([sk, "models", "lineage", "models:/churn@candidate"], env)
    assert lineage.returncode == 0, lineage.stderr
    if head:
        assert head in lineage.stdout
    for what in ("dataset sha256", "preprocessing code", "environment sha256", "holdout_accuracy"):
        assert what in lineage.stdout

    # Reproduced on a cluster of another shape: a fresh local Ray with 6 logical CPUs instead of
    # the head's 8 (its readers cut the file differently). Exit 0 means bit-identical weights.
    reproduced = _run([sk, "reproduce", "models:/churn@candidate"], {**env, "RAY_ADDRESS": "local"}, 600)
    assert reproduced.returncode == 0, reproduced.stdout[-3000:] + reproduced.stderr[-2000:]
    assert "holdout_accuracy" in reproduced.stdout and "aliases unchanged" in reproduced.stdout
    assert "exact: the same weights, bit for bit" in reproduced.stdout

    # Changed data: refused before any training, naming the path and both fingerprints.
    assert _run([sk, "data", "generate", str(data), "--rows", "3000", "--seed", "99"], env).returncode == 0
    refused = _run([sk, "reproduce", "models:/churn@candidate"], env, 300)
    assert refused.returncode == 2 and "cannot reproduce: the dataset at" in refused.stderr, refused.stderr


def test_a_canary_rollout_from_the_cli_promotes_with_no_failed_request(cluster: Cluster, tmp_path: Path) -> None:
    """`skewless serve rollout start` against the cluster's Serve, under load; then `status` and
    `models history` from other processes. Needs the two versions the tests above registered."""
    import random
    import threading

    import pyarrow.parquet as pq

    env, sk = cluster.env, str(BIN / "skewless")
    if "port" not in cluster.serve:
        pytest.skip("needs the Serve instance test_ray_job_submit_then_serve_deploy starts")
    code = (
        "from runtime.registry import configure_mlflow, resolve; configure_mlflow(); "
        "print(resolve('models:/churn@champion').version, resolve('models:/churn@candidate').version)"
    )
    found = _run([sys.executable, "-c", code], env)
    assert found.returncode == 0, found.stderr
    champion, candidate = found.stdout.split()
    if candidate == champion:
        candidate = "2" if champion == "1" else "1"
    port = cluster.serve["port"]
    spec = {
        "app": "churn-ro",
        "model": "churn",
        "candidate": candidate,
        "steps": [50, 100],
        "http_port": port,
        "arm_num_cpus": 0.25,
        "analysis": {"window_s": 3.0, "max_extensions": 5, "thresholds": {"min_requests": 20, "alpha": 0.01}},
    }
    path = tmp_path / "rollout.yaml"
    path.write_text(yaml.safe_dump(spec))
    rows = pq.read_table(cluster.home / "data" / "churn.parquet").drop_columns(["churned"]).slice(0, 2000).to_pylist()
    url = f"http://127.0.0.1:{port}/churn-ro"
    statuses: list[int] = []
    stop = threading.Event()

    def load() -> None:
        # rows in a random order: traffic in file order is not stationary (blocks of the file
        # differ by several points), and a window that caught the arms in different blocks once
        # read identical models as diverging
        rng = random.Random(7)
        with httpx.Client(timeout=30) as client:
            i = 0
            while not stop.is_set() and i < 20_000:
                r = client.post(f"{url}/predict", json={"instances": [rows[rng.randrange(len(rows))]]})
                statuses.append(r.status_code)
                i += 1

    proc = subprocess.Popen(
        [sk, "serve", "rollout", "start", str(path)],
        cwd=REPO,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    worker = threading.Thread(target=load, daemon=True)
    try:
        wait_for_condition(
            lambda: proc.poll() is None and httpx.get(f"{url}/healthz", timeout=5).status_code == 200,
            timeout=180,
            message="the rollout's router answers",
        )
        worker.start()
        out, err = proc.communicate(timeout=300)
    finally:
        stop.set()
        proc.kill()
        if worker.is_alive():
            worker.join(timeout=60)
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    assert "promoted" in out and "step 2/2: 100%" in out, out
    assert statuses and set(statuses) == {200}, {s: statuses.count(s) for s in set(statuses)}
    status = _run([sk, "serve", "rollout", "status", str(path), "--json"], env)
    assert status.returncode == 0 and '"status": "promoted"' in status.stdout, status.stdout + status.stderr
    history = _run([sk, "models", "history", "churn", "--alias", "champion"], env)
    assert history.returncode == 0 and "every window" in history.stdout, history.stdout + history.stderr
    # a bad spec: the field, the value and the fix, no traceback, exit 2
    path.write_text(yaml.safe_dump({**spec, "steps": [50, 20]}))
    refused = _run([sk, "serve", "rollout", "start", str(path)], env)
    assert refused.returncode == 2 and "must increase" in refused.stderr and "Traceback" not in refused.stderr
