"""Fingerprints: of source code (normalized), and of a fitted preprocessor (code + spec + state).

A code fingerprint hashes what the code *does*, not how it is written down: each file's
tokens (Python's own ``tokenize``), without comments, blank lines, docstrings or the
whitespace inside a line, with the file's path relative to the ``runtime`` package. A comment
or docstring edit keeps the fingerprint; a changed expression changes it. Tokens, not the AST
dump: ``ast.dump`` changes between Python versions (3.12 added fields, 3.13 leaves out empty
ones), and a model trained on 3.11 must load on a 3.12 GPU machine. f-strings, which 3.12
tokenizes into parts, count as one string token, as 3.11 has them.
:func:`code_fingerprint` covers this package (the preprocessing a fitted state needs);
:func:`source_fingerprint` covers any set of files (the registry fingerprints everything
between a raw row and a prediction).
"""

from __future__ import annotations

import ast
import functools
import hashlib
import io
import json
import tokenize
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


def _docstring_starts(tree: ast.AST) -> set[tuple[int, int]]:
    """(line, column) where each module, class and function docstring starts."""
    starts = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if (
                isinstance(first, ast.Expr)
                and isinstance(first.value, ast.Constant)
                and isinstance(first.value.value, str)
            ):
                starts.add((first.lineno, first.col_offset))
    return starts


_SKIPPED = {tokenize.COMMENT, tokenize.NL, tokenize.ENCODING}
_FSTRING_START = getattr(tokenize, "FSTRING_START", None)  # Python 3.12+
_FSTRING_END = getattr(tokenize, "FSTRING_END", None)


def normalized_tokens(source: str) -> str:
    """The code's tokens, one per line, as ``TYPE text``: comments, blank lines, docstrings and
    in-line whitespace left out; indentation kept as INDENT / DEDENT (it is syntax)."""
    docstrings = _docstring_starts(ast.parse(source))
    lines = source.splitlines(keepends=True)
    out: list[str] = []
    depth, fstring_start, after_docstring = 0, (0, 0), False
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if after_docstring:  # the docstring's statement ends: its NEWLINE goes with it
            after_docstring = False
            if tok.type == tokenize.NEWLINE:
                continue
        if _FSTRING_START is not None and tok.type == _FSTRING_START:
            if depth == 0:
                fstring_start = tok.start
            depth += 1
            continue
        if depth:
            if tok.type == _FSTRING_END:
                depth -= 1
                if depth == 0:  # the whole f-string, as the one STRING token 3.11 makes of it
                    out.append("STRING " + _span(lines, fstring_start, tok.end))
            continue
        if tok.type == tokenize.STRING and tok.start in docstrings:
            after_docstring = True
            continue
        if tok.type in _SKIPPED:
            continue
        if tok.type in (tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER):
            out.append(tokenize.tok_name[tok.type])
        else:
            out.append(f"{tokenize.tok_name[tok.type]} {tok.string}")
    return "\n".join(out)


def _span(lines: list[str], start: tuple[int, int], end: tuple[int, int]) -> str:
    (r0, c0), (r1, c1) = start, end
    if r0 == r1:
        return lines[r0 - 1][c0:c1]
    return lines[r0 - 1][c0:] + "".join(lines[r0 : r1 - 1]) + lines[r1 - 1][:c1]


def normalized_source(path: Path) -> str:
    """:func:`normalized_tokens` of a file (cached by content)."""
    data = path.read_bytes()
    return _normalized(hashlib.sha256(data).hexdigest(), data.decode("utf-8"))


@functools.lru_cache(maxsize=512)
def _normalized(digest: str, source: str) -> str:  # keyed by the content's digest
    return normalized_tokens(source)


def _name(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root.resolve()).as_posix()
    except ValueError:  # code outside the project (an architecture of the user's): its file name
        return path.name


def source_fingerprint(files: Iterable[Path], root: Path = _RUNTIME_ROOT) -> str:
    """sha256 hex over the normalized source of ``files``, each named by its path under ``root``
    (default: the directory holding the ``runtime`` package, so ``runtime/tasks.py``)."""
    h = hashlib.sha256()
    resolved = {p.resolve() for p in files}
    for rel, path in sorted((_name(p, root), p) for p in resolved):
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
