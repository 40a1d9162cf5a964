"""The real ``skewless`` CLI as a subprocess, talking HTTP to what it deploys."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import free_port, subprocess_env

pytestmark = pytest.mark.e2e
SKEWLESS = str(Path(sys.executable).with_name("skewless"))


def test_help_is_instant_and_imports_nothing_heavy() -> None:
    t0 = time.monotonic()
    out = subprocess.run([SKEWLESS, "--help"], capture_output=True, text=True, timeout=60, check=True)
    elapsed = time.monotonic() - t0
    assert "demo" in out.stdout and "train" in out.stdout
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, runtime.cli; print(sorted(m for m in ('ray','torch','mlflow','pandas') if m in sys.modules))",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert probe.stdout.strip() == "[]"
    assert elapsed < 10  # generous: a bounded sanity check, not a benchmark


def test_user_errors_print_without_traceback(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("data: {path: x.parquet}\nfeatures: f.yaml\nregistry: {model_name: m}\ntraning: {}\n")
    out = subprocess.run([SKEWLESS, "train", "run", str(cfg)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "traning: unknown key 'traning' (did you mean 'training'?)" in out.stderr
    assert "Traceback" not in out.stderr


def test_demo_end_to_end(tmp_path: Path) -> None:
    """The README's main job: generate, train, register, serve, query, parity."""
    env = subprocess_env(SKEWLESS_HOME=str(tmp_path / "home"), RAY_ADDRESS="local")
    port = free_port()
    out = subprocess.run(
        [SKEWLESS, "demo", "--rows", "4000", "--epochs", "1", "--port", str(port)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    text = out.stdout
    assert "parity    PASS" in text
    assert f"http://127.0.0.1:{port}/churn-demo/predict" in text
    assert "curl -s -X POST" in text
    assert (tmp_path / "home" / "mlflow.db").exists()

    # The README's "load the model anywhere" snippet runs as written, with MLflow alone.
    from tests.unit.test_readme import code_blocks

    snippet = code_blocks("python")[0]
    loaded = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, timeout=300, env=env)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    assert "prediction" in loaded.stdout and "probability_1" in loaded.stdout
