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
