"""The model artifact: weights, architecture, fitted preprocessing, and a sha256 manifest.

Layout of a packaged model directory (no pickle anywhere)::

    weights.safetensors   the state dict
    model.json            architecture, hyperparameters, widths, task, classes, target scaling
    preprocessor.json     the fitted preprocessing state (FittedPreprocessor.to_json()); absent
                          for a model without tabular preprocessing (the byte-level LM)
    manifest.json         sha256 of each file above, the code fingerprint of everything between
                          a raw row and a prediction, and the preprocessing's parts

:func:`load_model_dir` verifies every sha256 (and that no other file is there) before reading
a byte of the weights, and refuses a model whose inference code fingerprint differs from the
installed code's: the preprocessing package, :mod:`runtime.tasks` (the output head and the
post-processing) and the model's architecture module, as normalized source (a comment or
docstring edit does not count; a code change does).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from runtime.errors import ArtifactIntegrityError, FingerprintMismatchError, RegistryError
from runtime.models import Architecture, ModelIO, architecture_of, build_model
from runtime.preprocessing import FittedPreprocessor, package_files, source_fingerprint
from runtime.tasks import Head, Predictions, Task, task_for

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2
PRECISION_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
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


def inference_code_files(model_config: dict[str, Any]) -> list[Path]:
    """The source files that run between a raw row (an Arrow table) and this model's prediction:
    the preprocessing package (for a model over features), the model's architecture and the
    registry that builds it, the task's head and post-processing, and this module (the loaded
    model's predict path). What turns a request body or a DataFrame into that Arrow table (the
    Serve codec, the pyfunc) is not in it: the parity check holds those to the same answers."""
    import runtime.models
    import runtime.preprocessing
    import runtime.tasks

    architecture = architecture_of(model_config)
    files = [
        Path(__file__),
        Path(runtime.tasks.__file__),
        Path(runtime.models.__file__),
        *type(architecture).source_files(),
    ]
    if architecture.inputs == "features":  # a model over the shared preprocessing
        files += package_files(Path(runtime.preprocessing.__file__).parent)
    return files


def inference_code_fingerprint(model_config: dict[str, Any]) -> str:
    """The normalized-source fingerprint of :func:`inference_code_files`, as installed here."""
    return source_fingerprint(inference_code_files(model_config))


def model_json(
    architecture: Architecture,
    preprocessor: FittedPreprocessor,
    task: Task,
    target_scale: tuple[float, float] = (0.0, 1.0),
) -> dict[str, Any]:
    """The ``model.json`` of a model over ``preprocessor``'s features: the architecture's
    hyperparameters, the widths, and what the task's head means (classes, target scaling)."""
    classes = preprocessor.classes
    return architecture.artifact_config(
        ModelIO(preprocessor.output_dim, task.output_dim(classes)),
        task=task.name,
        classes=classes,
        target_scale=list(target_scale),
        feature_names=preprocessor.feature_names,
    )


def write_model_dir(
    directory: str | os.PathLike[str],
    state_dict: dict[str, Any],
    model_config: dict[str, Any],
    preprocessor: FittedPreprocessor | None,
) -> Path:
    """Write a packaged model directory and its manifest. The weights are loaded into the model
    ``model_config`` builds first (so they fit it, strictly) and saved from it (tied weights once)."""
    from safetensors.torch import save_model

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    module = build_model(model_config)
    module.load_state_dict({k: v.detach().cpu() for k, v in state_dict.items()}, strict=True)
    save_model(module, str(out / WEIGHTS))
    (out / MODEL_JSON).write_text(json.dumps(model_config, indent=2, sort_keys=True))
    names = [WEIGHTS, MODEL_JSON]
    if preprocessor is not None:
        (out / PREPROCESSOR_JSON).write_text(preprocessor.to_json())
        names.append(PREPROCESSOR_JSON)
    manifest = {
        "format_version": FORMAT_VERSION,
        "files": {name: sha256_file(out / name) for name in names},
        "code_fingerprint": inference_code_fingerprint(model_config),
        "preprocessing": None
        if preprocessor is None
        else {"fingerprint": preprocessor.fingerprint, **preprocessor.fingerprints},
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return out


def add_model_file(directory: str | os.PathLike[str], name: str, text: str) -> Path:
    """Add a file to a packaged model directory and list it in the manifest (so it is verified
    with the rest): for what is computed from the packaged model itself, such as its
    monitoring reference. Refuses to replace a file already listed."""
    out = Path(directory)
    manifest_path = out / MANIFEST
    manifest = json.loads(manifest_path.read_text())
    if name in manifest["files"] or name == MANIFEST or "/" in name:
        raise RegistryError(f"{out}: {name!r} is already in the model (or not a plain file name); not replacing it")
    (out / name).write_text(text)
    manifest["files"][name] = sha256_file(out / name)
    manifest_path.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return out / name


class HostStaging:
    """A reusable host buffer a batch goes through on its way to a GPU: page-locked
    (``pin``), so the copy to the device is a DMA that does not block the host. It grows to
    the largest batch seen and is reused after that (pinning is slow: once, not per batch)."""

    def __init__(self, pin: bool) -> None:
        self.pin = pin
        self.buffer: Any = None
        self.allocations = 0

    def to_device(self, features: np.ndarray, device: Any) -> Any:
        """``features`` (float32, rows first) as a tensor on ``device``; the copy to a GPU is
        asynchronous: keep the buffer untouched until the stream has consumed it."""
        import torch

        rows, shape = features.shape[0], features.shape[1:]
        buffer = self.buffer
        if buffer is None or buffer.shape[0] < rows or tuple(buffer.shape[1:]) != shape:
            buffer = self.buffer = torch.empty((max(rows, 1), *shape), dtype=torch.float32, pin_memory=self.pin)
            self.allocations += 1
        host = buffer[:rows]
        host.numpy()[...] = features  # the one host copy
        return host.to(device, non_blocking=self.pin)


class LoadedModel:
    """A verified model (with its fitted preprocessing, when it has one), ready to predict.

    It predicts on the CPU in float32 until :meth:`to` moves it: on a GPU, preprocessing stays
    on the CPU (Arrow -> NumPy) and each batch is copied into a reusable pinned buffer, then to
    the device without blocking; outputs come back as float32 NumPy.
    """

    def __init__(
        self,
        directory: Path,
        model_config: dict[str, Any],
        preprocessor: FittedPreprocessor | None,
        module: Any,
        manifest: dict[str, Any],
    ) -> None:
        import threading

        self.directory = directory
        self.config = model_config
        self.preprocessor = preprocessor
        self.module = module
        self.manifest = manifest
        self.task: Task | None = task_for(model_config["task"]) if model_config.get("task") else None
        self.head = Head.from_config(model_config)
        self.classes: list[Any] | None = model_config.get("classes")
        self.precision = "fp32"
        self.rows_per_call = 16384
        self._device: Any = None  # None: the CPU
        self._dtype: Any = None
        self._staging = HostStaging(pin=False)
        self._lock = threading.Lock()  # one forward at a time holds the pinned buffer

    @property
    def device(self) -> str:
        """Where the parameters are, as torch names it (``cpu``, ``cuda:0``)."""
        first = next(iter(self.module.parameters()), None)
        return str(first.device) if first is not None else "cpu"

    def parameter_bytes(self, precision: str | None = None) -> int:
        """Parameters and buffers, in bytes at ``precision`` (default: as they are now)."""
        size = PRECISION_BYTES.get(precision or "", 0)
        tensors = [*self.module.parameters(), *self.module.buffers()]
        return sum(t.numel() * (size if size and t.is_floating_point() else t.element_size()) for t in tensors)

    def to(self, device: str, precision: str = "fp32", rows_per_call: int = 16384) -> LoadedModel:
        """Move the weights to ``device`` (``cpu``, ``cuda``, ``cuda:N``) in ``precision``
        (``fp32``, ``bf16``, ``fp16``; reduced precision only on a GPU). On a GPU a batch
        runs in calls of at most ``rows_per_call`` rows, which bounds the device memory a
        bulk request takes and the pinned buffer. Returns self."""
        import torch

        if rows_per_call < 1:
            raise RegistryError(f"rows_per_call ({rows_per_call}) must be >= 1")

        if precision not in PRECISION_BYTES:
            raise RegistryError(f"precision {precision!r} is not one of {sorted(PRECISION_BYTES)}")
        target = torch.device(device)
        if target.type == "cuda" and target.index is None:
            target = torch.device("cuda", torch.cuda.current_device())
        if target.type != "cuda" and precision != "fp32":
            raise RegistryError(
                f"precision {precision!r} needs a GPU (device is {device!r}); use precision fp32 on the CPU"
            )
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
        with self._lock:
            self.module.to(device=target, dtype=dtype)
            self._device = target if target.type == "cuda" else None
            self._dtype = dtype
            self.precision = precision
            self.rows_per_call = rows_per_call
            self._staging = HostStaging(pin=target.type == "cuda")
        return self

    def _forward(self, features: np.ndarray) -> np.ndarray:
        import torch

        if self._device is None:
            with torch.inference_mode():
                out = self.module(torch.from_numpy(features))
            result: np.ndarray = out.numpy()
            return result
        parts = []
        with self._lock, torch.inference_mode():
            for start in range(0, max(features.shape[0], 1), self.rows_per_call):
                x = self._staging.to_device(features[start : start + self.rows_per_call], self._device)
                out = self.module(x if self._dtype == torch.float32 else x.to(self._dtype))
                # .cpu() waits for the stream: the staging buffer is free again after it
                parts.append(out.float().cpu().numpy())
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _tabular(self) -> tuple[Task, FittedPreprocessor]:
        if self.task is None or self.preprocessor is None:
            raise RegistryError(
                f"{self.directory}: a {self.config.get('architecture')!r} model has no feature preprocessing; "
                "it does not predict from rows"
            )
        return self.task, self.preprocessor

    def predict_features(self, features: np.ndarray) -> Predictions:
        """Predict from an already-transformed float32 feature matrix."""
        task, _ = self._tabular()
        return task.predict(self._forward(features), self.head)

    def predict_table(self, table: pa.Table) -> Predictions:
        """Raw rows (an Arrow table) -> the shared preprocessing -> the model."""
        _, prep = self._tabular()
        return self.predict_features(prep.transform(table))

    def predict_records(self, records: list[dict[str, Any]]) -> Predictions:
        """Raw JSON-like rows -> Arrow -> the same ``transform`` -> the model."""
        _, prep = self._tabular()
        return self.predict_table(prep.records_to_table(records))


def verify_model_dir(directory: Path) -> dict[str, Any]:
    """Check every file's sha256 against the manifest, and that the manifest lists every file
    there; returns the manifest."""
    manifest_path = directory / MANIFEST
    if not manifest_path.exists():
        raise ArtifactIntegrityError(f"{directory}: no {MANIFEST}; not a skewless model directory")
    try:
        manifest: dict[str, Any] = json.loads(manifest_path.read_text())
    except ValueError as exc:
        raise ArtifactIntegrityError(f"{manifest_path}: not valid JSON ({exc})") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise RegistryError(
            f"{directory}: model format_version {manifest.get('format_version')!r} is not {FORMAT_VERSION} "
            "(models packaged before the normalized code fingerprint); retrain it with this skewless"
        )
    files = manifest.get("files") or {}
    if MODEL_JSON not in files or WEIGHTS not in files:
        raise ArtifactIntegrityError(f"{manifest_path}: lists no weights and model.json; refusing to load")
    present = {p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file()}
    unlisted = sorted(present - set(files) - {MANIFEST})
    if unlisted:
        raise ArtifactIntegrityError(f"{directory}: files not in the manifest: {unlisted}; refusing to load")
    for name, expected in files.items():
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
    """Verify, check the inference code fingerprint, and load without pickle."""
    from safetensors.torch import load_model

    root = Path(directory)
    manifest = verify_model_dir(root)
    config = json.loads((root / MODEL_JSON).read_text())
    expected = manifest["code_fingerprint"]
    actual = inference_code_fingerprint(config)
    if expected != actual:
        err = FingerprintMismatchError(expected, actual, what="inference code")
        if not allow_fingerprint_mismatch:
            raise err
        logger.warning("LOADING ANYWAY (allow_fingerprint_mismatch=true): %s", err)
    preprocessor = None
    if (root / PREPROCESSOR_JSON).exists():
        preprocessor = FittedPreprocessor.from_json((root / PREPROCESSOR_JSON).read_text())
        recorded = (manifest.get("preprocessing") or {}).get("fingerprint")
        if preprocessor.fingerprint != recorded and not allow_fingerprint_mismatch:
            raise FingerprintMismatchError(str(recorded), preprocessor.fingerprint, what="fitted preprocessing")
    module = build_model(config)
    load_model(module, str(root / WEIGHTS), strict=True)
    module.eval()
    return LoadedModel(root, config, preprocessor, module, manifest)
