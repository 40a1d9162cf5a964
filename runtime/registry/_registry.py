"""MLflow model registry: log a packaged model as pyfunc, register it, move aliases, verify, load.

**Verification before anything runs.** MLflow's ``mlflow.pyfunc.load_model`` imports and runs
the model's logged code file (``python_model``) and reads ``MLmodel`` before any skewless code
could look at the weights. So every logged model gets an *artifact manifest*: the sha256 of
every file of the MLflow model directory (``MLmodel``, the code file, the requirements, the
input example, the packaged weights, state and their own manifest), stored as the run
artifact ``skewless/artifact-manifest.json``; the registered version's tag
``skewless.manifest_sha256`` records that manifest's sha256. :func:`verify` downloads the model
once, checks the tag against the manifest and every file against it (and that no unlisted file
is there), and only then does anything load it: skewless's own loader, the parity check's
``mlflow.pyfunc.load_model`` (from the verified copy), ``skewless models verify``. A
registered version without the tag, or whose manifest lists no files, is refused.

Plain ``mlflow.pyfunc.load_model("models:/...")`` outside skewless runs the code file without
this check: verify first (``skewless models verify <uri>``).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from runtime.errors import ArtifactIntegrityError, ModelNotFoundError, RegistryError
from runtime.redact import redact
from runtime.registry._lineage import Tag
from runtime.registry._package import MANIFEST, LoadedModel, load_model_dir, sha256_file
from runtime.registry._store import configure_mlflow, skewless_home

logger = logging.getLogger(__name__)

CHAMPION, CANDIDATE = "champion", "candidate"
_MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")
PYFUNC_ARTIFACT_KEY = "model_dir"
MANIFEST_TAG = Tag.MANIFEST_SHA256
ARTIFACT_MANIFEST = "skewless/artifact-manifest.json"  # a run artifact
# Written by MLflow into the model's artifacts when a version is registered (after the manifest
# was made): the model's name and version, data MLflow reads, never code it runs.
MLFLOW_ADDED = frozenset({"registered_model_meta"})


@dataclass(frozen=True)
class ModelRef:
    name: str
    version: str
    run_id: str | None
    tags: dict[str, str]

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


@dataclass(frozen=True)
class VerifiedModel:
    """A registered model downloaded once and checked file by file; load from ``root``."""

    ref: ModelRef | None
    root: Path  # the MLflow model directory (MLmodel, code, artifacts/)
    model_dir: Path  # the packaged skewless model inside it
    files: dict[str, str]  # relative path -> sha256, as checked


def input_signature(schema: pa.Schema) -> Any:
    """The MLflow signature of the raw input rows: one column per feature, nullable optional."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, Schema

    def dtype(t: pa.DataType) -> DataType:
        return DataType.string if pa.types.is_string(t) or pa.types.is_large_string(t) else DataType.double

    return ModelSignature(inputs=Schema([ColSpec(dtype(f.type), f.name, required=not f.nullable) for f in schema]))


def artifact_manifest(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root``, by relative path."""
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}


def default_requirements() -> list[str]:
    """The installed versions of what a skewless pyfunc needs (MLflow's ``pip_requirements``)."""
    from importlib import metadata

    reqs = []
    for dist in ("skewless", "torch", "pyarrow", "numpy", "safetensors", "mlflow"):
        try:
            reqs.append(f"{dist}=={metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            continue
    return reqs


def log_pyfunc_model(
    model_dir: Path, example: pa.Table | None, pip_requirements: list[str] | None = None
) -> tuple[str, str]:
    """Log ``model_dir`` as an MLflow pyfunc model in the active run, and its artifact manifest.

    Returns the model URI and the manifest's sha256 (for the version tag). ``example`` holds a
    few raw input rows (features only): MLflow stores them as the input example, and the
    signature comes from their schema (None for a model that does not take rows).
    """
    import mlflow

    info = mlflow.pyfunc.log_model(
        name="model",
        python_model=str(Path(__file__).with_name("_pyfunc_model.py")),
        artifacts={PYFUNC_ARTIFACT_KEY: str(model_dir)},
        signature=input_signature(example.schema) if example is not None else None,
        input_example=example.to_pandas() if example is not None else None,
        pip_requirements=pip_requirements if pip_requirements is not None else default_requirements(),
    )
    uri = str(info.model_uri)
    with tempfile.TemporaryDirectory(prefix="skewless-logged-") as tmp:
        root = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp))
        files = artifact_manifest(root)
    text = json.dumps({"model_uri": uri, "files": files}, indent=2, sort_keys=True)
    mlflow.log_text(text, ARTIFACT_MANIFEST)
    return uri, _sha256_text(text)


def _sha256_text(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def register(model_uri: str, name: str, tags: dict[str, str] | None = None) -> ModelRef:
    import mlflow

    mv = mlflow.register_model(model_uri, name, tags=tags)
    return ModelRef(name, str(mv.version), mv.run_id, dict(mv.tags or {}))


def set_alias(name: str, alias: str, version: str) -> None:
    """Point ``alias`` at ``version`` unconditionally, unrecorded: prefer
    :func:`~runtime.registry.move_alias`, which moves it only from where the caller expects
    and keeps a history. For aliases whose last writer may win (``candidate``)."""
    import mlflow

    mlflow.MlflowClient().set_registered_model_alias(name, alias, version)


def resolve(model_uri: str) -> ModelRef:
    """``models:/name@alias`` or ``models:/name/version`` -> the exact registered version."""
    import mlflow
    from mlflow.exceptions import MlflowException

    configure_mlflow()
    m = _MODEL_URI.match(model_uri)
    if not m:
        raise ModelNotFoundError(
            f"model URI {model_uri!r} is not of the form models:/<name>@<alias> or models:/<name>/<version>"
        )
    client = mlflow.MlflowClient()
    try:
        if m["alias"]:
            mv = client.get_model_version_by_alias(m["name"], m["alias"])
        else:
            mv = client.get_model_version(m["name"], m["version"])
    except MlflowException as exc:
        raise ModelNotFoundError(
            f"{model_uri}: not found in the registry at {redact(mlflow.get_tracking_uri())}: {exc.message}"
        ) from None
    return ModelRef(mv.name, str(mv.version), mv.run_id, dict(mv.tags or {}))


def current_champion(name: str) -> ModelRef | None:
    try:
        return resolve(f"models:/{name}@{CHAMPION}")
    except ModelNotFoundError:
        return None


def _local(model_uri: str) -> Path:
    from urllib.parse import unquote, urlparse

    return Path(unquote(urlparse(model_uri).path)) if model_uri.startswith("file:") else Path(model_uri)


def verify(model_uri: str, dst: str | Path) -> VerifiedModel:
    """Download a registered model once, into ``dst``, and check every file against its
    artifact manifest.

    A local packaged model directory is checked in place against its own ``manifest.json``
    (every file listed and matching). Raises :class:`ArtifactIntegrityError` naming the first
    file that does not match, a file that is not listed, or a version that has no manifest.
    """
    import mlflow

    from runtime.registry._package import verify_model_dir

    if not model_uri.startswith("models:/"):
        if model_uri.startswith("runs:/"):
            raise RegistryError(f"{model_uri}: register the model and verify models:/<name>/<version>")
        path = _local(model_uri)
        manifest = verify_model_dir(path)
        return VerifiedModel(None, path, path, dict(manifest["files"]))
    ref = resolve(model_uri)
    expected = ref.tags.get(MANIFEST_TAG)
    if not expected or not ref.run_id:
        raise ArtifactIntegrityError(
            f"{model_uri} (version {ref.version}) has no {MANIFEST_TAG} tag: it was not registered by skewless "
            "(or the tag was removed), so its files cannot be verified; refusing to load it"
        )
    target = Path(dst)
    try:
        text = mlflow.artifacts.load_text(f"runs:/{ref.run_id}/{ARTIFACT_MANIFEST}")
        source = mlflow.MlflowClient().get_model_version(ref.name, ref.version).source
        root = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(target)))
    except Exception as exc:  # MLflow raises several types for missing artifacts
        raise RegistryError(
            f"{model_uri}: cannot download the model or its artifact manifest: {redact(str(exc))}"
        ) from exc
    if _sha256_text(text) != expected:
        raise ArtifactIntegrityError(
            f"{model_uri}: the artifact manifest's sha256 {_sha256_text(text)[:16]} differs from the registry's "
            f"{expected[:16]}; the artifacts were modified after registration"
        )
    files: dict[str, str] = json.loads(text).get("files") or {}
    if not files:
        raise ArtifactIntegrityError(f"{model_uri}: the artifact manifest lists no files; refusing to load it")
    actual = artifact_manifest(root)
    for name, digest in files.items():
        if name not in actual:
            raise ArtifactIntegrityError(f"{model_uri}: {name} is listed in the artifact manifest but missing")
        if actual[name] != digest:
            raise ArtifactIntegrityError(
                f"{model_uri}: {name} has sha256 {actual[name][:16]}, the manifest says {digest[:16]}; "
                "the artifact was modified after registration"
            )
    unlisted = sorted(set(actual) - set(files) - MLFLOW_ADDED)
    if unlisted:
        raise ArtifactIntegrityError(f"{model_uri}: files not in the artifact manifest: {unlisted}; refusing to load")
    inner = [p.parent for p in (root / "artifacts").glob(f"*/{MANIFEST}")]
    if len(inner) != 1:
        raise RegistryError(f"{model_uri}: the artifact holds no skewless model (no artifacts/*/{MANIFEST})")
    return VerifiedModel(ref, root, inner[0], files)


def download(model_uri: str) -> tuple[ModelRef | None, Path]:
    """A registered model's packaged directory, verified (:func:`verify`), kept in
    ``$SKEWLESS_HOME/models/<name>/<version>`` (fetched again each time); a local directory
    passes through (its own manifest is checked when it is loaded)."""
    if not model_uri.startswith(("models:/", "runs:/")):
        return None, _local(model_uri)
    ref = resolve(model_uri)
    target = skewless_home() / "models" / ref.name / ref.version
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    verified = verify(ref.uri, target)
    return verified.ref, verified.model_dir


def load(model_uri: str, allow_fingerprint_mismatch: bool = False) -> tuple[ModelRef | None, LoadedModel]:
    """Resolve, download, verify and load a model for prediction from raw rows (the download
    is removed once loaded: the model holds everything it needs)."""
    if not model_uri.startswith(("models:/", "runs:/")):
        return None, load_model_dir(_local(model_uri), allow_fingerprint_mismatch=allow_fingerprint_mismatch)
    with tempfile.TemporaryDirectory(prefix="skewless-model-") as tmp:
        verified = verify(model_uri, tmp)
        return verified.ref, load_model_dir(verified.model_dir, allow_fingerprint_mismatch=allow_fingerprint_mismatch)


def load_pyfunc(model_uri: str) -> Any:
    """MLflow's own pyfunc loader, run on a copy :func:`verify` checked first (so the model's
    code file runs only once it matches what was registered)."""
    import mlflow

    with tempfile.TemporaryDirectory(prefix="skewless-model-") as tmp:
        return mlflow.pyfunc.load_model(str(verify(model_uri, tmp).root))
