"""The byte-level language-model job on the session's real local Ray: the shared worker loop,
MLflow, and a registered model with its lineage."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import pytest

from runtime import registry
from runtime.config import load_config
from runtime.models import build_model
from runtime.registry import Tag
from runtime.training import Callback, LMJobConfig, LMOutcome, LoopState, run_lm
from runtime.training.callbacks import PEAK_ENV

pytestmark = pytest.mark.integration
CONFIG = Path(__file__).resolve().parents[2] / "jobs" / "configs" / "lm_tiny.yaml"


class OomAbove(Callback):
    """The model raises a CUDA out-of-memory (the real class) when it trains on more than
    ``rows`` sequences at once: the OOM guard has to halve the micro-batch to go on."""

    def __init__(self, rows: int) -> None:
        self.rows = rows

    def on_run_start(self, state: LoopState) -> None:
        import torch

        inner = getattr(state.model, "module", state.model)
        forward, limit = inner.forward, self.rows

        def guarded(idx: torch.Tensor) -> torch.Tensor:
            if inner.training and idx.shape[0] > limit:
                raise torch.cuda.OutOfMemoryError(f"CUDA out of memory (injected: {idx.shape[0]} sequences > {limit})")
            return forward(idx)

        inner.forward = guarded


@pytest.fixture(scope="module")
def outcome(ray_session: Any, tmp_path_factory: pytest.TempPathFactory) -> LMOutcome:
    tiny = load_config(LMJobConfig, CONFIG).model_dump()
    tiny["data"].update(path=str(tmp_path_factory.mktemp("lm") / "corpus.txt"), n_bytes=100_000)
    tiny["training"].update(steps=30, warmup_steps=3, log_every=10, num_workers=1, micro_batch_size=8)
    tiny["memory"] = {"sample_interval_s": 0.2}
    tiny["experiment"] = "itest-lm"
    tiny["registry"] = {"model_name": "itest-lm"}
    messages: list[str] = []
    result = run_lm(load_config(LMJobConfig, tiny), progress=messages.append, callbacks=[OomAbove(4)])
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


def test_the_shared_loop_machinery_ran(outcome: LMOutcome):
    """The memory tracker and the OOM guard ran in the LM job's workers, like in any job: an
    out-of-memory at 8 sequences a micro-batch was survived at 4, with a diagnostics bundle."""
    assert outcome.run_id is not None
    client = mlflow.MlflowClient()
    bundles = {Path(a.path).name for a in client.list_artifacts(outcome.run_id, "diagnostics")}
    assert bundles == {"oom-rank0-step0-1"}, bundles  # 8 -> 4, once, then every step fits
    report = {Path(a.path).name for a in client.list_artifacts(outcome.run_id, "diagnostics/oom-rank0-step0-1")}
    assert "REPORT.md" in report
    tracked = client.get_metric_history(outcome.run_id, "mem/rank0/rss_mb")
    assert tracked and all(m.value > 0 for m in tracked)
    artifacts = {Path(a.path).name for a in client.list_artifacts(outcome.run_id, "memory")}
    assert "memory_report_rank0.json" in artifacts


def test_metrics_and_params_land_in_mlflow(outcome: LMOutcome):
    assert outcome.run_id is not None
    client = mlflow.MlflowClient()
    run = client.get_run(outcome.run_id)
    assert run.data.params["model.d_model"] == "64"
    assert run.data.params["n_params"] == str(outcome.n_params)
    assert run.data.tags[Tag.WORKLOAD] == "char_lm"
    assert len(run.data.tags[Tag.DATASET_SHA256]) == 64
    losses = client.get_metric_history(outcome.run_id, "train_loss")
    assert [m.step for m in losses] == [0, 1, 2]  # one per reporting interval (the job's "epoch")
    assert run.data.metrics["valid_loss"] == pytest.approx(outcome.final_loss)


def test_the_model_is_registered_with_lineage_and_generates(outcome: LMOutcome, tmp_path: Path):
    assert outcome.model_uri is not None
    ref = registry.resolve("models:/itest-lm@candidate")
    assert ref.uri == outcome.model_uri
    assert ref.tags[Tag.WORKLOAD] == "char_lm" and ref.tags[Tag.CODE_FINGERPRINT]
    verified = registry.verify(outcome.model_uri, tmp_path)  # every file checked before anything loads it
    assert "MLmodel" in verified.files
    _, model = registry.load(outcome.model_uri)
    assert model.preprocessor is None and model.config["architecture"] == "char_lm"
    out = registry.load_pyfunc(outcome.model_uri).predict(pd.DataFrame({"prompt": ["The "]}))
    assert isinstance(out["continuation"][0], str) and len(out["continuation"][0]) > 0


def test_final_checkpoint_rebuilds_the_model(outcome: LMOutcome):
    import torch
    from safetensors.torch import load_model

    assert outcome.checkpoint_path is not None
    ckpt = Path(outcome.checkpoint_path)
    config = json.loads((ckpt / "model.json").read_text())
    assert config["architecture"] == "char_lm" and config["d_model"] == 64
    model = build_model(config)
    load_model(model, str(ckpt / "weights.safetensors"))  # the tied head is stored once
    with torch.no_grad():
        assert model(torch.zeros(1, 8, dtype=torch.long)).shape == (1, 8, 256)
