from __future__ import annotations

import pytest

from runtime.config import ServeAppArgs, load_config
from runtime.errors import ConfigError
from runtime.training import TrainJobConfig

BASE = {"data": {"path": "/tmp/x.parquet"}, "features": "f.yaml", "registry": {"model_name": "m"}}


def test_defaults_and_expansion(monkeypatch):
    monkeypatch.delenv("SKEWLESS_HOME", raising=False)
    cfg = load_config(TrainJobConfig, {**BASE, "data": {"path": "${SKEWLESS_HOME}/d.parquet"}})
    assert cfg.data.path.endswith("/.skewless/d.parquet") and not cfg.data.path.startswith("$")
    assert cfg.training.num_workers == 2 and cfg.optimizer.name == "adamw"


def test_unknown_key_did_you_mean():
    with pytest.raises(ConfigError) as exc:
        load_config(TrainJobConfig, {**BASE, "training": {"epocs": 3}})
    assert "training.epocs: unknown key 'epocs' (did you mean 'epochs'?)" in str(exc.value)


def test_wrong_type_and_impossible_values_name_field_and_value():
    with pytest.raises(ConfigError) as exc:
        load_config(TrainJobConfig, {**BASE, "training": {"epochs": "many", "batch_size": 0}})
    msg = str(exc.value)
    assert "training.epochs: value 'many' breaks rule" in msg and "training.batch_size: value 0 breaks rule" in msg
    with pytest.raises(ConfigError, match=r"batch_size \(1\) must be >= num_workers \(4\)"):
        load_config(TrainJobConfig, {**BASE, "training": {"batch_size": 1, "num_workers": 4}})


def test_missing_required_and_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="registry: required key is missing"):
        load_config(TrainJobConfig, {"data": {"path": "x"}, "features": "f"})
    with pytest.raises(ConfigError, match="cannot be read"):
        load_config(TrainJobConfig, tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(TrainJobConfig, bad)


def test_serve_args():
    assert load_config(ServeAppArgs, {"model_uri": "models:/m@champion"}).max_instances == 10_000
    with pytest.raises(ConfigError, match="model_uri"):
        load_config(ServeAppArgs, {"model_uri": "champion"})
    with pytest.raises(ConfigError, match="did you mean 'model_uri'"):
        load_config(ServeAppArgs, {"model_url": "models:/m@champion"})


def test_unplaceable_jobs_are_refused_before_ray_work() -> None:
    from runtime.connect import check_placeable

    cfg = load_config(TrainJobConfig, {**BASE, "training": {"num_workers": 4, "use_gpu": True}})
    with pytest.raises(ConfigError, match=r"use_gpu = true needs 4 GPU\(s\).*the cluster has 0"):
        check_placeable(cfg.training, {"CPU": 8.0})
    cfg = load_config(TrainJobConfig, {**BASE, "training": {"num_workers": 16}})
    with pytest.raises(
        ConfigError, match=r"num_workers \(16\) x cpus_per_worker \(1\) = 16 CPUs, but the cluster has 8"
    ):
        check_placeable(cfg.training, {"CPU": 8.0})
    check_placeable(load_config(TrainJobConfig, BASE).training, {"CPU": 8.0})
    # two workers sharing one GPU (gpus_per_worker 0.5) fit a one-GPU node (found on an H200)
    halves = {"num_workers": 2, "use_gpu": True, "gpus_per_worker": 0.5}
    check_placeable(load_config(TrainJobConfig, {**BASE, "training": halves}).training, {"CPU": 8.0, "GPU": 1.0})
    thirds = {"num_workers": 3, "use_gpu": True, "gpus_per_worker": 0.5}
    with pytest.raises(ConfigError, match=r"needs 1.5 GPU\(s\) \(3 worker\(s\) x gpus_per_worker 0.5\).*has 1"):
        check_placeable(load_config(TrainJobConfig, {**BASE, "training": thirds}).training, {"CPU": 8.0, "GPU": 1.0})


def test_micro_batch_larger_than_per_worker_batch_is_refused() -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(
            TrainJobConfig, {**BASE, "training": {"batch_size": 256, "num_workers": 2, "micro_batch_size": 200}}
        )
    assert "micro_batch_size (200) must be <= batch_size / num_workers (256 / 2 = 128)" in str(exc.value)
    ok = load_config(TrainJobConfig, {**BASE, "training": {"batch_size": 256, "micro_batch_size": 32}})
    assert ok.training.micro_batch_size == 32


def test_model_is_a_union_of_the_registered_architectures() -> None:
    from runtime.models import ARCHITECTURES, MLPConfig

    assert isinstance(load_config(TrainJobConfig, BASE).model, MLPConfig)  # architecture defaults to mlp
    cfg = load_config(TrainJobConfig, {**BASE, "model": {"architecture": "mlp", "hidden": [8]}})
    assert cfg.model.hidden == [8]
    with pytest.raises(ConfigError) as exc:
        load_config(TrainJobConfig, {**BASE, "model": {"architecture": "mpl"}})
    assert "model.architecture: value 'mpl' is not one of 'mlp', 'char_lm' (did you mean 'mlp'?)" in str(exc.value)
    with pytest.raises(ConfigError) as exc:
        load_config(TrainJobConfig, {**BASE, "model": {"hiden": [8]}})
    assert "model.hiden: unknown key 'hiden' (did you mean 'hidden'?)" in str(exc.value)  # no union tag in the path
    with pytest.raises(ConfigError, match="takes tokens, not the preprocessed feature matrix"):
        load_config(TrainJobConfig, {**BASE, "model": {"architecture": "char_lm"}})
    assert set(ARCHITECTURES) == {"mlp", "char_lm"}


def test_splits_and_early_stopping_are_validated() -> None:
    with pytest.raises(ConfigError, match="holdout_fraction .* is now test_fraction"):
        load_config(TrainJobConfig, {**BASE, "data": {"path": "x", "holdout_fraction": 0.2}})
    with pytest.raises(ConfigError, match="must leave at least 10% of the rows for training"):
        load_config(TrainJobConfig, {**BASE, "data": {"path": "x", "test_fraction": 0.5, "validation_fraction": 0.45}})
    with pytest.raises(ConfigError, match="must be a validation metric"):
        load_config(TrainJobConfig, {**BASE, "training": {"early_stopping": {"patience": 3, "metric": "holdout_rmse"}}})
    cfg = load_config(TrainJobConfig, {**BASE, "training": {"early_stopping": {"patience": 5}}})
    assert cfg.training.early_stopping is not None and cfg.training.early_stopping.metric is None
