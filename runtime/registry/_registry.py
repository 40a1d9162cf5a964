"""MLflow model registry: log a packaged model as pyfunc, register it, move aliases, load it."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from runtime.errors import ArtifactIntegrityError, ModelNotFoundError, RegistryError
from runtime.registry._package import MANIFEST, LoadedModel, load_model_dir, sha256_file
from runtime.registry._store import configure_mlflow

logger = logging.getLogger(__name__)

CHAMPION, CANDIDATE = "champion", "candidate"
_MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")
PYFUNC_ARTIFACT_KEY = "model_dir"
MANIFEST_TAG = "skewless.manifest_sha256"


@dataclass(frozen=True)
class ModelRef:
    name: str
    version: str
    run_id: str | None
    tags: dict[str, str]

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def input_signature(schema: pa.Schema) -> Any:
    """The MLflow signature of the raw input rows: one column per feature, nullable optional."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, Schema

    def dtype(t: pa.DataType) -> DataType:
        return DataType.string if pa.types.is_string(t) or pa.types.is_large_string(t) else DataType.double

    return ModelSignature(inputs=Schema([ColSpec(dtype(f.type), f.name, required=not f.nullable) for f in schema]))


def log_pyfunc_model(model_dir: Path, example: pa.Table, pip_requirements: list[str]) -> str:
    """Log ``model_dir`` as an MLflow pyfunc model in the active run; returns its model URI.

    ``example`` holds a few raw input rows (features only): MLflow stores them as the input
    example, and the signature comes from their schema.
    """
    import mlflow

    info = mlflow.pyfunc.log_model(
        name="model",
        python_model=str(Path(__file__).with_name("_pyfunc_model.py")),
        artifacts={PYFUNC_ARTIFACT_KEY: str(model_dir)},
        signature=input_signature(example.schema),
        input_example=example.to_pandas(),
        pip_requirements=pip_requirements,
    )
    return str(info.model_uri)


def register(model_uri: str, name: str, tags: dict[str, str] | None = None) -> ModelRef:
    import mlflow

    mv = mlflow.register_model(model_uri, name, tags=tags)
    return ModelRef(name, str(mv.version), mv.run_id, dict(mv.tags or {}))


def set_alias(name: str, alias: str, version: str) -> None:
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
            f"{model_uri}: not found in the registry at {mlflow.get_tracking_uri()}: {exc.message}"
        ) from None
    return ModelRef(mv.name, str(mv.version), mv.run_id, dict(mv.tags or {}))


def current_champion(name: str) -> ModelRef | None:
    try:
        return resolve(f"models:/{name}@{CHAMPION}")
    except ModelNotFoundError:
        return None


def download(model_uri: str) -> tuple[ModelRef | None, Path]:
    """Download a registered model's packaged directory; a local directory passes through."""
    import mlflow

    if not model_uri.startswith(("models:/", "runs:/")):
        from urllib.parse import unquote, urlparse

        path = Path(unquote(urlparse(model_uri).path)) if model_uri.startswith("file:") else Path(model_uri)
        return None, path
    ref = resolve(model_uri) if model_uri.startswith("models:/") else None
    src = ref.uri if ref else model_uri
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=src))
    except Exception as exc:  # MLflow raises several types for missing artifacts
        raise RegistryError(f"{model_uri}: cannot download the model's artifacts: {exc}") from exc
    inner = local / "artifacts" / PYFUNC_ARTIFACT_KEY
    return ref, (inner if inner.exists() else _find_model_dir(local, model_uri))


def _find_model_dir(root: Path, model_uri: str) -> Path:
    for manifest in root.rglob("manifest.json"):
        return manifest.parent
    raise RegistryError(f"{model_uri}: the artifact holds no skewless model (no manifest.json)")


def load(model_uri: str, allow_fingerprint_mismatch: bool = False) -> tuple[ModelRef | None, LoadedModel]:
    """Resolve, download, verify and load a model for prediction from raw rows.

    For a registered version the manifest's own sha256 is checked against the one recorded
    in the registry at registration, so a manifest rewritten to match altered files fails.
    """
    ref, path = download(model_uri)
    expected = ref.tags.get(MANIFEST_TAG) if ref else None
    if expected:
        actual = sha256_file(path / MANIFEST)
        if actual != expected:
            raise ArtifactIntegrityError(
                f"{model_uri}: manifest sha256 {actual[:16]} differs from the registry's {expected[:16]}; "
                "the artifact was modified after registration"
            )
    return ref, load_model_dir(path, allow_fingerprint_mismatch=allow_fingerprint_mismatch)
