"""The packaged model directory: every file in the manifest, and nothing else, or no load."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest
import torch

from runtime.errors import ArtifactIntegrityError
from runtime.models import MLPConfig, build_model
from runtime.preprocessing import FeatureSpec, fit
from runtime.registry import inference_code_fingerprint, load_model_dir, model_json, verify_model_dir, write_model_dir
from runtime.tasks import task_for


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    spec = FeatureSpec.model_validate(
        {"label": {"name": "y", "task": "binary"}, "features": [{"name": "x", "type": "numeric"}]}
    )
    prep = fit(spec, pa.table({"x": [1.0, 2.0, 3.0], "y": [0, 1, 1]}))
    config = model_json(MLPConfig(hidden=[4]), prep, task_for("binary"))
    torch.manual_seed(0)
    return write_model_dir(tmp_path / "m", build_model(config).state_dict(), config, prep)


def test_a_packaged_model_loads_and_its_manifest_covers_its_files(model_dir: Path) -> None:
    manifest = verify_model_dir(model_dir)
    assert set(manifest["files"]) == {"weights.safetensors", "model.json", "preprocessor.json"}
    assert manifest["code_fingerprint"] == inference_code_fingerprint(
        json.loads((model_dir / "model.json").read_text())
    )
    assert set(manifest["preprocessing"]) == {"fingerprint", "preprocessing_code", "spec", "state"}
    assert load_model_dir(model_dir).predict_records([{"x": 2.0}]).values[0] in (0, 1)


def test_a_manifest_listing_no_files_is_refused(model_dir: Path) -> None:
    manifest = json.loads((model_dir / "manifest.json").read_text())
    manifest["files"] = {}
    (model_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactIntegrityError, match="lists no weights"):
        load_model_dir(model_dir)


def test_a_file_the_manifest_does_not_list_is_refused(model_dir: Path) -> None:
    (model_dir / "extra.py").write_text("import os\n")
    with pytest.raises(ArtifactIntegrityError, match=r"files not in the manifest: \['extra.py'\]"):
        load_model_dir(model_dir)


def test_the_inference_code_covers_the_path_from_row_to_prediction(model_dir: Path) -> None:
    from runtime.registry._package import inference_code_files

    names = {
        p.as_posix().split("/runtime/", 1)[1]
        for p in inference_code_files(json.loads((model_dir / "model.json").read_text()))
    }
    assert {"tasks.py", "models/__init__.py", "models/_base.py", "models/_mlp.py", "registry/_package.py"} <= names
    assert "preprocessing/_transform.py" in names and "models/_transformer.py" not in names
    lm = inference_code_files({"architecture": "char_lm", "input_dim": 256, "output_dim": 256})
    assert not any("preprocessing" in str(p) for p in lm)  # the LM takes bytes, not features


# ------------------------------------------------------------------ the device a model runs on


def test_a_loaded_model_names_its_device_and_refuses_reduced_precision_on_the_cpu(model_dir: Path) -> None:
    from runtime.errors import RegistryError

    model = load_model_dir(model_dir)
    assert model.device == "cpu" and model.precision == "fp32"
    fp32 = model.parameter_bytes()
    assert fp32 == sum(p.numel() * 4 for p in model.module.parameters())
    assert model.parameter_bytes("bf16") * 2 == fp32
    with pytest.raises(RegistryError, match="precision 'bf16' needs a GPU .device is 'cpu'.; use precision fp32"):
        model.to("cpu", "bf16")
    with pytest.raises(RegistryError, match="precision 'int8' is not one of"):
        model.to("cpu", "int8")
    assert model.to("cpu").device == "cpu"


def test_the_staged_path_reuses_one_buffer_and_runs_big_batches_in_calls(model_dir: Path) -> None:
    """What a GPU replica runs (a reusable host buffer, calls of rows_per_call rows), on the
    CPU with an unpinned buffer: the same predictions as the plain path, one buffer reused."""
    import numpy as np

    from runtime.registry import HostStaging

    model = load_model_dir(model_dir)
    rng = np.random.default_rng(0)
    table = pa.table({"x": rng.normal(size=1000)})
    want = model.predict_table(table).probabilities
    model._device, model._dtype, model.rows_per_call = torch.device("cpu"), torch.float32, 300
    model._staging = staging = HostStaging(pin=False)
    calls: list[int] = []
    module = model.module
    model.module = lambda x: calls.append(x.shape[0]) or module(x)  # type: ignore[assignment]
    got = model.predict_table(table).probabilities
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert calls == [300, 300, 300, 100] and staging.allocations == 1 and staging.buffer.shape[0] == 300
    model.predict_table(table.slice(0, 50))
    assert staging.allocations == 1  # smaller batches reuse it
