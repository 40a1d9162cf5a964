"""Training jobs through Ray's Jobs API (``JobSubmissionClient``), local or remote alike.

A submission ships the project (``jobs/`` and configs) as the job's ``working_dir`` and the
``runtime`` package, preprocessing included, as a ``py_modules`` artifact, so the cluster
runs exactly the code the config was validated against. The git commit and dirty flag of the
submitting checkout travel as environment variables (the uploaded copy has no ``.git``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.errors import ClusterError, ConfigError

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
EXCLUDES = [
    ".git",
    ".venv",
    ".whl",
    "**/__pycache__",
    ".mypy_cache",
    ".ruff_cache",
    ".hypothesis",
    "benchmarks/results",
    "*.parquet",
    "runtime/",
]
# Forwarded so the job uses the submitter's store; a URI with credentials in it is not
# forwarded (job settings are visible in the dashboard): set it on the cluster instead.
FORWARDED_ENV = ("SKEWLESS_HOME", "MLFLOW_TRACKING_URI")


@dataclass(frozen=True)
class JobInfo:
    job_id: str
    status: str
    entrypoint: str
    message: str
    start_time: float | None
    end_time: float | None


def project_root(start: Path) -> Path:
    """The project checkout holding ``start``: the nearest parent with ``jobs/`` and ``pyproject.toml``."""
    for candidate in (start, *start.parents):
        if (candidate / "jobs").is_dir() and (candidate / "pyproject.toml").is_file():
            return candidate
    raise ConfigError(
        f"{start} is not inside a skewless project (no parent holds jobs/ and pyproject.toml); "
        "run from your project checkout"
    )


def _client(address: str | None) -> Any:
    from ray.job_submission import JobSubmissionClient

    address = address or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS
    try:
        return JobSubmissionClient(address)
    except Exception as exc:  # ConnectionError, AuthenticationError, ...
        hint = " (set RAY_AUTH_MODE=token so the client sends ~/.ray/auth_token)" if "uthenticat" in str(exc) else ""
        raise ClusterError(f"cannot reach the Ray Jobs API at {address}: {exc}{hint}") from None


def submit_training(config: Path, address: str | None = None, entrypoint_module: str = "jobs.train") -> str:
    """Validate ``config`` locally, then submit ``python -m jobs.train --config ...``; returns the job id."""
    import runtime
    from runtime.config import TrainJobConfig, load_config
    from runtime.preprocessing import FeatureSpec
    from runtime.registry import git_info

    path = config.resolve()
    root = project_root(path.parent)
    try:
        rel = path.relative_to(root)
    except ValueError:
        raise ConfigError(f"config {config} must live inside the project ({root}) so it ships with the job") from None
    cfg = load_config(TrainJobConfig, path)
    FeatureSpec.model_validate(cfg.feature_spec_dict(path.parent))  # fail here, not on the cluster
    git = git_info(root)
    env = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k) and "@" not in os.environ[k]}
    env["SKEWLESS_GIT_COMMIT"] = git.commit
    if git.dirty is not None:
        env["SKEWLESS_GIT_DIRTY"] = str(git.dirty).lower()
    runtime_env = {
        "working_dir": str(root),
        "excludes": EXCLUDES,
        "py_modules": [str(Path(runtime.__file__).resolve().parent)],
        "env_vars": env,
    }
    client = _client(address)
    entrypoint = f"python -m {entrypoint_module} --config {rel.as_posix()}"
    for attempt in range(6):
        try:
            return str(client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env))
        except Exception as exc:
            # A head node that just started has no job agent yet; Ray says "try again later".
            if "try again later" in str(exc) and attempt < 5:
                time.sleep(5.0)
                continue
            raise ClusterError(f"job submission refused: {exc}") from exc
    raise AssertionError("unreachable")


def job_info(job_id: str, address: str | None = None) -> JobInfo:
    client = _client(address)
    try:
        info = client.get_job_info(job_id)
    except Exception as exc:
        raise ClusterError(f"no job {job_id!r}: {exc}") from None
    return _info(info)


def _info(info: Any) -> JobInfo:
    return JobInfo(
        str(info.submission_id or info.job_id),
        str(info.status),
        str(info.entrypoint),
        str(info.message or ""),
        info.start_time / 1000 if info.start_time else None,
        info.end_time / 1000 if info.end_time else None,
    )


def list_jobs(address: str | None = None) -> list[JobInfo]:
    return sorted((_info(i) for i in _client(address).list_jobs()), key=lambda j: j.start_time or 0.0)


def job_logs(job_id: str, address: str | None = None) -> str:
    return str(_client(address).get_job_logs(job_id))


def follow_logs(job_id: str, write: Callable[[str], None], address: str | None = None) -> None:
    """Stream a job's logs to ``write`` until the job ends (Ray's websocket tail)."""
    import asyncio

    client = _client(address)

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            write(chunk)

    asyncio.run(tail())


def stop_job(job_id: str, address: str | None = None) -> bool:
    return bool(_client(address).stop_job(job_id))
