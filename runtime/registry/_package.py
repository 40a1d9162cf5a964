"""The model artifact: weights, architecture, fitted preprocessing, and a sha256 manifest.

Layout of a packaged model directory (no pickle anywhere)::

    weights.safetensors   the state dict
    model.json            architecture, hyperparameters, task, classes, target scaling
    preprocessor.json     the fitted preprocessing state (FittedPreprocessor.to_json())
    manifest.json         sha256 of each file above + the preprocessing fingerprints

:func:`load_model_dir` verifies every sha256 before reading a byte of the weights, and
refuses a preprocessing *code* fingerprint that differs from the installed package's.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from runtime.errors import ArtifactIntegrityError, FingerprintMismatchError, RegistryError
from runtime.preprocessing import FittedPreprocessor, code_fingerprint

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
WEIGHTS, MODEL_JSON, PREPROCESSOR_JSON, MANIFEST = (
    "weights.safetensors",
    "model.json",
    "preprocessor.json",
    "manifest.json",
)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def write_model_dir(
    directory: str | os.PathLike[str],
    state_dict: dict[str, Any],
    model_config: dict[str, Any],
    preprocessor: FittedPreprocessor,
) -> Path:
    """Write a packaged model directory and its manifest."""
    from safetensors.torch import save_file

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    save_file(tensors, str(out / WEIGHTS))
    (out / MODEL_JSON).write_text(json.dumps(model_config, indent=2, sort_keys=True))
    (out / PREPROCESSOR_JSON).write_text(preprocessor.to_json())
    manifest = {
        "format_version": FORMAT_VERSION,
        "files": {name: sha256_file(out / name) for name in (WEIGHTS, MODEL_JSON, PREPROCESSOR_JSON)},
        "preprocessing_fingerprint": preprocessor.fingerprint,
        "preprocessing_code_fingerprint": preprocessor.code_fingerprint,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return out


@dataclass(frozen=True)
class Predictions:
    """Model outputs for a batch of rows.

    ``values`` are the predicted labels (classification) or values (regression);
    ``probabilities`` is ``(n, len(classes))`` float32 for classification, else None.
    """

    values: list[Any]
    probabilities: np.ndarray | None
    classes: list[Any] | None

    def __len__(self) -> int:
        return len(self.values)

    def slice(self, start: int, stop: int) -> Predictions:
        """Rows ``start:stop`` (to answer each request of a batched model call)."""
        probs = None if self.probabilities is None else self.probabilities[start:stop]
        return Predictions(self.values[start:stop], probs, self.classes)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"predictions": self.values}
        if self.probabilities is not None:
            out["probabilities"] = self.probabilities.tolist()
            out["classes"] = self.classes
        return out


class LoadedModel:
    """A verified model with its fitted preprocessing, ready to predict from raw rows."""

    def __init__(
        self,
        directory: Path,
        model_config: dict[str, Any],
        preprocessor: FittedPreprocessor,
        module: Any,
        manifest: dict[str, Any],
    ) -> None:
        self.directory = directory
        self.config = model_config
        self.preprocessor = preprocessor
        self.module = module
        self.manifest = manifest
        self.task: str = model_config["task"]
        self.classes: list[Any] | None = model_config.get("classes")

    def _forward(self, features: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            out = self.module(torch.from_numpy(features))
        result: np.ndarray = out.numpy()
        return result

    def predict_features(self, features: np.ndarray) -> Predictions:
        """Predict from an already-transformed float32 feature matrix."""
        out = self._forward(features)
        if self.task == "regression":
            scale = self.config.get("target_scale", [0.0, 1.0])
            values = (out[:, 0].astype(np.float64) * scale[1] + scale[0]).tolist()
            return Predictions(values, None, None)
        assert self.classes is not None  # written by training for classification
        if self.task == "binary":
            p1 = 1.0 / (1.0 + np.exp(-out[:, 0].astype(np.float64)))
            probs = np.stack([1.0 - p1, p1], axis=1).astype(np.float32)
        else:
            shifted = out.astype(np.float64) - out.max(axis=1, keepdims=True)
            e = np.exp(shifted)
            probs = (e / e.sum(axis=1, keepdims=True)).astype(np.float32)
        idx = probs.argmax(axis=1)
        return Predictions([self.classes[i] for i in idx], probs, list(self.classes))

    def predict_table(self, table: pa.Table) -> Predictions:
        """Raw rows (an Arrow table) -> the shared preprocessing -> the model."""
        return self.predict_features(self.preprocessor.transform(table))

    def predict_records(self, records: list[dict[str, Any]]) -> Predictions:
        """Raw JSON-like rows -> Arrow -> the same ``transform`` -> the model."""
        return self.predict_table(self.preprocessor.records_to_table(records))


def verify_model_dir(directory: Path) -> dict[str, Any]:
    """Check every file's sha256 against the manifest; returns the manifest."""
    manifest_path = directory / MANIFEST
    if not manifest_path.exists():
        raise ArtifactIntegrityError(f"{directory}: no {MANIFEST}; not a skewless model directory")
    manifest: dict[str, Any] = json.loads(manifest_path.read_text())
    if manifest.get("format_version") != FORMAT_VERSION:
        raise RegistryError(
            f"{directory}: model format_version {manifest.get('format_version')!r} is not "
            f"{FORMAT_VERSION}; upgrade skewless to load it"
        )
    for name, expected in manifest["files"].items():
        path = directory / name
        if not path.exists():
            raise ArtifactIntegrityError(f"{path}: listed in the manifest but missing")
        actual = sha256_file(path)
        if actual != expected:
            raise ArtifactIntegrityError(
                f"{path}: sha256 {actual[:16]} does not match the manifest's {expected[:16]}; "
                "the artifact was modified or corrupted after training"
            )
    return manifest


def load_model_dir(directory: str | os.PathLike[str], allow_fingerprint_mismatch: bool = False) -> LoadedModel:
    """Verify, check the preprocessing code fingerprint, and load without pickle."""
    from safetensors.torch import load_file

    from runtime.models import build_model

    root = Path(directory)
    manifest = verify_model_dir(root)
    expected = manifest["preprocessing_code_fingerprint"]
    actual = code_fingerprint()
    if expected != actual:
        err = FingerprintMismatchError(expected, actual)
        if not allow_fingerprint_mismatch:
            raise err
        logger.warning("LOADING ANYWAY (allow_fingerprint_mismatch=true): %s", err)
    preprocessor = FittedPreprocessor.from_json((root / PREPROCESSOR_JSON).read_text())
    if preprocessor.fingerprint != manifest["preprocessing_fingerprint"] and not allow_fingerprint_mismatch:
        raise FingerprintMismatchError(
            manifest["preprocessing_fingerprint"], preprocessor.fingerprint, what="fitted preprocessing"
        )
    config = json.loads((root / MODEL_JSON).read_text())
    module = build_model(config)
    module.load_state_dict(load_file(str(root / WEIGHTS)), strict=True)
    module.eval()
    return LoadedModel(root, config, preprocessor, module, manifest)
