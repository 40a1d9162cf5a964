"""The house rules that keep the layers honest (import-linter checks the layer order in CI).

- Product code (``runtime``, ``jobs``, ``serve_apps``, ``benchmarks``) imports other packages'
  public names only: no ``from runtime.<other>._private import ...``.
- A test may reach into the private modules of the one package it tests, no more.
- No package-level import cycle among ``runtime``'s packages, lazy imports included.
- Every package's ``__all__`` names what it has.
"""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PRODUCT = ("runtime", "jobs", "serve_apps", "benchmarks")


_DOTTED = re.compile(r"^runtime(\.\w+)+$")


def _imports(path: Path) -> list[str]:
    """Every module ``path`` imports, at module level or inside functions, and every dotted
    ``runtime.`` path it names in a string (``monkeypatch.setattr("runtime.x._y.f", ...)``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append(node.module)
            found.extend(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            raise AssertionError(f"{path}: relative import; name the module ({node.module})")
        elif isinstance(node, ast.Import):
            found.extend(a.name for a in node.names)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and _DOTTED.match(node.value):
            found.append(node.value)
    return found


def _owner(module: str) -> str | None:
    """``runtime.training`` for ``runtime.training.callbacks._oom``: the top-level package."""
    parts = module.split(".")
    if parts[0] != "runtime" or len(parts) < 2:
        return None
    return ".".join(parts[:2])


def _private_owner(module: str) -> str | None:
    """The package whose private module ``module`` is (None when it names public modules only)."""
    parts = module.split(".")
    for i, part in enumerate(parts):
        if part.startswith("_") and not part.startswith("__") and i > 0:
            return ".".join(parts[:2]) if parts[0] == "runtime" else parts[0]
    return None


def _package_of(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts
    if parts[0] != "runtime":
        return parts[0]
    return ".".join(parts[:2]) if len(parts) > 2 else ".".join(parts)


def _files(*tops: str) -> list[Path]:
    return sorted(p for top in tops for p in (ROOT / top).rglob("*.py") if "__pycache__" not in p.parts)


def test_product_code_imports_other_packages_public_names_only() -> None:
    offenders = []
    for path in _files(*PRODUCT):
        mine = _package_of(path)
        for module in _imports(path):
            owner = _private_owner(module)
            if owner is not None and owner != mine and module.split(".")[0] in ("runtime", "jobs", "serve_apps"):
                offenders.append(f"{path.relative_to(ROOT)}: {module}")
    assert not offenders, "private modules of another package:\n" + "\n".join(sorted(set(offenders)))


def test_a_test_reaches_into_one_package_at_most() -> None:
    offenders = []
    for path in _files("tests"):
        owners = {o for m in _imports(path) if m.startswith("runtime.") and (o := _private_owner(m))}
        if len(owners) > 1:
            offenders.append(f"{path.relative_to(ROOT)}: {sorted(owners)}")
    assert not offenders, "tests reaching into several packages' private modules:\n" + "\n".join(offenders)


def _package(module: str) -> str | None:
    """The innermost package (or top-level module) of ``runtime`` that holds ``module``."""
    parts = module.split(".")
    if parts[0] != "runtime":
        return None
    found = None
    for i in range(2, len(parts) + 1):
        path = ROOT.joinpath(*parts[:i])
        if path.is_dir():
            found = ".".join(parts[:i])
        elif path.with_suffix(".py").exists():
            return found if found and found != "runtime" else ".".join(parts[:i])
        else:
            break
    return found


def test_no_package_level_import_cycle() -> None:
    """Between ``runtime``'s packages and sub-packages (``runtime.training`` and
    ``runtime.training.callbacks`` count apart), lazy imports inside functions included."""
    graph: dict[str, set[str]] = {}
    for path in _files("runtime"):
        mine = _package(".".join(path.relative_to(ROOT).with_suffix("").parts))
        for module in _imports(path):
            owner = _package(module)
            if mine and owner and owner != mine:
                graph.setdefault(mine, set()).add(owner)

    def reaches(start: str, target: str, seen: set[str]) -> bool:
        for nxt in graph.get(start, ()):
            if nxt == target or (nxt not in seen and reaches(nxt, target, seen | {nxt})):
                return True
        return False

    cycles = sorted(f"{a} <-> {b}" for a, deps in graph.items() for b in deps if reaches(b, a, {b}))
    assert not cycles, "package-level import cycles:\n" + "\n".join(cycles)


@pytest.mark.parametrize(
    "package",
    [
        "runtime.cluster",
        "runtime.data",
        "runtime.memory",
        "runtime.models",
        "runtime.monitoring",
        "runtime.preprocessing",
        "runtime.registry",
        "runtime.serving",
        "runtime.training",
        "runtime.training.callbacks",
    ],
)
def test_each_package_exports_what_it_names(package: str) -> None:
    module = importlib.import_module(package)
    assert module.__all__, package
    missing = [name for name in module.__all__ if not hasattr(module, name)]
    assert not missing, f"{package}.__all__ names what it does not have: {missing}"
    assert sorted(module.__all__) == sorted(set(module.__all__)), f"{package}.__all__ repeats a name"


def test_memory_is_a_leaf_that_imports_without_torch() -> None:
    import subprocess
    import sys

    probe = (
        "import sys, runtime.memory; "
        "print(sorted(m for m in ('torch', 'ray', 'mlflow', 'runtime.training', 'runtime.serving') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"
