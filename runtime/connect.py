"""Joining Ray: ``RAY_ADDRESS``, or a running local cluster if there is one, else a new local one.

Training, Tune, the LM job, serving and the demo all connect here (a bottom-layer module).

``RAY_ADDRESS=local`` always starts a new local instance, even beside a running cluster.

A new local instance gets more logical CPUs than the machine has cores (at least
``min_cpus``), so that Train workers, Ray Data tasks and Serve replicas can coexist on a
2-core laptop. Token authentication stays on (Ray's default for local clusters).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from runtime.errors import ConfigError

__all__ = [
    "CURRENT_CLUSTER",
    "DEFAULT_DASHBOARD",
    "HEADROOM_CPUS",
    "VERBOSE_ENV",
    "check_placeable",
    "cluster_client_env",
    "clusters_dir",
    "connect",
    "cpus_for",
    "current_cluster_env",
    "dashboard_address",
    "free_port",
    "started_locally",
    "use_current_cluster",
    "verbose_requested",
]

# Where `ray start --head` puts the dashboard (Jobs and Serve REST APIs) by default.
DEFAULT_DASHBOARD = "http://127.0.0.1:8265"

_started_here = False

# In $SKEWLESS_HOME/clusters: which cluster `skewless cluster up` started last (runtime.cluster).
CURRENT_CLUSTER = "current.json"


def clusters_dir() -> Path:
    """Where `skewless cluster up` keeps each local cluster's state."""
    return Path(os.path.expanduser(os.environ.get("SKEWLESS_HOME", "~/.skewless"))).resolve() / "clusters"


def current_cluster_env() -> dict[str, str]:
    """What a client needs to reach the cluster `skewless cluster up` started last (its
    dashboard, token path and tracking server), or {} when none is up."""
    pointer = clusters_dir() / CURRENT_CLUSTER
    try:
        name = json.loads(pointer.read_text())["name"]
        return cluster_client_env(json.loads((clusters_dir() / name / "cluster.json").read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def cluster_client_env(state: Mapping[str, Any]) -> dict[str, str]:
    """A client's environment for a cluster whose ``cluster.json`` is ``state`` (the token's
    path, never the token)."""
    return {
        "RAY_ADDRESS": state["dashboard"],
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": state["token_path"],
        "MLFLOW_TRACKING_URI": state["tracking_uri"],
    }


def use_current_cluster() -> str | None:
    """Adopt the current cluster's client settings (where not set already); its dashboard."""
    env = current_cluster_env()
    if not env:
        return None
    for key, value in env.items():
        if key != "RAY_ADDRESS":
            os.environ.setdefault(key, value)
    import sys

    if "ray._raylet" in sys.modules:  # Ray read RAY_AUTH_MODE at import: refresh it, as ray.init does
        with contextlib.suppress(Exception):  # an older Ray: the CLI sets them before importing it anyway
            sys.modules["ray._raylet"].Config.initialize("")
    return env["RAY_ADDRESS"]


# Logical CPUs a new local instance keeps free beside the Train workers: Ray Data tasks, the
# Train controller, Serve replicas.
HEADROOM_CPUS = 4


def cpus_for(num_workers: int, cpus_per_worker: float, groups: int = 1) -> int:
    """Logical CPUs to start a local instance with for ``groups`` concurrent worker groups."""
    return int(num_workers * cpus_per_worker * groups) + HEADROOM_CPUS


_handed_out: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A free TCP port on ``host`` (127.0.0.1 for a wildcard host) that this process has not
    handed out before: the kernel can give consecutive binds the same port back, and a GCS and a
    dashboard chosen that way once collided (Ray refuses to start)."""
    import socket

    bind = "127.0.0.1" if host in ("", "0.0.0.0", "::") else host
    for _ in range(1000):
        with socket.socket(socket.AF_INET6 if ":" in bind else socket.AF_INET) as s:
            s.bind((bind, 0))
            port = int(s.getsockname()[1])
        if port not in _handed_out:
            _handed_out.add(port)
            return port
    raise OSError(f"no free port on {bind} that this process has not already handed out")


VERBOSE_ENV = "SKEWLESS_VERBOSE"  # 1: the engines' logs (and the workers' output) on the terminal


def verbose_requested(flag: bool = False) -> bool:
    """``flag``, or ``SKEWLESS_VERBOSE`` set to 1/true/yes (how a submitted job is told)."""
    return flag or os.environ.get(VERBOSE_ENV, "").strip().lower() in ("1", "true", "yes")


def connect(min_cpus: int = 8) -> None:
    """Connect this process to Ray once; a no-op when already connected. The workers' output
    stays in Ray's logs and Ray's own messages below WARNING stay off the terminal, unless
    :func:`verbose_requested`."""
    global _started_here
    import ray

    if ray.is_initialized():
        return
    verbose = verbose_requested()
    # ray.init sets the "ray" logger's level: keep a lower one a caller chose (a job's log file
    # takes Ray's INFO while the terminal shows warnings: runtime.training's engine_logs)
    chosen = logging.getLogger("ray").level
    level = logging.INFO if verbose else (chosen if logging.NOTSET < chosen < logging.WARNING else logging.WARNING)
    quiet = {"log_to_driver": verbose, "logging_level": level}
    address = os.environ.get("RAY_ADDRESS", "")
    if address and address != "local":
        ray.init(address=address, **quiet)  # type: ignore[arg-type]
        return
    if not address:
        try:
            ray.init(address="auto", **quiet)  # type: ignore[arg-type]
            return
        except ConnectionError:
            pass
    # The dashboard's HTTP server stays on (Ray's default; it binds 127.0.0.1): Ray Train's
    # detached PlacementGroupCleaner asks the state API whether a run's controller is alive, and
    # without that server it never removes the worker group's placement group of a controller
    # that was killed (a Tune trial that ASHA stopped early): those CPUs stay reserved until the
    # instance stops, and later trials' Ray Data tasks starve (the shipped search hung so).
    ray.init(num_cpus=max(min_cpus, os.cpu_count() or 1), **quiet)  # type: ignore[arg-type]
    _started_here = True


def started_locally() -> bool:
    """Whether :func:`connect` started a Ray instance that dies with this process."""
    return _started_here


def check_placeable(training: Any, resources: dict[str, float]) -> None:
    """Refuse, before starting anything, a worker group the cluster can never place.

    ``training`` is any config section with ``num_workers``, ``cpus_per_worker`` and
    ``use_gpu``; ``resources`` is ``ray.cluster_resources()``.
    """
    t = training
    share = float(getattr(t, "gpus_per_worker", 1.0) or 1.0)  # a fraction lets workers share a GPU
    gpus = t.num_workers * share
    if t.use_gpu and resources.get("GPU", 0) + 1e-9 < gpus:
        raise ConfigError(
            f"training.use_gpu = true needs {gpus:g} GPU(s) ({t.num_workers} worker(s) x gpus_per_worker "
            f"{share:g}) but the cluster has {resources.get('GPU', 0):g}; set use_gpu: false, lower "
            "num_workers or gpus_per_worker, or connect to a cluster with GPUs"
        )
    need = t.num_workers * t.cpus_per_worker
    if resources.get("CPU", 0) < need:
        raise ConfigError(
            f"training.num_workers ({t.num_workers}) x cpus_per_worker ({t.cpus_per_worker:g}) = {need:g} CPUs, "
            f"but the cluster has {resources.get('CPU', 0):g}; lower num_workers or add nodes"
        )


def dashboard_address(address: str | None = None) -> str:
    """The Ray dashboard (Jobs and Serve REST APIs) to talk to: ``address`` if given, else
    ``RAY_ADDRESS``, else the cluster `skewless cluster up` started last, else the local
    default, as Ray's own ``ray job`` and ``serve`` CLIs do."""
    return address or os.environ.get("RAY_ADDRESS") or use_current_cluster() or DEFAULT_DASHBOARD
