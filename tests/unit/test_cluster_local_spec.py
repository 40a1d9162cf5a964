"""The local cluster's spec and state, without starting Ray: validation, and how commands
without --address find the cluster `skewless cluster up` started."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from runtime.cluster import LocalClusterSpec, load_spec, read_state
from runtime.connect import current_cluster_env, dashboard_address
from runtime.errors import ClusterError, ConfigError

REPO = Path(__file__).resolve().parents[2]


def test_the_shipped_spec_is_a_head_and_two_workers() -> None:
    spec = load_spec(REPO / "cluster" / "local.yaml")
    assert spec.head.num_cpus == 1 and sum(w.count for w in spec.workers) == 2


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"name": "Bad Name"}, "name"),
        ({"workers": [{"count": 0}]}, "count"),
        ({"head": {"num_cpu": 2}}, "num_cpus"),  # did-you-mean
        ({"provider": "aws"}, "provider"),
    ],
)
def test_a_bad_spec_names_the_field(tmp_path: Path, body: dict[str, object], words: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(json.dumps(body))
    with pytest.raises(ConfigError, match=words):
        load_spec(path)


def test_without_a_cluster_the_error_says_how_to_start_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SKEWLESS_HOME", str(tmp_path))
    monkeypatch.setenv("RAY_ADDRESS", "recorded")
    monkeypatch.delenv("RAY_ADDRESS")
    with pytest.raises(ClusterError, match="skewless cluster up"):
        read_state()
    assert current_cluster_env() == {}
    assert dashboard_address() == "http://127.0.0.1:8265"


def test_commands_without_an_address_use_the_current_cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SKEWLESS_HOME", str(tmp_path))
    for key in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE", "MLFLOW_TRACKING_URI"):
        monkeypatch.setenv(key, "recorded")  # so that what the code sets is undone after the test
        monkeypatch.delenv(key)
    state_dir = tmp_path / "clusters" / "dev"
    state_dir.mkdir(parents=True)
    state = {
        "name": "dev",
        "state_dir": str(state_dir),
        "gcs_address": "127.0.0.1:6500",
        "dashboard": "http://127.0.0.1:18265",
        "tracking_uri": "http://127.0.0.1:15000",
        "token_path": str(state_dir / "auth_token"),
    }
    (state_dir / "cluster.json").write_text(json.dumps(state))
    (tmp_path / "clusters" / "current.json").write_text(json.dumps({"name": "dev"}))
    assert read_state().dashboard == "http://127.0.0.1:18265"
    assert dashboard_address() == "http://127.0.0.1:18265"
    import os

    assert os.environ["RAY_AUTH_TOKEN_PATH"] == str(state_dir / "auth_token")  # the token's path, never the token
    assert os.environ["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:15000"
    assert dashboard_address("http://10.0.0.5:8265") == "http://10.0.0.5:8265"  # --address wins
    assert LocalClusterSpec().name == "skewless-local"


def test_free_ports_are_never_handed_out_twice() -> None:
    """Consecutive binds can get the same port back from the kernel; a GCS and a dashboard once
    did, and Ray refused to start. runtime.connect.free_port never repeats one in a process."""
    from runtime.connect import free_port

    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == 200


def test_an_ipv6_socket_on_mapped_loopback_is_reported_as_loopback() -> None:
    """A socket bound to ::ffff:127.0.0.1 (how gRPC binds "127.0.0.1" on a dual-stack socket)
    listens on loopback only: status must not count it as exposed."""
    import os
    import socket

    from runtime.cluster import listening_sockets

    with socket.socket(socket.AF_INET6) as s:
        s.bind(("::ffff:127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        mine = [x for x in listening_sockets([os.getpid()]) if x.port == port]
    assert [x.host for x in mine] == ["127.0.0.1"], mine
