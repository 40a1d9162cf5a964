"""The byte-level language-model job on the session's real local Ray: Ray Train -> MLflow."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import mlflow
import pytest

from runtime.config import load_config
from runtime.models import build_model
from runtime.training._lm import CKPT_CONFIG, CKPT_MODEL, LMJobConfig
from runtime.training._lm_driver import LMOutcome, run_lm
from runtime.training._throughput import PEAK_ENV

pytestmark = pytest.mark.integration
CONFIG = Path(__file__).resolve().parents[2] / "jobs" / "configs" / "lm_tiny.yaml"


@pytest.fixture(scope="module")
def outcome(ray_session: Any, tmp_path_factory: pytest.TempPathFactory) -> LMOutcome:
    tiny = load_config(LMJobConfig, CONFIG).model_dump()
    tiny["data"].update(path=str(tmp_path_factory.mktemp("lm") / "corpus.txt"), n_bytes=100_000)
    tiny["training"].update(steps=30, warmup_steps=3, log_every=10, num_workers=1)
    tiny["experiment"] = "itest-lm"
    messages: list[str] = []
    result = run_lm(load_config(LMJobConfig, tiny), progress=messages.append)
    assert any(m.startswith("generating a 100,000-byte synthetic corpus") for m in messages)
    assert any(m.startswith("step 30, loss") for m in messages)
    return result


def test_loss_drops_and_throughput_is_measured(outcome: LMOutcome):
    assert outcome.final_loss < outcome.initial_loss - 1.0, outcome
    assert outcome.train_loss < outcome.initial_loss
    assert outcome.tokens_per_s > 0
    assert outcome.device == "cpu"
    if PEAK_ENV not in os.environ:
        assert outcome.mfu is None  # no peak FLOPs for a CPU
    assert [int(h["step"]) for h in outcome.history] == [10, 20, 30]
    assert outcome.n_params > outcome.n_params_non_embedding > 0


def test_metrics_and_params_land_in_mlflow(outcome: LMOutcome):
    assert outcome.run_id is not None
    client = mlflow.MlflowClient()
    run = client.get_run(outcome.run_id)
    assert run.data.params["model.d_model"] == "64"
    assert run.data.params["n_params"] == str(outcome.n_params)
    assert run.data.tags["skewless.workload"] == "char_lm"
    assert len(run.data.tags["skewless.dataset_sha256"]) == 64
    losses = client.get_metric_history(outcome.run_id, "loss")
    assert [m.step for m in losses] == [10, 20, 30]
    assert run.data.metrics["eval_loss"] == pytest.approx(outcome.final_loss)


def test_final_checkpoint_rebuilds_the_model(outcome: LMOutcome):
    import torch
    from safetensors.torch import load_model

    assert outcome.checkpoint_path is not None
    ckpt = Path(outcome.checkpoint_path)
    config = json.loads((ckpt / CKPT_CONFIG).read_text())
    assert config["architecture"] == "char_lm" and config["d_model"] == 64
    model = build_model(config)
    load_model(model, str(ckpt / CKPT_MODEL))
    with torch.no_grad():
        assert model(torch.zeros(1, 8, dtype=torch.long)).shape == (1, 8, 256)
