"""Fingerprints: of source code (normalized), and of a fitted preprocessor (code + spec + state).

A code fingerprint hashes what the code *does*, not how it is written down: each file is
parsed and its AST, without docstrings (comments never reach the AST), is dumped and hashed,
with the file's path relative to the ``runtime`` package. A comment or docstring edit keeps
the fingerprint; a changed expression changes it. :func:`code_fingerprint` covers this
package (the preprocessing a fitted state needs); :func:`source_fingerprint` covers any set
of files (the registry fingerprints everything between a raw row and a prediction).
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = [
    "canonical_json",
    "code_fingerprint",
    "package_files",
    "part_fingerprints",
    "preprocessor_fingerprint",
    "source_fingerprint",
]

_PACKAGE_DIR = Path(__file__).resolve().parent
_RUNTIME_ROOT = _PACKAGE_DIR.parent.parent  # the directory holding the ``runtime`` package


def _without_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            first = body[0].value if body and isinstance(body[0], ast.Expr) else None
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                node.body = body[1:] or [ast.Pass()]
    return tree


def normalized_source(path: Path) -> str:
    """The file's AST without docstrings, as text (comments and layout do not reach it)."""
    info = path.stat()
    return _normalized(str(path), info.st_mtime_ns, info.st_size)


@functools.lru_cache(maxsize=256)
def _normalized(path: str, mtime_ns: int, size: int) -> str:  # cached while the file is unchanged
    tree = _without_docstrings(ast.parse(Path(path).read_text(encoding="utf-8"), filename=path))
    return ast.dump(tree, annotate_fields=True, include_attributes=False)


def source_fingerprint(files: Iterable[Path], root: Path = _RUNTIME_ROOT) -> str:
    """sha256 hex over the normalized source of ``files``, each named by its path under ``root``
    (default: the directory holding the ``runtime`` package, so ``runtime/tasks.py``)."""
    h = hashlib.sha256()
    resolved = {p.resolve() for p in files}
    for rel, path in sorted((p.relative_to(root.resolve()).as_posix(), p) for p in resolved):
        for part in (rel.encode("utf-8"), normalized_source(path).encode("utf-8")):
            h.update(len(part).to_bytes(8, "big"))
            h.update(part)
    return h.hexdigest()


def package_files(directory: Path = _PACKAGE_DIR) -> list[Path]:
    """Every ``.py`` file of a package directory (``__pycache__`` left out)."""
    return sorted(p for p in directory.rglob("*.py") if "__pycache__" not in p.parts)


@functools.cache
def code_fingerprint() -> str:
    """The normalized-source fingerprint of the preprocessing package (cached per process)."""
    return source_fingerprint(package_files())


def canonical_json(obj: Any) -> str:
    """Sorted keys, no whitespace, UTF-8, no NaN: one text per value."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def part_fingerprints(spec: dict[str, Any], state: dict[str, Any]) -> dict[str, str]:
    """The spec's and the fitted state's own sha256, reported beside the code's."""
    return {"spec": _sha256_text(canonical_json(spec)), "state": _sha256_text(canonical_json(state))}


def preprocessor_fingerprint(code: str, spec: dict[str, Any], state: dict[str, Any]) -> str:
    """sha256 hex over the code fingerprint, the canonical spec and the canonical state."""
    h = hashlib.sha256()
    for part in (code, canonical_json(spec), canonical_json(state)):
        data = part.encode("utf-8")
        h.update(len(data).to_bytes(8, "big"))
        h.update(data)
    return h.hexdigest()
