"""What made a model: code version, environment and hardware, recorded with every run."""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

# Set by `skewless train submit` for jobs that run from a copy without .git.
GIT_COMMIT_ENV = "SKEWLESS_GIT_COMMIT"
GIT_DIRTY_ENV = "SKEWLESS_GIT_DIRTY"


@dataclass(frozen=True)
class GitInfo:
    commit: str
    dirty: bool | None

    def as_tags(self) -> dict[str, str]:
        return {"skewless.git_commit": self.commit, "skewless.git_dirty": str(self.dirty).lower()}


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


__all__ = ["GitInfo", "environment_lock", "git_info", "hardware"]
