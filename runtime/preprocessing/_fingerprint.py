"""Fingerprints: of this package's code, and of a fitted preprocessor (code + spec + state).

The code fingerprint is a sha256 over every ``.py`` file of ``runtime/preprocessing``,
sorted by relative path, each contributing its path and its bytes (length-prefixed, so no
two file sets hash alike). A serving replica compares it with the one recorded at fit time.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any

__all__ = ["canonical_json", "code_fingerprint", "preprocessor_fingerprint"]

_PACKAGE_DIR = Path(__file__).resolve().parent


def _code_fingerprint_of(root: Path) -> str:
    h = hashlib.sha256()
    files = sorted(
        (p.relative_to(root).as_posix(), p)
        for p in root.rglob("*.py")
        if "__pycache__" not in p.relative_to(root).parts
    )
    for rel, path in files:
        data = path.read_bytes()
        name = rel.encode("utf-8")
        h.update(len(name).to_bytes(8, "big"))
        h.update(name)
        h.update(len(data).to_bytes(8, "big"))
        h.update(data)
    return h.hexdigest()


@functools.cache
def code_fingerprint() -> str:
    """sha256 hex over the preprocessing package's own source files (cached per process)."""
    return _code_fingerprint_of(_PACKAGE_DIR)


def canonical_json(obj: Any) -> str:
    """Sorted keys, no whitespace, UTF-8, no NaN: one text per value."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def preprocessor_fingerprint(code: str, spec: dict[str, Any], state: dict[str, Any]) -> str:
    """sha256 hex over the code fingerprint, the canonical spec and the canonical state."""
    h = hashlib.sha256()
    for part in (code, canonical_json(spec), canonical_json(state)):
        data = part.encode("utf-8")
        h.update(len(data).to_bytes(8, "big"))
        h.update(data)
    return h.hexdigest()
