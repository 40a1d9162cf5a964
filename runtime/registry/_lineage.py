"""Lineage: what made a model (data, preprocessing, code, environment, hardware), recorded the
same way by every job and read back the same way by the CLI, Tune and ``reproduce``.

Every tag name lives in :class:`Tag`; :class:`LineageRecord` is what a training run knows
about its inputs, written with :meth:`LineageRecord.to_tags` and read with
:meth:`LineageRecord.from_tags`. Values that could carry credentials (a dataset URI) are
redacted before they are recorded.
"""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, ClassVar

from runtime.config import parse_yaml
from runtime.errors import RegistryError
from runtime.redact import redact

__all__ = [
    "GIT_COMMIT_ENV",
    "GIT_DIRTY_ENV",
    "GitInfo",
    "Lineage",
    "LineageRecord",
    "Tag",
    "environment_lock",
    "git_info",
    "hardware",
    "model_lineage",
]

# Set by `skewless train submit` for jobs that run from a copy without .git.
GIT_COMMIT_ENV = "SKEWLESS_GIT_COMMIT"
GIT_DIRTY_ENV = "SKEWLESS_GIT_DIRTY"


class Tag:
    """Every MLflow tag skewless writes, by name (runs and registered versions)."""

    WORKLOAD = "skewless.workload"  # "tabular" or "char_lm"
    ARCHITECTURE = "skewless.architecture"
    TASK = "skewless.task"
    DATASET_PATH = "skewless.dataset_path"  # redacted
    DATASET_SHA256 = "skewless.dataset_sha256"
    DATASET_BYTES = "skewless.dataset_bytes"
    TRAIN_ROWS = "skewless.train_rows"
    VALIDATION_ROWS = "skewless.validation_rows"
    HOLDOUT_ROWS = "skewless.holdout_rows"  # the test split
    FIT_ROWS = "skewless.preprocessing_fit_rows"
    INGEST = "skewless.ingest"  # memory | stream
    INGEST_REASON = "skewless.ingest_reason"  # why, in words
    PREPROCESSING_FINGERPRINT = "skewless.preprocessing_fingerprint"  # code + spec + state
    CODE_FINGERPRINT = "skewless.code_fingerprint"  # everything between a raw row and a prediction
    PREPROCESSING_CODE_FINGERPRINT = "skewless.preprocessing_code_fingerprint"
    SPEC_FINGERPRINT = "skewless.spec_fingerprint"
    STATE_FINGERPRINT = "skewless.state_fingerprint"
    ENVIRONMENT_SHA256 = "skewless.environment_sha256"
    GIT_COMMIT = "skewless.git_commit"
    GIT_DIRTY = "skewless.git_dirty"
    SEED = "skewless.seed"
    HARDWARE = "skewless.hardware."  # a prefix: one tag per fact
    DEVICE = "skewless.device"
    # set after training
    MODEL_URI = "skewless.model_uri"
    MANIFEST_SHA256 = "skewless.manifest_sha256"
    PROMOTION = "skewless.promotion"
    BEST_EPOCH = "skewless.early_stopping.best_epoch"
    STOPPED_EPOCH = "skewless.early_stopping.stopped_epoch"
    HOST_MEMORY_INCIDENTS = "skewless.host_memory_incidents"
    # Tune and reproduce
    TUNE_TRIAL = "skewless.tune_trial"
    TUNE_PARAMS = "skewless.tune_params"
    BEST_TRIAL_RUN = "skewless.best_trial_run"
    BEST_PARAMS = "skewless.best_params"
    REPRODUCES = "skewless.reproduces"
    # MLflow's own
    PARENT_RUN = "mlflow.parentRunId"

    # Run tags that are not copied to the registered version (long or local-only).
    RUN_ONLY = frozenset({DATASET_PATH, HOST_MEMORY_INCIDENTS, INGEST_REASON})

    @classmethod
    def for_version(cls, run_tags: dict[str, str]) -> dict[str, str]:
        """The run's skewless tags a registered version carries."""
        return {k: v for k, v in run_tags.items() if k.startswith("skewless.") and k not in cls.RUN_ONLY}


@dataclass(frozen=True)
class GitInfo:
    commit: str
    dirty: bool | None

    def as_tags(self) -> dict[str, str]:
        return {Tag.GIT_COMMIT: self.commit, Tag.GIT_DIRTY: str(self.dirty).lower()}


def git_info(path: str | os.PathLike[str] | None = None) -> GitInfo:
    """The commit and dirty flag of the checkout at ``path`` (default: this package's)."""
    if os.environ.get(GIT_COMMIT_ENV):
        dirty = os.environ.get(GIT_DIRTY_ENV, "").lower()
        return GitInfo(os.environ[GIT_COMMIT_ENV], dirty == "true" if dirty in ("true", "false") else None)
    cwd = Path(path) if path else Path(__file__).resolve().parents[2]

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        is_dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return GitInfo("unknown", None)
    return GitInfo(commit, is_dirty)


def environment_lock() -> tuple[str, str]:
    """The installed distributions as ``name==version`` lines, and their sha256."""
    lines = sorted(
        {f"{d.metadata['Name']}=={d.version}" for d in metadata.distributions() if d.metadata["Name"]},
        key=str.lower,
    )
    text = "\n".join(lines) + "\n"
    return text, hashlib.sha256(text.encode()).hexdigest()


def hardware() -> dict[str, str]:
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": str(os.cpu_count()),
        "gpu": "none",
        "gpu_count": "0",
    }
    try:
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["gpu_count"] = str(torch.cuda.device_count())
    except ImportError:
        pass
    return info


@dataclass(frozen=True)
class LineageRecord:
    """What a training run knows about its inputs; one record per run, as MLflow tags."""

    workload: str
    architecture: str
    dataset_path: str
    dataset_sha256: str
    seed: int
    git: GitInfo
    environment_sha256: str
    hardware: dict[str, str] = field(default_factory=dict)
    task: str | None = None
    rows: dict[str, int] = field(default_factory=dict)  # train / validation / holdout / fit
    fingerprints: dict[str, str] = field(default_factory=dict)  # preprocessing / code / spec / state
    ingest: str | None = None

    _ROWS: ClassVar[dict[str, str]] = {
        "train": Tag.TRAIN_ROWS,
        "validation": Tag.VALIDATION_ROWS,
        "holdout": Tag.HOLDOUT_ROWS,
        "fit": Tag.FIT_ROWS,
    }
    _FINGERPRINTS: ClassVar[dict[str, str]] = {
        "preprocessing": Tag.PREPROCESSING_FINGERPRINT,
        "code": Tag.CODE_FINGERPRINT,
        "preprocessing_code": Tag.PREPROCESSING_CODE_FINGERPRINT,
        "spec": Tag.SPEC_FINGERPRINT,
        "state": Tag.STATE_FINGERPRINT,
    }

    @classmethod
    def collect(cls, **fields: Any) -> LineageRecord:
        """A record with this process's git checkout, installed environment and hardware."""
        _, env_hash = environment_lock()
        return cls(git=git_info(), environment_sha256=env_hash, hardware=hardware(), **fields)

    def to_tags(self) -> dict[str, str]:
        tags = {
            Tag.WORKLOAD: self.workload,
            Tag.ARCHITECTURE: self.architecture,
            Tag.DATASET_PATH: redact(self.dataset_path),
            Tag.DATASET_SHA256: self.dataset_sha256,
            Tag.SEED: str(self.seed),
            Tag.ENVIRONMENT_SHA256: self.environment_sha256,
            **self.git.as_tags(),
            **{f"{Tag.HARDWARE}{k}": v for k, v in self.hardware.items()},
            **{self._ROWS[k]: str(v) for k, v in self.rows.items()},
            **{self._FINGERPRINTS[k]: v for k, v in self.fingerprints.items()},
        }
        if self.task is not None:
            tags[Tag.TASK] = self.task
        if self.ingest is not None:
            tags[Tag.INGEST] = self.ingest
        return tags

    @classmethod
    def from_tags(cls, tags: dict[str, str]) -> LineageRecord:
        dirty = tags.get(Tag.GIT_DIRTY, "none")
        return cls(
            workload=tags.get(Tag.WORKLOAD, "tabular"),
            architecture=tags.get(Tag.ARCHITECTURE, "mlp"),
            dataset_path=tags.get(Tag.DATASET_PATH, "?"),
            dataset_sha256=tags.get(Tag.DATASET_SHA256, "?"),
            seed=int(tags.get(Tag.SEED, "0")),
            git=GitInfo(tags.get(Tag.GIT_COMMIT, "unknown"), {"true": True, "false": False}.get(dirty)),
            environment_sha256=tags.get(Tag.ENVIRONMENT_SHA256, "?"),
            hardware={k.removeprefix(Tag.HARDWARE): v for k, v in tags.items() if k.startswith(Tag.HARDWARE)},
            task=tags.get(Tag.TASK),
            rows={k: int(tags[t]) for k, t in cls._ROWS.items() if tags.get(t, "").isdigit()},
            fingerprints={k: tags[t] for k, t in cls._FINGERPRINTS.items() if t in tags},
            ingest=tags.get(Tag.INGEST),
        )


@dataclass(frozen=True)
class Lineage:
    """A registered model's lineage: its version, aliases, source run, record and metrics."""

    model: Any  # ModelRef
    aliases: list[str]
    run_id: str
    tags: dict[str, str]
    metrics: dict[str, float]
    config: dict[str, Any] = field(repr=False)

    @property
    def record(self) -> LineageRecord:
        return LineageRecord.from_tags(self.tags)

    def rows(self) -> list[tuple[str, str]]:
        """(what, value) pairs for display, most important first."""
        r = self.record
        counts = ", ".join(f"{v:,} {k}" for k, v in r.rows.items())
        out = [
            (
                "model",
                f"models:/{self.model.name}/{self.model.version}"
                + (f" (@{', @'.join(self.aliases)})" if self.aliases else ""),
            ),
            ("run", self.run_id),
            ("workload", f"{r.workload} ({r.architecture}{f', {r.task}' if r.task else ''})"),
            ("dataset", f"{r.dataset_path} ({counts or '?'})"),
            ("dataset sha256", r.dataset_sha256),
            *((f"{k.replace('_', ' ')} fingerprint", v) for k, v in r.fingerprints.items()),
            ("ingest", r.ingest or "?"),
            ("git commit", f"{r.git.commit} (dirty: {str(r.git.dirty).lower()})"),
            ("environment sha256", r.environment_sha256),
            ("seed", str(r.seed)),
            ("hardware", ", ".join(f"{k}={v}" for k, v in sorted(r.hardware.items()))),
        ]
        out += [(k, f"{v:.6g}") for k, v in sorted(self.metrics.items()) if k.startswith("holdout_")]
        return out


def model_lineage(model_uri: str) -> Lineage:
    """Everything recorded about the run that produced ``model_uri``."""
    import mlflow

    from runtime.registry._registry import resolve

    ref = resolve(model_uri)
    if not ref.run_id:
        raise RegistryError(f"{model_uri}: the registered version has no source run; cannot show its lineage")
    client = mlflow.MlflowClient()
    run = client.get_run(ref.run_id)
    try:
        text = mlflow.artifacts.load_text(f"runs:/{ref.run_id}/lineage/config.yaml")
    except Exception as exc:  # MLflow raises several types for a missing artifact
        raise RegistryError(f"{model_uri}: run {ref.run_id} has no lineage/config.yaml ({exc})") from exc
    aliases = list(client.get_model_version(ref.name, ref.version).aliases or [])
    config = parse_yaml(text, f"run {ref.run_id}'s lineage/config.yaml")
    return Lineage(ref, aliases, ref.run_id, dict(run.data.tags), dict(run.data.metrics), config)
