"""Credentials out of everything skewless prints or records.

A tracking URI (``postgresql://user:pass@db/mlflow``, ``https://token@host``) or a dataset
URI (``s3://bucket/x?access_key=...&secret_key=...``, a pre-signed URL) can carry secrets.
:func:`redact` replaces a URI's user-info with ``***`` and the value of every query
parameter whose name looks secret, wherever such a URI appears in a text; :func:`redact_obj`
does it through a config's nested dicts and lists. Errors, job logs, the demo's output,
MLflow params and tags, and ``lineage/config.yaml`` all go through it.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["MASK", "SECRET_FIELD", "has_credentials", "redact", "redact_obj"]

MASK = "***"
# scheme://userinfo@host: the user-info runs to the *last* '@' before the query, the fragment
# or the end of the URI, so a password holding '@' or '/' is masked whole (a path holding
# an '@' is masked too: more than needed, never less).
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^?#\s'\"]*)@")
# Config fields whose value is a secret as a whole (an API key): never echoed.
SECRET_FIELD = re.compile(r"(pass(word|wd)?|secret|token|api[_-]?key|access[_-]?key|credential)", re.IGNORECASE)
# a query (or fragment, or ;-separated) parameter with a secret-looking name
_SECRET_NAMES = (
    r"(?:[A-Za-z0-9_\-]*(?:pass(?:word|wd)?|pwd|secret|token|api[_\-]?key|access[_\-]?key|private[_\-]?key"
    r"|credential|signature|auth(?:orization)?|session)[A-Za-z0-9_\-]*|sig|key|sas|x-amz-[A-Za-z\-]+"
    r"|x-goog-[A-Za-z\-]+)"
)
_SECRET_PARAM = re.compile(rf"(?P<sep>[?&;#])(?P<name>{_SECRET_NAMES})=(?P<value>[^&;#\s'\"]*)", re.IGNORECASE)


def redact(text: str) -> str:
    """``text`` with every URI's user-info and secret query values masked."""
    if "://" not in text and "=" not in text:
        return text
    out = _USERINFO.sub(lambda m: f"{m['scheme']}{MASK}@", text)
    return _SECRET_PARAM.sub(lambda m: f"{m['sep']}{m['name']}={MASK}" if m["value"] else m[0], out)


def has_credentials(text: str) -> bool:
    """Whether :func:`redact` would change ``text``."""
    return redact(text) != text


def redact_obj(value: Any) -> Any:
    """A copy of ``value`` (nested dicts, lists, tuples, strings) with :func:`redact` applied."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: redact_obj(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_obj(v) for v in value)
    return value
