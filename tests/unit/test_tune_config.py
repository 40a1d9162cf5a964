"""Tune configs are validated against the training config before any trial starts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from runtime.data import synthetic_feature_spec
from runtime.errors import ConfigError
from runtime.training import resolve_tune_config


def _write(tmp_path: Path, space: dict[str, Any], **extra: Any) -> Path:
    base = {
        "data": {"path": str(tmp_path / "d.parquet")},
        "features": synthetic_feature_spec(),
        "training": {"epochs": 2, "batch_size": 128, "num_workers": 1},
        "registry": {"model_name": "m"},
    }
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    path = tmp_path / "tune.yaml"
    path.write_text(yaml.safe_dump({"base": "base.yaml", "search_space": space, **extra}))
    return path


@pytest.mark.parametrize(
    "space,message",
    [
        (
            {"optimizer.lrr": {"uniform": [0.1, 0.2]}},
            r"(?s)search_space.optimizer.lrr = 0.1 does not fit.*did you mean 'lr'",
        ),
        ({"training.batch_size": {"choice": [128, 0]}}, r"search_space.training.batch_size = 0 does not fit"),
        (
            {"optimizer.lr": {"loguniform": [0, 0.1]}},
            r"search_space.optimizer.lr.loguniform = \[0, 0.1\]: loguniform needs low > 0",
        ),
        ({"optimizer.lr": {"uniform": [0.1]}}, r"search_space.optimizer.lr.uniform = \[0.1\]: expected \[low, high\]"),
        ({"optimizer.lr": {"uniform": [0.2, 0.1]}}, r"low must be < high"),
        ({"optimizer.lr": {"uniform": [0.1, 0.2], "choice": [0.1]}}, r"exactly one distribution"),
        ({"optimizer.lr": {"normal": [0, 1]}}, r"search_space.optimizer.lr.normal"),
    ],
)
def test_bad_search_spaces_are_refused(tmp_path: Path, space: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        resolve_tune_config(_write(tmp_path, space))


def test_checkpoint_every_steps_is_refused_under_tune(tmp_path: Path) -> None:
    path = _write(tmp_path, {"optimizer.lr": {"uniform": [0.001, 0.01]}})
    base = yaml.safe_load((tmp_path / "base.yaml").read_text())
    base["training"]["checkpoint_every_steps"] = 5
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    with pytest.raises(ConfigError, match="checkpoint_every_steps must be unset under Tune"):
        resolve_tune_config(path)


def test_good_config_resolves_with_the_spec_inline(tmp_path: Path) -> None:
    tune_cfg, base = resolve_tune_config(_write(tmp_path, {"model.hidden": {"choice": [[16], [32, 16]]}}))
    assert tune_cfg.metric == "valid_loss" and isinstance(base["features"], dict)
