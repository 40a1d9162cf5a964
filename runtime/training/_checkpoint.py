"""Training checkpoints: everything needed to resume a run exactly where it stopped.

A checkpoint directory holds::

    weights.safetensors   model state dict (no pickle)
    optimizer.pt          optimizer + LR scheduler state (torch.load(weights_only=True))
    rng-rank<r>.pt        each rank's torch / numpy / python (and CUDA) RNG states (every
                          rank reports its own file; Ray Train merges them into one directory)
    train_state.json      epoch, step, micro-batch size, the run's fingerprint
    <extra files>         what the job adds: the fitted preprocessing state (preprocessor.json)
                          and model.json, so a checkpoint is servable alone; callbacks add
                          theirs in ``on_checkpoint`` (early stopping's best weights)
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

WEIGHTS, OPTIMIZER, STATE = "weights.safetensors", "optimizer.pt", "train_state.json"


def rng_file(rank: int) -> str:
    return f"rng-rank{rank}.pt"


@dataclass(frozen=True)
class ResumePoint:
    epoch: int  # the epoch to continue in
    step: int  # optimizer steps already taken
    step_in_epoch: int  # steps of ``epoch`` already taken (0 at an epoch boundary)
    micro_batch_size: int
    run_fingerprint: str


def _rng_state() -> dict[str, Any]:
    import torch

    np_state: Any = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)), *np_state[2:]],
        "python": [py_state[0], torch.tensor(py_state[1], dtype=torch.int64), py_state[2]],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # a GPU worker's dropout stream
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import torch

    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(int(x) for x in internal.tolist()), gauss))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            logger.warning(
                "checkpoint has CUDA RNG states for %d devices, this worker sees %d: CUDA RNG not restored",
                len(cuda),
                torch.cuda.device_count(),
            )


def save_rng_state(directory: Path, rank: int) -> None:
    """This rank's RNG states (dropout masks differ per rank: each needs its own back)."""
    import torch

    torch.save(_rng_state(), directory / rng_file(rank))


def save_checkpoint(
    directory: Path,
    model: Any,
    optimizer: Any,
    scheduler: Any,
    *,
    rank: int = 0,
    epoch: int,
    step: int,
    step_in_epoch: int,
    micro_batch_size: int,
    run_fingerprint: str,
    extra_files: dict[str, str] | None = None,
) -> None:
    import torch
    from safetensors.torch import save_model

    base = model.module if hasattr(model, "module") else model
    save_model(base, str(directory / WEIGHTS))  # tied weights (the LM's head) are stored once
    torch.save(
        {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict() if scheduler else None},
        directory / OPTIMIZER,
    )
    save_rng_state(directory, rank)
    for name, text in (extra_files or {}).items():
        (directory / name).write_text(text)
    (directory / STATE).write_text(
        json.dumps(
            {
                "epoch": epoch,
                "step": step,
                "step_in_epoch": step_in_epoch,
                "micro_batch_size": micro_batch_size,
                "run_fingerprint": run_fingerprint,
            }
        )
    )


def load_checkpoint(
    directory: Path,
    model: Any,
    optimizer: Any,
    scheduler: Any,
    expected_fingerprint: str | None = None,
    rank: int = 0,
) -> ResumePoint:
    """Restore model, optimizer, scheduler and this rank's RNG states in place; returns where
    to resume. A rank the checkpoint has no RNG file for (the run now has more workers) takes
    none: it keeps the stream its worker seeded for it (copying rank 0's would give two ranks
    the same dropout masks), with a warning; the run goes on, but not bit-identically.

    With ``expected_fingerprint`` (the tabular job's fitted preprocessing, the LM job's corpus
    and model), a checkpoint of another run is refused before any state is touched (a
    resumed run must continue the *same* run).
    """
    import torch
    from safetensors.torch import load_model

    from runtime.errors import TrainingError

    state = json.loads((directory / STATE).read_text())
    recorded = state.get("run_fingerprint") or state.get("preprocessor_fingerprint", "?")
    if expected_fingerprint and recorded != expected_fingerprint:
        raise TrainingError(
            f"checkpoint {directory} belongs to a run with fingerprint {recorded[:16]}, this run has "
            f"{expected_fingerprint[:16]} (the data, the feature spec or the model changed); "
            "use a new training.run_name to start a fresh run"
        )
    load_model(model, str(directory / WEIGHTS))
    opt = torch.load(directory / OPTIMIZER, weights_only=True)
    optimizer.load_state_dict(opt["optimizer"])
    if scheduler is not None and opt["scheduler"] is not None:
        scheduler.load_state_dict(opt["scheduler"])
    rng = directory / rng_file(rank)
    if rng.exists():
        _set_rng_state(torch.load(rng, weights_only=True))
    else:
        logger.warning(
            "checkpoint %s has no RNG state for rank %d (it was saved by fewer workers); "
            "this rank keeps its freshly seeded stream",
            directory,
            rank,
        )
    return ResumePoint(
        state["epoch"],
        state["step"],
        state["step_in_epoch"],
        state["micro_batch_size"],
        recorded,
    )


def load_weights(directory: Path, model_config: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's weights as the state dict of the model ``model_config`` builds (tied
    weights tied again)."""
    from safetensors.torch import load_model

    from runtime.models import build_model

    module = build_model(model_config)
    load_model(module, str(directory / WEIGHTS))
    return dict(module.state_dict())
