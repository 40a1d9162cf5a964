"""Config at the edge: the one strict base, YAML reader and validation-error formatter.

Every user-written config (training and LM jobs in ``runtime.training``, Tune, the feature
spec in ``runtime.preprocessing``, the model architectures in ``runtime.models``, the Serve
app args here) is a :class:`StrictModel`: unknown keys are errors, values are frozen.
:func:`load_config` / :func:`validate` turn pydantic's errors into one
:class:`~runtime.errors.ConfigError` that names the file, the field path, the bad value and
the rule, with a did-you-mean hint for misspelt keys. Each default lives in its model only.
"""

from __future__ import annotations

import difflib
import os
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, Tag, ValidationError

from runtime.errors import ConfigError
from runtime.redact import MASK, SECRET_FIELD, redact

__all__ = [
    "MonitoringArgs",
    "ServeAppArgs",
    "StrictModel",
    "expand_path",
    "format_validation_error",
    "load_config",
    "parse_yaml",
    "read_yaml",
    "resolve_path",
    "validate",
]

M = TypeVar("M", bound=BaseModel)


class StrictModel(BaseModel):
    """Base of every user-written config: unknown keys are errors, values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class MonitoringArgs(StrictModel):
    """Live monitoring inside the predictor replicas (``args.monitoring``)."""

    enabled: bool = Field(
        default=True,
        description="Summarise live traffic over the model's reference bins and log every prediction (with its "
        "request id) to the store; off: neither.",
    )
    store: str | None = Field(
        default=None,
        description="Where summaries, the prediction log and labels go: a directory or a pyarrow.fs URI (s3://, gs://, "
        "hdfs://) every replica can reach. Default: $SKEWLESS_HOME/monitoring.",
    )
    flush_interval_s: float = Field(
        default=10.0,
        ge=0.1,
        le=3600.0,
        description="How often each replica writes its window summary and prediction-log rows (a replica restart "
        "loses at most this much).",
    )
    evaluate_interval_s: float = Field(
        default=60.0,
        ge=1.0,
        le=86400.0,
        description="How often replica 0 judges the trailing window (drift, estimated and realised performance) and "
        "updates the skewless_drift_* and skewless_performance_* metrics.",
    )
    window_s: float = Field(
        default=3600.0, ge=1.0, description="The trailing window the metrics judge: drift and the estimate."
    )
    label_window_s: float = Field(
        default=7 * 86400.0,
        ge=1.0,
        description="The trailing window of predictions joined with their labels for realised performance "
        "(labels arrive late: longer than window_s).",
    )
    log_inputs: Literal["hash", "none"] = Field(
        default="hash",
        description="What the prediction log keeps of each row's inputs: a 64-bit hash (to find duplicates and match "
        "rows) or nothing.",
    )
    max_buffered_rows: int = Field(
        default=200_000,
        ge=1,
        description="Rows a replica holds between flushes; past this, rows are dropped from monitoring (counted in "
        "skewless_monitor_dropped_rows_total), never the request.",
    )


class ServeAppArgs(StrictModel):
    """The ``args`` of the predictor Serve application."""

    model_uri: str = Field(
        pattern=r"^(models:/|runs:/|file:|/).+",
        description="MLflow model URI, e.g. models:/churn@champion, or a packaged model directory.",
    )
    allow_fingerprint_mismatch: bool = Field(
        default=False,
        description="Load even when the installed preprocessing code differs (logged loudly).",
    )
    inject_error_rate: float = Field(
        default=0.0,
        ge=0.0,
        lt=1.0,
        description="Fault injection: answer this share of predictions with a 500 (to rehearse a rollback "
        "or an alert). Logged at start; 0 in production.",
    )
    max_instances: int = Field(default=10_000, ge=1, description="Most instances in one request.")
    max_body_bytes: int = Field(default=10 << 20, ge=1024, description="Largest request body accepted (413 above).")
    max_batch_size: int = Field(
        default=32, ge=1, description="Most requests one model call serves (Ray Serve dynamic batching)."
    )
    batch_wait_timeout_s: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        description="How long a batch waits to fill before the model runs. 0: the model takes the requests "
        "already queued (under load, those that arrived during the previous call), so a lone request never waits.",
    )
    api_key: str | None = Field(
        default=None,
        description="Bearer API key required on /predict (off when unset and api_key_env is unset or empty). "
        "Prefer api_key_env: a key in a config file is a secret in a file.",
    )
    api_key_env: str | None = Field(
        default=None, description="Environment variable holding the bearer API key, e.g. SKEWLESS_API_KEY."
    )
    gpu_memory_bytes: int | None = Field(
        default=None,
        ge=1,
        description="GPU memory one replica needs (declared); checked against its num_gpus share before deploying.",
    )
    gpu_headroom_bytes: int | None = Field(
        default=None, ge=0, description="CUDA context headroom kept out of a fractional-GPU budget (default 600 MiB)."
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto",
        description="Where the model runs: auto = the GPU when the replica was given one (ray_actor_options.num_gpus), "
        "else the CPU; cuda = refuse to start without a GPU.",
    )
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        default="fp32", description="Weights' precision for inference on a GPU (the CPU serves fp32)."
    )
    gpu_rows_per_call: int = Field(
        default=16384,
        ge=1,
        le=1 << 20,
        description="On a GPU, the most rows one model call runs (a larger batch runs in several): bounds the "
        "activations a bulk request takes from the replica's budget. The replica warms up at this size.",
    )
    monitoring: MonitoringArgs = Field(
        default_factory=MonitoringArgs,
        description="Live monitoring: window summaries for drift, the prediction log for delayed labels.",
    )


def expand_path(value: str) -> str:
    """``~`` and environment variables expanded; ``$SKEWLESS_HOME`` defaults to ``~/.skewless``."""
    if "SKEWLESS_HOME" in value and not os.environ.get("SKEWLESS_HOME"):
        value = value.replace("${SKEWLESS_HOME}", "~/.skewless").replace("$SKEWLESS_HOME", "~/.skewless")
    return os.path.expanduser(os.path.expandvars(value))


def resolve_path(path: str, base_dir: Path | None) -> Path:
    p = Path(os.path.expandvars(os.path.expanduser(path)))
    if not p.is_absolute() and base_dir is not None and (base_dir / p).exists():
        return base_dir / p
    return p


def read_yaml(path: str | os.PathLike[str], what: str = "config") -> dict[str, Any]:
    """A YAML file whose top level is a mapping; every failure is a :class:`ConfigError`."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{what} {str(path)!r} cannot be read: {exc.strerror or exc}") from None
    return parse_yaml(text, f"{what} {str(path)!r}")


def parse_yaml(text: str, source: str = "config") -> dict[str, Any]:
    """YAML text whose top level is a mapping; ``source`` names it in the error."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{source} must be a mapping at the top level, got {type(data).__name__}")
    return data


def _unwrap(t: Any) -> tuple[Any, list[Any]]:
    """``Annotated[T, ...]`` -> (T, metadata); anything else -> (t, [])."""
    if get_origin(t) is Annotated:
        base, *meta = get_args(t)
        inner, more = _unwrap(base)
        return inner, [*meta, *more]
    return t, []


def _union_members(t: Any) -> list[Any]:
    return list(get_args(t)) if get_origin(t) in (Union, types.UnionType) else []


def _tags(members: list[Any]) -> dict[str, Any]:
    """A discriminated union's tag -> member (explicit ``Tag`` or the member's Literal default)."""
    out: dict[str, Any] = {}
    for member in members:
        base, meta = _unwrap(member)
        tag = next((m.tag for m in meta if isinstance(m, Tag)), None)
        if tag is None and isinstance(base, type) and issubclass(base, BaseModel):
            tag = next(iter(_literal_fields(base).values()), None)
        if tag is not None:
            out[str(tag)] = base
    return out


def _literal_fields(model: type[BaseModel]) -> dict[str, str]:
    """Fields typed as a Literal with a string default: a discriminator's name -> its value."""
    return {
        name: f.default
        for name, f in model.model_fields.items()
        if get_origin(f.annotation) is Literal and isinstance(f.default, str)
    }


def _discriminator_name(members: list[Any], declared: str) -> str:
    """The key a discriminated union reads: as declared, or the Literal field its members share."""
    declared = declared.strip("'")
    if declared.isidentifier():
        return declared
    models = [m for m in (_unwrap(m)[0] for m in members) if isinstance(m, type) and issubclass(m, BaseModel)]
    shared = set.intersection(*(set(_literal_fields(m)) for m in models)) if models else set()
    return sorted(shared)[0] if shared else "type"


def _model_at(t: Any) -> Any:
    """The model a (possibly optional or annotated) type holds, when there is exactly one."""
    t, _ = _unwrap(t)
    if isinstance(t, type) and issubclass(t, BaseModel):
        return t
    models = [m for m in (_unwrap(m)[0] for m in _union_members(t)) if isinstance(m, type) and issubclass(m, BaseModel)]
    return models[0] if len(models) == 1 else None


def _walk(root: type[BaseModel], loc: tuple[int | str, ...]) -> tuple[Any, str]:
    """The type at ``loc`` under ``root`` and the path a person reads (``a.b[0].c``: union
    tags that pydantic puts in ``loc`` are left out)."""
    current: Any = root
    path = ""
    for part in loc:
        current, _ = _unwrap(current)
        members = _union_members(current)
        if members:
            tags = _tags(members)
            if isinstance(part, str) and part in tags:
                current = tags[part]
                continue
            models = [m for m in (_unwrap(m)[0] for m in members) if isinstance(m, type) and issubclass(m, BaseModel)]
            current = models[0] if len(models) == 1 else None
            current, _ = _unwrap(current)
        if isinstance(part, int):
            args = get_args(current)
            current = args[0] if args else None
            path += f"[{part}]"
        elif isinstance(current, type) and issubclass(current, BaseModel):
            field = current.model_fields.get(part)
            current = field.annotation if field is not None else None
            path += f".{part}" if path else part
        else:
            args = get_args(current)  # dict[str, X]: ``part`` is a key
            current = args[-1] if get_origin(current) is dict and args else None
            path += f".{part}" if path else part
    return current, path


def _short(value: Any, field: str = "") -> str:
    """The bad value as a person reads it: shortened, credentials masked, a secret field's
    value (an API key) not shown at all."""
    if field and SECRET_FIELD.search(field) and isinstance(value, str):
        return repr(MASK)
    text = redact(repr(value))
    return text if len(text) <= 80 else text[:77] + "..."


def format_validation_error(exc: ValidationError, root: type[BaseModel], source: str) -> str:
    """One line per problem: ``path: value V breaks rule: ...``, ``path: unknown key 'k' (did
    you mean 'key'?)``, ``path: required key is missing``. ``source`` heads the message
    (a file name, or e.g. ``invalid feature spec 'f.yaml'``)."""
    lines = []
    errors = exc.errors()
    for err in errors:
        loc = tuple(err["loc"])
        kind = err["type"]
        if kind == "too_short" and any(len(e["loc"]) > len(loc) and tuple(e["loc"][: len(loc)]) == loc for e in errors):
            continue  # "features is empty" only because its items failed: noise
        if kind == "extra_forbidden":
            owner = _model_at(_walk(root, loc[:-1])[0])
            _, path = _walk(root, loc)
            key = str(loc[-1])
            valid = sorted(owner.model_fields) if isinstance(owner, type) and issubclass(owner, BaseModel) else []
            hint = difflib.get_close_matches(key, valid, n=1)
            line = f"{path}: unknown key {key!r}"
            if hint:
                line += f" (did you mean {hint[0]!r}?)"
            elif valid:
                line += f"; valid keys: {', '.join(valid)}"
        elif kind in ("union_tag_invalid", "union_tag_not_found"):
            union, path = _walk(root, loc)
            members = _union_members(_unwrap(union)[0])
            tags = list(_tags(members))
            name = _discriminator_name(members, str(err.get("ctx", {}).get("discriminator", "")))
            if kind == "union_tag_not_found":
                line = f"{path}: missing key {name!r} (one of {', '.join(tags)})"
            else:
                tag = err.get("ctx", {}).get("tag", err.get("input"))
                hint = difflib.get_close_matches(str(tag), tags, n=1)
                line = f"{path}.{name}: value {_short(tag)} is not one of {', '.join(map(repr, tags))}"
                line += f" (did you mean {hint[0]!r}?)" if hint else ""
        elif kind == "missing":
            _, path = _walk(root, loc)
            line = f"{path}: required key is missing"
        else:
            _, path = _walk(root, loc)
            msg = err["msg"].removeprefix("Value error, ")
            value = err.get("input")
            if isinstance(value, Mapping):  # a model-level rule: the message names the values
                line = f"{path or '<root>'}: {redact(msg)}"
            else:
                line = f"{path or '<root>'}: value {_short(value, str(loc[-1]) if loc else '')} breaks rule: {msg}"
        lines.append(line)
    if len(lines) == 1:
        return f"{source}: {lines[0]}"
    return f"{source}: {len(lines)} problems:\n" + "\n".join(f"  - {line}" for line in lines)


def validate(model: type[M], data: Any, source: str) -> M:
    """``model.model_validate(data)``, or a :class:`ConfigError` from :func:`format_validation_error`."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: expected a mapping, got {type(data).__name__}")
    try:  # the validator itself: a model may override model_validate to call this function
        return model.__pydantic_validator__.validate_python(dict(data))
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, model, source)) from None


def load_config(model: type[M], source: str | os.PathLike[str] | Mapping[str, Any], name: str = "config") -> M:
    """Validate a YAML file (or an already-parsed mapping, called ``name`` in errors) against ``model``."""
    if isinstance(source, Mapping):
        return validate(model, source, name)
    path = Path(source)
    return validate(model, read_yaml(path), str(path))
