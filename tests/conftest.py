"""Shared fixtures: one local Ray instance per session, a private SKEWLESS_HOME, polling helpers."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

# One state dir for the whole session, before anything imports MLflow or starts Ray, so Ray
# workers and Serve replicas inherit it. .ci/run sets its own.
if "SKEWLESS_HOME" not in os.environ:
    import tempfile

    os.environ["SKEWLESS_HOME"] = tempfile.mkdtemp(prefix="skewless-test-home-")
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


def wait_for_condition(
    predicate: Callable[[], Any], timeout: float = 60.0, interval: float = 0.2, message: str = "condition"
) -> Any:
    """Poll ``predicate`` until it returns a truthy value; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # keep polling; report the last one
            last_exc = exc
        time.sleep(interval)
    raise TimeoutError(f"{message} not met within {timeout}s (last error: {last_exc!r})")


def subprocess_env(**overrides: str) -> dict[str, str]:
    """This process's environment for a child CLI, minus what in-process tests leak into it.

    ``mlflow.set_tracking_uri``/``set_registry_uri`` export MLFLOW_TRACKING_URI and
    MLFLOW_REGISTRY_URI, which would point a child at this session's store.
    """
    env = {
        k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "RAY_ADDRESS")
    }
    env.update(overrides)
    return env


def listeners() -> list[tuple[int, str, str, int]]:
    """Every listening TCP socket on this machine that a process here owns, as
    (pid, process name, host, port), from /proc (Linux)."""
    from runtime.cluster import listening_sockets

    return [tuple(sock) for sock in listening_sockets()]  # type: ignore[misc]


def free_port() -> int:
    """A free loopback port no earlier call in this session returned (runtime.connect.free_port)."""
    from runtime.connect import free_port as distinct_free_port

    return distinct_free_port()


@pytest.fixture(scope="session")
def skewless_home() -> Path:
    return Path(os.environ["SKEWLESS_HOME"])


@pytest.fixture(scope="session")
def ray_session() -> Iterator[Any]:
    """The session's one local Ray instance (8 logical CPUs on a 2-core machine), with its
    dashboard server as ``runtime.connect`` starts one: Ray Train's placement-group cleaner needs
    the state API to free the workers of a run whose controller died (a Tune trial stopped early)."""
    import ray

    ray.init(address="local", num_cpus=8, log_to_driver=False)  # the dashboard server: Ray's default
    yield ray
    try:
        from ray import serve

        serve.shutdown()
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def grpc_port() -> int:
    """The gRPC port of the session's Serve (``skewless.v1.Predictor`` through Serve's gRPC ingress)."""
    return free_port()


@pytest.fixture(scope="session")
def serve_port(ray_session: Any, grpc_port: int) -> int:
    from ray import serve

    from runtime.serving import ingress_options

    port = free_port()
    http = {"host": "127.0.0.1", "port": port}
    grpc = {"port": grpc_port, "grpc_servicer_functions": ["runtime.serving.add_predictor_servicer"]}
    # the shipped path: HAProxy mode (gRPC beside HTTP, as a config that enables it gets)
    serve.start(http_options=http, grpc_options=grpc, controller_options=ingress_options(http))
    return port


@pytest.fixture
def serve_clean(serve_port: int) -> Iterator[int]:
    """A Serve instance on 127.0.0.1 with no applications left over from other tests."""
    from ray import serve

    yield serve_port
    for name in list(serve.status().applications):
        serve.delete(name)
