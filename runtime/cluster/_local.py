"""A real multi-node Ray cluster on one machine: ``skewless cluster up|down|status`` (local).

Every node is Ray's own ``ray start --block`` process (a head, and one per worker), each with
its declared CPUs, GPUs, object store and custom resources, and every port on 127.0.0.1; beside
them MLflow's own ``mlflow server`` (SQLite and a proxied artifact store in the cluster's state
directory) is the one registry every node and the CLI use, through ``MLFLOW_TRACKING_URI``.

Token authentication is on: a fresh token is written to the state directory (``0600``, in a
``0700`` directory), handed to every node through ``RAY_AUTH_TOKEN_PATH``, and never printed.
The state (ports, process groups, addresses) is ``cluster.json`` there; ``current.json`` in
``$SKEWLESS_HOME/clusters`` names the cluster that commands without ``--address`` use.

``ray start --block`` keeps each node's processes under one process group that lives until it
is signalled: ``cluster down`` stops exactly those groups (never another Ray on the machine, as
``ray stop`` would), waits, and kills what is left.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pydantic import Field

from runtime.cluster._sockets import listening_sockets
from runtime.config import StrictModel, read_yaml, validate
from runtime.connect import CURRENT_CLUSTER, cluster_client_env, clusters_dir, free_port
from runtime.errors import ClusterError

Progress = Callable[[str], None]


class NodeSpec(StrictModel):
    """One node's declared resources."""

    num_cpus: int = Field(default=2, ge=0, description="Logical CPUs Ray schedules on this node.")
    num_gpus: int = Field(default=0, ge=0, description="GPUs (the head sees the machine's; workers as declared).")
    object_store_memory: int | None = Field(
        default=None, ge=78643200, description="Object store bytes (default: Ray's share of memory)."
    )
    resources: dict[str, float] = Field(default_factory=dict, description="Custom resources, e.g. {accelerator_a: 1}.")
    count: int = Field(default=1, ge=1, le=16, description="Workers: how many nodes of this shape.")


class LocalClusterSpec(StrictModel):
    """``cluster/local.yaml``: a head and worker nodes on this machine."""

    provider: str = Field(default="local", pattern="^local$", description="local: Ray processes on this machine.")
    name: str = Field(default="skewless-local", pattern=r"^[a-z0-9][a-z0-9-]{0,39}$", description="Cluster name.")
    head: NodeSpec = Field(default_factory=lambda: NodeSpec(num_cpus=1), description="The head node.")
    workers: list[NodeSpec] = Field(default_factory=lambda: [NodeSpec(count=2)], description="Worker node shapes.")
    dashboard_port: int = Field(default=0, ge=0, le=65535, description="Dashboard port on 127.0.0.1 (0: a free one).")
    mlflow_port: int = Field(default=0, ge=0, le=65535, description="Tracking server port on 127.0.0.1 (0: free).")
    ready_timeout_s: float = Field(default=180, gt=0, description="How long to wait for every node to join.")


@dataclass
class ClusterState:
    """What ``up`` started, as ``cluster.json`` records it."""

    name: str
    state_dir: str
    gcs_address: str
    dashboard: str
    tracking_uri: str
    token_path: str
    nodes: list[dict[str, Any]] = field(default_factory=list)  # role, pgid, ports
    mlflow_pgid: int = 0
    started_at: float = 0.0

    def env(self) -> dict[str, str]:
        """What a client of this cluster needs in its environment (no secret: a path)."""
        return cluster_client_env(asdict(self))

    def pgids(self) -> list[int]:
        return [n["pgid"] for n in self.nodes] + ([self.mlflow_pgid] if self.mlflow_pgid else [])


def load_spec(path: str | os.PathLike[str]) -> LocalClusterSpec:
    return validate(LocalClusterSpec, read_yaml(path, "cluster spec"), str(path))


def _alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def state_path(name: str) -> Path:
    return clusters_dir() / name / "cluster.json"


def read_state(name: str | None = None) -> ClusterState:
    """The state of cluster ``name``, or of the current one; a ClusterError saying how to start one."""
    if name is None:
        pointer = clusters_dir() / CURRENT_CLUSTER
        if not pointer.exists():
            raise ClusterError("no cluster is up; start one with `skewless cluster up cluster/local.yaml`")
        name = str(json.loads(pointer.read_text())["name"])
    path = state_path(name)
    if not path.exists():
        raise ClusterError(f"cluster {name!r} is not up; start it with `skewless cluster up <spec.yaml>`")
    return ClusterState(**json.loads(path.read_text()))


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def _spawn(args: list[str], env: dict[str, str], log: Path) -> int:
    """Start ``args`` in a new session (its own process group, outliving this CLI); returns the pgid."""
    with log.open("ab") as out:
        proc = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return proc.pid


def _wait(predicate: Callable[[], bool], timeout_s: float, what: str, logs: list[Path]) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    tails = "\n".join(f"--- {p}:\n{p.read_text(errors='replace')[-1500:]}" for p in logs if p.exists())
    raise ClusterError(f"{what} not ready within {timeout_s:.0f}s; the logs' last lines:\n{tails}")


def _node_temp_dir(gcs_port: int, role: str) -> Path:
    """Each node's own Ray temp dir: nodes of one machine that share one (Ray's default, the
    head's) share the runtime-env cache, and a worker node deleting a job's working_dir there
    pulls it from under the driver on the head. Short, under /tmp: Ray's Unix sockets live in
    it and a socket path is at most 107 bytes."""
    path = Path(f"/tmp/skw-{os.getuid()}-{gcs_port}-{role}")
    path.mkdir(mode=0o700, exist_ok=True)
    return path


def _node_args(spec: NodeSpec, temp_dir: Path) -> tuple[list[str], dict[str, int]]:
    """The port flags every node needs on a shared IP, its temp dir and its resources."""
    ports = {
        "node_manager_port": free_port(),
        "object_manager_port": free_port(),
        "metrics_export_port": free_port(),
        "dashboard_agent_listen_port": free_port(),
        "dashboard_agent_grpc_port": free_port(),
        "runtime_env_agent_port": free_port(),
    }
    args = ["--block", "--node-ip-address=127.0.0.1", f"--num-cpus={int(spec.num_cpus)}", f"--num-gpus={spec.num_gpus}"]
    args += [f"--{k.replace('_', '-')}={v}" for k, v in ports.items()]
    args.append(f"--temp-dir={temp_dir}")
    if spec.object_store_memory:
        args.append(f"--object-store-memory={spec.object_store_memory}")
    if spec.resources:
        args.append(f"--resources={json.dumps(spec.resources)}")
    args.append("--disable-usage-stats")
    return args, ports


def cluster_up(spec: LocalClusterSpec, progress: Progress = print) -> ClusterState:
    """Start the cluster (see the module docstring) and make it the current one."""
    path = state_path(spec.name)
    if path.exists():
        old = ClusterState(**json.loads(path.read_text()))
        if any(_alive(p) for p in old.pgids()):
            raise ClusterError(
                f"cluster {spec.name!r} is already up (`skewless cluster status`); `skewless cluster down` first"
            )
    state_dir = path.parent
    state_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(state_dir, 0o700)
    logs = state_dir / "logs"
    logs.mkdir(exist_ok=True)
    token_path = state_dir / "auth_token"
    _write_private(token_path, secrets.token_hex(32))
    bin_dir = Path(sys.executable).parent
    mlflow_port = spec.mlflow_port or free_port()
    tracking_uri = f"http://127.0.0.1:{mlflow_port}"
    gcs_port, dash_port = free_port(), spec.dashboard_port or free_port()
    state = ClusterState(
        name=spec.name,
        state_dir=str(state_dir),
        gcs_address=f"127.0.0.1:{gcs_port}",
        dashboard=f"http://127.0.0.1:{dash_port}",
        tracking_uri=tracking_uri,
        token_path=str(token_path),
        started_at=time.time(),
    )
    env = {**os.environ, **state.env()}
    env.pop("RAY_ADDRESS")  # `ray start` reads it as the cluster to join
    try:
        progress(f"starting MLflow's tracking server on {tracking_uri}")
        state.mlflow_pgid = _spawn(
            [
                str(bin_dir / "mlflow"),
                "server",
                "--host=127.0.0.1",
                f"--port={mlflow_port}",
                f"--backend-store-uri=sqlite:///{state_dir / 'mlflow.db'}",
                f"--artifacts-destination={state_dir / 'mlartifacts'}",
                "--serve-artifacts",
                "--workers=1",
            ],
            env,
            logs / "mlflow.log",
        )
        _write_state(state)
        head_args, head_ports = _node_args(spec.head, _node_temp_dir(gcs_port, "head"))
        head_args += [
            "--head",
            f"--port={gcs_port}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash_port}",
            f"--ray-client-server-port={free_port()}",
        ]
        progress(f"starting the head node ({spec.head.num_cpus:g} CPUs) on 127.0.0.1:{gcs_port}")
        pgid = _spawn([str(bin_dir / "ray"), "start", *head_args], env, logs / "head.log")
        state.nodes.append({"role": "head", "pgid": pgid, **head_ports})
        _write_state(state)
        _wait(lambda: _port_open(gcs_port), spec.ready_timeout_s, "the head node", [logs / "head.log"])
        _wait(lambda: _alive_nodes(state) >= 1, spec.ready_timeout_s, "the head node", [logs / "head.log"])
        index = 0
        for shape in spec.workers:
            for _ in range(shape.count):
                index += 1
                args, ports = _node_args(shape, _node_temp_dir(gcs_port, f"w{index}"))
                progress(f"starting worker node {index} ({shape.num_cpus:g} CPUs, {shape.num_gpus} GPUs)")
                pgid = _spawn(
                    [str(bin_dir / "ray"), "start", f"--address={state.gcs_address}", *args],
                    env,
                    logs / f"worker-{index}.log",
                )
                state.nodes.append({"role": f"worker-{index}", "pgid": pgid, **ports})
                _write_state(state)
                # one at a time: raylets of one machine registering at once can time out on 2 cores
                _wait(
                    lambda joined=index + 1: _alive_nodes(state) >= joined,  # type: ignore[misc]
                    spec.ready_timeout_s,
                    f"worker node {index}",
                    [logs / f"worker-{index}.log"],
                )
        _wait(lambda: _http_ok(f"{tracking_uri}/health"), spec.ready_timeout_s, "MLflow", [logs / "mlflow.log"])
        want = 1 + index
        all_logs = [logs / "head.log", *(logs / f"worker-{i}.log" for i in range(1, index + 1))]
        _wait(lambda: _alive_nodes(state) >= want, spec.ready_timeout_s, f"{want} nodes", all_logs)
        _wait(lambda: _jobs_api_ok(state), spec.ready_timeout_s, "the Jobs API", all_logs)
    except BaseException:
        progress("start failed: stopping what was started")
        _stop(state, progress)
        raise
    (clusters_dir() / CURRENT_CLUSTER).write_text(json.dumps({"name": spec.name}))
    progress(f"cluster {spec.name!r} is up: {want} nodes, dashboard {state.dashboard}, tracking {tracking_uri}")
    return state


def _write_state(state: ClusterState) -> None:
    _write_private(state_path(state.name), json.dumps(asdict(state), indent=2))


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _http_ok(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def _auth_headers(state: ClusterState) -> dict[str, str]:
    token = Path(state.token_path).read_text().strip()
    return {"Authorization": f"Bearer {token}"}


def _api(state: ClusterState, path: str) -> Any:
    import httpx

    response = httpx.get(f"{state.dashboard}{path}", headers=_auth_headers(state), timeout=10)
    response.raise_for_status()
    return response.json()


def _alive_nodes(state: ClusterState) -> int:
    try:
        return sum(1 for n in _nodes(state) if n["state"] == "ALIVE")
    except Exception:
        return 0


def _jobs_api_ok(state: ClusterState) -> bool:
    try:
        _api(state, "/api/jobs/")
        return True
    except Exception:
        return False


def _nodes(state: ClusterState) -> list[dict[str, Any]]:
    data = _api(state, "/api/v0/nodes?limit=100&detail=1")
    result = data.get("data", {}).get("result", {})
    return list(result.get("result", result) if isinstance(result, dict) else result)


def cluster_down(name: str | None = None, progress: Progress = print) -> ClusterState:
    """Stop every process ``up`` started (workers, head, MLflow) and forget the cluster."""
    state = read_state(name)
    _stop(state, progress)
    gcs_port = int(state.gcs_address.rsplit(":", 1)[1])
    for node in state.nodes:  # each node's Ray temp dir (its sockets, session logs, runtime-env cache)
        role = "head" if node["role"] == "head" else "w" + node["role"].rsplit("-", 1)[1]
        shutil.rmtree(f"/tmp/skw-{os.getuid()}-{gcs_port}-{role}", ignore_errors=True)
    Path(state_path(state.name)).unlink(missing_ok=True)
    pointer = clusters_dir() / CURRENT_CLUSTER
    if pointer.exists() and json.loads(pointer.read_text()).get("name") == state.name:
        pointer.unlink()
    progress(f"cluster {state.name!r} is down")
    return state


def _stop(state: ClusterState, progress: Progress, timeout_s: float = 30.0) -> None:
    groups = [g for g in reversed(state.pgids()) if _alive(g)]
    for g in groups:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(g, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(_alive(g) for g in groups):
        time.sleep(0.2)
    for g in groups:
        if _alive(g):
            progress(f"process group {g} did not stop in {timeout_s:.0f}s: killing it")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(g, signal.SIGKILL)
    # Ray's workers and agents may have left the groups (new sessions): stop whatever names our ports
    _kill_stragglers(state)


def _kill_stragglers(state: ClusterState) -> None:
    for pid in _cluster_pids(state):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


@dataclass(frozen=True)
class ClusterStatus:
    name: str
    dashboard: str
    tracking_uri: str
    nodes: list[dict[str, Any]]
    jobs: list[dict[str, Any]]
    applications: dict[str, Any]
    listeners: list[dict[str, Any]]
    gpus: list[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def cluster_status(name: str | None = None) -> ClusterStatus:
    """Nodes and their resources, running jobs, Serve applications with their replicas, the
    addresses, what listens where, and this machine's GPUs (NVML) when it has any."""
    state = read_state(name)
    try:
        raw_nodes = _nodes(state)
    except Exception as exc:
        raise ClusterError(
            f"cluster {state.name!r} does not answer at {state.dashboard} ({type(exc).__name__}); "
            "`skewless cluster down` then `up` to restart it"
        ) from None
    nodes = [
        {
            "node_id": n.get("node_id"),
            "ip": n.get("node_ip"),
            "head": bool(n.get("is_head_node")),
            "state": n.get("state"),
            "resources": n.get("resources_total", {}),
        }
        for n in raw_nodes
    ]
    try:
        jobs = [
            {
                "job_id": j.get("submission_id") or j.get("job_id"),
                "status": j.get("status"),
                "entrypoint": j.get("entrypoint"),
            }
            for j in _api(state, "/api/jobs/")
        ]
    except Exception:
        jobs = []
    applications: dict[str, Any] = {}
    try:
        serve = _api(state, "/api/serve/applications/")
        for app_name, app in (serve.get("applications") or {}).items():
            applications[app_name] = {
                "status": app.get("status"),
                "route_prefix": app.get("route_prefix"),
                "replicas": {
                    d: sum(1 for r in dep.get("replicas", []) if r.get("state") == "RUNNING")
                    for d, dep in (app.get("deployments") or {}).items()
                },
            }
    except Exception:
        pass
    return ClusterStatus(
        state.name, state.dashboard, state.tracking_uri, nodes, jobs, applications, _listeners(state), _gpus()
    )


def _cluster_pids(state: ClusterState) -> set[int]:
    """This cluster's processes: those in the groups `up` started, and any that name its GCS or
    its state directory on their command line (Ray may start some in a session of their own)."""
    groups = set(state.pgids())
    marker = f"127.0.0.1:{state.gcs_address.rsplit(':', 1)[1]}"
    pids: set[int] = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if os.getpgid(int(proc.name)) in groups:
                pids.add(int(proc.name))
                continue
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ProcessLookupError):
            continue
        if marker in cmdline or state.state_dir in cmdline:
            pids.add(int(proc.name))
    return pids


def _listeners(state: ClusterState) -> list[dict[str, Any]]:
    """Listening TCP sockets of the cluster's processes, as host:port by process."""
    return [sock._asdict() for sock in listening_sockets(_cluster_pids(state))]


def _gpus() -> list[dict[str, Any]]:
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return []
    try:
        out = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(h)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            out.append(
                {"index": i, "name": name if isinstance(name, str) else name.decode(), "memory_bytes": int(mem.total)}
            )
        return out
    finally:
        pynvml.nvmlShutdown()
