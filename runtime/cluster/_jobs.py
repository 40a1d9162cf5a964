"""Jobs through Ray's Jobs API (``JobSubmissionClient``), local or remote alike.

A submission ships an allow-listed copy of the project as the job's ``working_dir``: the
``jobs/`` and ``serve_apps/`` code and configs, ``pyproject.toml``, the submitted config and
the files it references; never a ``.env``, a key file, data files or virtualenvs, whatever
``.gitignore`` says. The ``runtime`` package (preprocessing included) goes as a
``py_modules`` artifact, so the cluster runs exactly the code the config was validated
against. The entrypoint is shell-quoted. The git commit and dirty flag of the submitting
checkout travel as environment variables (the uploaded copy has no ``.git``), and so do
``SKEWLESS_HOME`` and ``MLFLOW_TRACKING_URI`` unless they carry credentials (job settings
are visible in the dashboard): those are left out, and the submission says so.
"""

from __future__ import annotations

import fnmatch
import os
import shlex
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtime.connect import VERBOSE_ENV, dashboard_address
from runtime.errors import ClusterError, ConfigError
from runtime.redact import has_credentials, redact

# What a job's working_dir may hold: these trees, files with these suffixes.
SHIPPED_TREES = ("jobs", "serve_apps")
SHIPPED_SUFFIXES = (".py", ".yaml", ".yml", ".json", ".toml", ".txt", ".md")
SHIPPED_FILES = ("pyproject.toml",)
# Never shipped, even inside an allowed tree.
SECRET_PATTERNS = (
    ".env",
    ".env.*",
    "*.env",
    "*.pem",
    "*.key",
    "*.p12",
    "*.pfx",
    "id_rsa*",
    "id_ed25519*",
    "id_ecdsa*",
    ".netrc",
    ".pypirc",
    "*credentials*",
    "*secret*",
    "*.token",
    "auth_token",
)
FORWARDED_ENV = ("SKEWLESS_HOME", "MLFLOW_TRACKING_URI")
Validate = Callable[[Path], Iterable[Path]]  # validates a job config; returns the files it references


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

    address = dashboard_address(address)
    try:
        return JobSubmissionClient(address)
    except Exception as exc:  # ConnectionError, AuthenticationError, ...
        hint = (
            " (set RAY_AUTH_MODE=token so the client sends ~/.ray/auth_token)"
            if "uthenticat" in str(exc)
            else (
                "; is a cluster running? Start one with `skewless cluster up cluster/local.yaml` (or `ray start --head`), "
                "or pass --address"
            )
        )
        raise ClusterError(f"cannot reach the Ray Jobs API at {redact(address)}: {redact(str(exc))}{hint}") from None


def is_secret(path: Path) -> bool:
    return any(fnmatch.fnmatch(part.lower(), pattern) for part in path.parts for pattern in SECRET_PATTERNS)


def stage_working_dir(root: Path, extra: Iterable[Path], target: Path) -> list[str]:
    """Copy the allow-listed files of the project at ``root`` (and ``extra`` files inside it)
    to ``target``; returns their relative paths. Secret-looking files are never copied."""
    chosen: set[Path] = {root / name for name in SHIPPED_FILES if (root / name).is_file()}
    for tree in SHIPPED_TREES:
        for path in (root / tree).rglob("*") if (root / tree).is_dir() else ():
            if (
                path.is_file()
                and not path.is_symlink()  # a link may point anywhere (a credentials file): never followed
                and path.suffix in SHIPPED_SUFFIXES
                and "__pycache__" not in path.parts
            ):
                chosen.add(path)
    for path in extra:
        resolved = path.resolve()
        try:
            rel = resolved.relative_to(root)
        except ValueError:
            raise ConfigError(f"{path} must live inside the project ({root}) so it ships with the job") from None
        if is_secret(rel):
            raise ConfigError(
                f"{path} is referenced by the job config but its name looks like a secret ({rel.as_posix()}); "
                "secrets are never shipped with a job: rename it, or set the secret on the cluster"
            )
        chosen.add(resolved)
    shipped = []
    for path in sorted(chosen):
        rel = path.relative_to(root)
        if is_secret(rel):
            continue
        (target / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target / rel)
        shipped.append(rel.as_posix())
    return shipped


def job_entrypoint(module: str, config: str) -> str:
    """``python -m <module> --config <config>``, shell-quoted (a path with a space or a ``;``)."""
    return shlex.join(["python", "-m", module, "--config", config])


def forwarded_env(environ: Mapping[str, str]) -> tuple[dict[str, str], list[str]]:
    """The variables a job gets from the submitter, and notes on those left out: a value with
    credentials is never forwarded (job settings are visible in the dashboard), and says so."""
    env, notes = {}, []
    for key in FORWARDED_ENV:
        value = environ.get(key)
        if not value:
            continue
        if has_credentials(value) or "@" in value:
            notes.append(
                f"${key} ({redact(value)}) carries credentials and is not forwarded (job settings are visible in "
                "the Ray dashboard): set it on the cluster's nodes instead"
            )
            continue
        env[key] = value
    return env, notes


@dataclass(frozen=True)
class Submission:
    job_id: str
    entrypoint: str
    shipped: list[str]
    notes: list[str] = field(default_factory=list)  # what the user should know (e.g. a URI left out)


def submit_job(
    config: Path, module: str, validate: Validate, address: str | None = None, verbose: bool = False
) -> Submission:
    """Validate ``config`` here (``validate`` returns the files it references), then submit
    ``python -m <module> --config <config>`` with an allow-listed working_dir. ``verbose``: the
    job's log shows the engines' logs too (``SKEWLESS_VERBOSE=1`` in its environment)."""
    import runtime
    from runtime.registry import git_info

    path = config.resolve()
    root = project_root(path.parent)
    try:
        rel = path.relative_to(root)
    except ValueError:
        raise ConfigError(f"config {config} must live inside the project ({root}) so it ships with the job") from None
    referenced = list(validate(path))  # fail here, not on the cluster
    git = git_info(root)
    client = _client(address)  # first: with no address, this adopts the current cluster's tracking server
    env, notes = forwarded_env(os.environ)
    env["SKEWLESS_GIT_COMMIT"] = git.commit
    if verbose:
        env[VERBOSE_ENV] = "1"
    if git.dirty is not None:
        env["SKEWLESS_GIT_DIRTY"] = str(git.dirty).lower()
    entrypoint = job_entrypoint(module, rel.as_posix())
    with tempfile.TemporaryDirectory(prefix="skewless-job-") as staged:
        shipped = stage_working_dir(root, [path, *referenced], Path(staged))
        runtime_env = {
            "working_dir": staged,
            "py_modules": [str(Path(runtime.__file__).resolve().parent)],
            "excludes": ["**/__pycache__"],
            "env_vars": env,
        }
        for attempt in range(6):
            try:
                job_id = str(client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env))
                return Submission(job_id, entrypoint, shipped, notes)
            except Exception as exc:
                # A head node that just started has no job agent yet; Ray says "try again later".
                if "try again later" in str(exc) and attempt < 5:
                    time.sleep(5.0)
                    continue
                raise ClusterError(f"job submission refused: {redact(str(exc))}") from exc
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
