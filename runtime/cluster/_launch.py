"""``skewless cluster up|down <spec>`` for the specs that are not local: Ray's own launchers.

A spec's kind comes from its content: a ``provider`` section is Ray's cluster launcher
(``ray up`` / ``ray down``: ``cluster/aws.yaml``, ``cluster/gcp.yaml``, or Ray's
``fake_multi_node`` provider); KubeRay objects (``apiVersion: ray.io/...``) go to the
Kubernetes API (``kubectl apply`` / ``kubectl delete``); a ``head`` section is the local
multi-node cluster (``runtime.cluster.cluster_up``). skewless starts no node itself for the
first two: it checks the spec, makes the token file the cloud specs mount (0600, never
printed), and hands over to the launcher, whose output the user sees as it comes.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import yaml

from runtime.errors import ClusterError, ConfigError

__all__ = ["SpecKind", "launch", "launcher_command", "spec_kind"]

SpecKind = Literal["local", "ray-up", "kuberay"]
_TOKEN_MOUNT = "~/.ray/auth_token"


def _documents(path: Path) -> list[Any]:
    try:
        return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    except OSError as exc:
        raise ConfigError(f"cluster spec {path}: cannot read it ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"cluster spec {path}: not YAML ({exc})") from None


def spec_kind(path: Path) -> SpecKind:
    """What launches ``path``: ``ray-up`` (a ``provider`` mapping), ``local`` (a ``head``
    section), ``kuberay`` (Kubernetes objects: KubeRay's and their companions)."""
    docs = _documents(path)
    first = docs[0] if docs else None
    if isinstance(first, dict) and isinstance(first.get("provider"), dict):
        return "ray-up"
    if isinstance(first, dict) and "head" in first:
        return "local"
    if docs and all(isinstance(d, dict) and "apiVersion" in d and "kind" in d for d in docs):
        return "kuberay"  # KubeRay's objects, or their companions (cluster/kubernetes/mlflow.yaml)
    raise ConfigError(
        f"cluster spec {path}: neither a local cluster spec (a `head` section, cluster/local.yaml), "
        "a `ray up` cluster config (a `provider` section, cluster/aws.yaml) nor KubeRay manifests "
        "(apiVersion ray.io/v1, cluster/kubernetes/); render the cloud ones with `skewless cluster render`"
    )


def launcher_command(path: Path, action: Literal["up", "down"], kind: SpecKind | None = None) -> list[str]:
    """The launcher's command line for ``path``: ``ray up -y`` / ``ray down -y`` or ``kubectl
    apply -f`` / ``kubectl delete -f``."""
    kind = kind or spec_kind(path)
    if kind == "ray-up":
        return ["ray", action, "-y", str(path)]
    if kind == "kuberay":
        return ["kubectl", "apply" if action == "up" else "delete", "-f", str(path)]
    raise ValueError(f"{path}: a local cluster spec has no launcher command (runtime.cluster.cluster_up)")


def _token_files(path: Path) -> list[Path]:
    """The local token files a ``ray up`` spec mounts as Ray's auth token (``file_mounts``)."""
    config = _documents(path)[0]
    mounts = config.get("file_mounts") or {}
    return [Path(os.path.expanduser(str(src))) for dst, src in mounts.items() if str(dst) == _TOKEN_MOUNT]


def _ensure_token(token: Path, progress: Callable[[str], None]) -> None:
    if token.exists():
        mode = token.stat().st_mode & 0o777
        if mode & 0o077:
            raise ClusterError(
                f"{token}: the cluster's token file is readable by others (mode {oct(mode)}); chmod 600 it"
            )
        return
    token.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(token, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32) + "\n")
    progress(f"token: a new one in {token} (0600; never printed), mounted on every node as {_TOKEN_MOUNT}")


def launch(
    path: Path,
    action: Literal["up", "down"],
    progress: Callable[[str], None] = print,
    run: Callable[..., Any] = subprocess.run,
) -> int:
    """Hand ``path`` to its launcher (its output goes straight to this terminal) and return the
    launcher's exit code. ``up`` with a ``ray up`` spec first makes the token file it mounts."""
    kind = spec_kind(path)
    command = launcher_command(path, action, kind)
    binary = shutil.which(command[0])
    if binary is None:
        fix = (
            "install it and point it at your Kubernetes cluster (with the KubeRay operator)"
            if command[0] == "kubectl"
            else "it comes with the `ray` package: activate the project's virtual environment"
        )
        raise ClusterError(f"`{command[0]}` is not on PATH: {fix}")
    if kind == "ray-up" and action == "up":
        for token in _token_files(path):
            _ensure_token(token, progress)
    progress(f"{'starting' if action == 'up' else 'stopping'} through {' '.join(command[:2])}: {' '.join(command)}")
    return int(run([binary, *command[1:]], check=False).returncode)
