"""The README's promises: two commands up front, and CI runs exactly them."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def code_blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)


def test_readme_opens_with_exactly_two_commands() -> None:
    first = code_blocks("bash")[0].strip().splitlines()
    assert len(first) == 2
    setup, tests = first
    assert setup.startswith("python3 -m venv .venv && ") and setup.endswith(" && .venv/bin/skewless demo")
    assert "-c constraints.txt" in setup  # the pinned versions are what gets installed
    assert tests.startswith(".venv/bin/python -m pytest")


def test_ci_runs_the_readme_commands() -> None:
    ci = (REPO / ".ci/run").read_text()
    assert "README.md" in ci and 'eval "$setup"' in ci and 'eval "$tests"' in ci
    for tool in ("ruff check", "ruff format --check", "mypy"):
        assert tool in ci


def test_constraints_pin_torch_without_local_tag() -> None:
    lines = (REPO / "constraints.txt").read_text().splitlines()
    assert "torch==2.13.0" in lines  # a CPU machine takes +cpu, a GPU machine the CUDA build
    assert not any(line.lower().startswith(("nvidia-cuda", "nvidia-cudnn")) for line in lines)
