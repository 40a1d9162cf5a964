"""A worker killed mid-run (SIGKILL, for real) is replaced; the run resumes from the latest
checkpoint and ends with the same model as an uninterrupted run."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load_file

from runtime.data import SyntheticConfig, generate_synthetic, synthetic_feature_spec
from runtime.training import Callback, LoopState, TrainJobConfig, run_training

pytestmark = pytest.mark.integration


class KillOnce(Callback):
    """SIGKILLs this worker process at ``step`` on ``rank``, once per marker file."""

    def __init__(self, marker: str, step: int, rank: int) -> None:
        self.marker, self.step, self.rank = marker, step, rank

    def on_step_end(self, state: LoopState) -> None:
        if state.rank == self.rank and state.step == self.step and not os.path.exists(self.marker):
            Path(self.marker).write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)


class RecordStarts(Callback):
    """Appends the step each attempt starts from (rank 0), to see where a restart resumed."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_run_start(self, state: LoopState) -> None:
        if state.rank == 0:
            with open(self.path, "a") as f:
                f.write(f"{state.epoch}:{state.step}:{state.step_in_epoch}\n")


def _cfg(data: Path, name: str, run_name: str) -> TrainJobConfig:
    return TrainJobConfig.model_validate(
        {
            "data": {"path": str(data)},
            "features": synthetic_feature_spec(),
            # dropout: each rank draws its own masks, so the resume must restore every rank's RNG
            "model": {"hidden": [16], "dropout": 0.2},
            "training": {
                "epochs": 2,
                "batch_size": 128,
                "num_workers": 2,
                "seed": 4,
                "checkpoint_every_steps": 5,
                "max_failures": 2,
                "run_name": run_name,
            },
            "registry": {"model_name": name, "promote": False},
        }
    )


def test_killed_worker_is_replaced_and_the_model_is_unchanged(ray_session: Any, tmp_path: Path) -> None:
    data = Path(generate_synthetic(tmp_path / "d.parquet", SyntheticConfig(rows=3000, seed=8)))
    reference = run_training(
        _cfg(data, "ft-ref", "ft-ref"), progress=lambda m: None, storage_path=str(tmp_path / "results")
    )
    marker, starts = tmp_path / "killed", tmp_path / "starts"
    shown: list[str] = []
    resumed = run_training(
        _cfg(data, "ft-killed", "ft-killed"),
        progress=shown.append,
        callbacks=[KillOnce(str(marker), step=12, rank=1), RecordStarts(str(starts))],
        storage_path=str(tmp_path / "results"),
    )
    assert marker.exists()  # the worker really died at step 12 (after the step-10 checkpoint)
    # First attempt from scratch; the replacement group resumed mid-epoch from the latest
    # checkpoint Ray Train had registered when the worker died (step 5 or 10: registration
    # is asynchronous), not from scratch.
    first, second = starts.read_text().split()
    assert first == "0:0:0" and second in ("0:5:5", "0:10:10")
    # ...and the job said so, in one line: which rank, where the run was, what it resumed from,
    # how many restarts are left (max_failures 2)
    failures = [line for line in shown if line.startswith("worker failure:")]
    assert len(failures) == 1, shown
    step = second.split(":")[1]
    assert "rank 1 (ActorDiedError: " in failures[0], failures  # the dead worker, inside Ray's wrapper
    assert "(last reported: epoch 1/2, step " in failures[0], failures
    assert "resumed from checkpoint checkpoint_" in failures[0] and f"(epoch 1, step {step})" in failures[0]
    assert failures[0].endswith("; 1 restart left of 2"), failures
    # the epochs and steps were shown as they went
    assert any(line.startswith("epoch 2/2 done in ") for line in shown), shown
    a = load_file(str(reference.model_dir / "weights.safetensors"))
    b = load_file(str(resumed.model_dir / "weights.safetensors"))
    # Exact on CPU with a fixed seed: same data order per (seed, epoch, rank), each rank's RNG
    # restored (its dropout masks).
    for key in a:
        assert (a[key] == b[key]).all(), key
    assert resumed.metrics == reference.metrics


def test_rerun_with_the_same_run_name_resumes(ray_session: Any, tmp_path: Path) -> None:
    """Job-driver fault tolerance: the same (storage_path, run_name) picks up the latest checkpoint."""
    data = Path(generate_synthetic(tmp_path / "d.parquet", SyntheticConfig(rows=1500, seed=3)))
    starts = tmp_path / "starts"
    base = _cfg(data, "ft-rerun", "ft-rerun").model_dump()
    first = base | {"training": base["training"] | {"epochs": 1, "checkpoint_every_steps": None}}
    run_training(
        TrainJobConfig.model_validate(first),
        progress=lambda m: None,
        callbacks=[RecordStarts(str(starts))],
        storage_path=str(tmp_path / "results"),
    )
    second = base | {"training": base["training"] | {"epochs": 2, "checkpoint_every_steps": None}}
    run_training(
        TrainJobConfig.model_validate(second),
        progress=lambda m: None,
        callbacks=[RecordStarts(str(starts))],
        storage_path=str(tmp_path / "results"),
    )
    first_start, second_start = starts.read_text().split()
    assert first_start == "0:0:0"
    assert second_start.startswith("1:")  # resumed after epoch 0, not from scratch
