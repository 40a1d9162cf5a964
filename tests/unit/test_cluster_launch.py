"""`skewless cluster up|down <spec>` hands cloud and Kubernetes specs to Ray's launcher and to
kubectl. The launch itself needs a cloud account or a Kubernetes cluster (none here): these tests
run the CLI up to the handover, with a recording stand-in for the launcher binary on PATH."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from runtime.cli import app
from runtime.cluster import launcher_command, spec_kind
from runtime.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def test_each_shipped_spec_goes_to_its_launcher() -> None:
    assert spec_kind(REPO / "cluster/local.yaml") == "local"
    for cloud in ("aws", "gcp"):
        path = REPO / f"cluster/{cloud}.yaml"
        assert spec_kind(path) == "ray-up"
        assert launcher_command(path, "up") == ["ray", "up", "-y", str(path)]
        assert launcher_command(path, "down") == ["ray", "down", "-y", str(path)]
    for manifest in ("raycluster", "rayjob", "rayservice", "mlflow"):
        path = REPO / f"cluster/kubernetes/{manifest}.yaml"
        assert spec_kind(path) == "kuberay"
        assert launcher_command(path, "up") == ["kubectl", "apply", "-f", str(path)]
        assert launcher_command(path, "down") == ["kubectl", "delete", "-f", str(path)]


def test_a_spec_of_no_known_kind_says_what_each_kind_looks_like(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    path.write_text("cluster: {}\n")
    with pytest.raises(ConfigError, match=r"a `head` section.*a `provider` section.*apiVersion ray\.io/v1"):
        spec_kind(path)


def _stand_in(tmp_path: Path, name: str, code: int = 0) -> Path:
    """A `ray`/`kubectl` that records its arguments and exits with ``code``."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    tool = bin_dir / name
    tool.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / (name + ".calls")}\nexit {code}\n')
    tool.chmod(0o755)
    return bin_dir


def test_cluster_up_runs_ray_up_after_making_the_token_it_mounts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = yaml.safe_load((REPO / "cluster/aws.yaml").read_text())
    token = tmp_path / "home" / "auth_token"
    config["file_mounts"]["~/.ray/auth_token"] = str(token)
    spec = tmp_path / "aws.yaml"
    spec.write_text(yaml.safe_dump(config))
    monkeypatch.setenv("PATH", f"{_stand_in(tmp_path, 'ray')}{os.pathsep}{os.environ['PATH']}")
    result = CliRunner().invoke(app, ["cluster", "up", str(spec)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "ray.calls").read_text().split() == ["up", "-y", str(spec)]
    assert stat.S_IMODE(token.stat().st_mode) == 0o600 and len(token.read_text().strip()) == 64
    assert token.read_text().strip() not in result.output  # never printed
    # down through `ray down`; the launcher's failure is the command's exit code
    monkeypatch.setenv("PATH", f"{_stand_in(tmp_path, 'ray', code=3)}{os.pathsep}{os.environ['PATH']}")
    result = CliRunner().invoke(app, ["cluster", "down", str(spec)])
    assert result.exit_code == 3
    assert (tmp_path / "ray.calls").read_text().splitlines()[-1].split() == ["down", "-y", str(spec)]


def test_a_token_file_others_can_read_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = yaml.safe_load((REPO / "cluster/gcp.yaml").read_text())
    token = tmp_path / "auth_token"
    token.write_text("x" * 64)
    token.chmod(0o644)
    config["file_mounts"]["~/.ray/auth_token"] = str(token)
    spec = tmp_path / "gcp.yaml"
    spec.write_text(yaml.safe_dump(config))
    monkeypatch.setenv("PATH", f"{_stand_in(tmp_path, 'ray')}{os.pathsep}{os.environ['PATH']}")
    result = CliRunner().invoke(app, ["cluster", "up", str(spec)])
    assert result.exit_code != 0 and "chmod 600" in str(result.exception)
    assert not (tmp_path / "ray.calls").exists()  # nothing launched


def test_kuberay_manifests_go_to_kubectl_and_a_missing_kubectl_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest = REPO / "cluster/kubernetes/raycluster.yaml"
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    result = CliRunner().invoke(app, ["cluster", "up", str(manifest)])
    assert result.exit_code != 0 and "`kubectl` is not on PATH" in str(result.exception)
    monkeypatch.setenv("PATH", f"{_stand_in(tmp_path, 'kubectl')}{os.pathsep}{os.environ['PATH']}")
    assert CliRunner().invoke(app, ["cluster", "up", str(manifest)]).exit_code == 0
    assert (tmp_path / "kubectl.calls").read_text().split() == ["apply", "-f", str(manifest)]
