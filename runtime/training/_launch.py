"""What every job's driver does around ``TorchTrainer.fit()``: the workers' memory settings, one
host-memory watchdog per node while the run lasts, and a failure that says what killed it."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime import registry
from runtime.errors import SkewlessError, TrainingError
from runtime.redact import redact
from runtime.registry import RunLogger, Tag
from runtime.training._config import MemoryConfig
from runtime.training._worker import WorkerMemory
from runtime.training.callbacks import start_watchdogs, stop_watchdogs

Progress = Callable[[str], None]

# Ray Train V2 hands each report to its controller through a one-slot queue the controller
# empties when it polls the workers, every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by
# default): a worker's next report waits for that poll, so every epoch of a small dataset cost
# about 2 s whatever it computed. The driver propagates the variable to the controller; a
# value the user set wins.
CONTROLLER_POLL_ENV, CONTROLLER_POLL_S = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2"


@dataclass(frozen=True)
class RunPlaces:
    """Where a run writes: Ray Train's storage and name, the local state for its reports."""

    storage: str  # Ray Train's storage_path (a local path or a pyarrow.fs URI)
    name: str  # Ray Train's run name
    key: str  # the run's id in MLflow (or its name when untracked)
    run_id: str | None  # the MLflow run, when tracked

    @property
    def local(self) -> Path:
        return registry.skewless_home() / "runs" / self.key

    @property
    def host_diagnostics(self) -> str:
        """The watchdog writes where it runs: the run's storage when it is a local path."""
        if "://" not in self.storage:
            return f"{self.storage}/{self.name}/diagnostics/host-memory"
        return str(self.local / "host-memory")


def worker_memory(memory: MemoryConfig, places: RunPlaces) -> WorkerMemory:
    return WorkerMemory(
        track=memory.track,
        sample_interval_s=memory.sample_interval_s,
        oom_guard=memory.oom_guard,
        record_history=memory.record_history,
        diagnostics_dir=f"{places.storage}/{places.name}/diagnostics",
        report_dir=str(places.local / "memory"),
        watchdog_run=places.key[:12] if memory.watchdog.enabled else None,
        host_diagnostics_dir=places.host_diagnostics,
    )


def fit_watched(trainer: Any, memory: MemoryConfig, places: RunPlaces, progress: Progress) -> Any:
    """``trainer.fit()`` with one host-memory watchdog per node; a worker the kernel killed
    for memory fails the run with what the watchdog saw."""
    os.environ.setdefault(CONTROLLER_POLL_ENV, CONTROLLER_POLL_S)
    w = memory.watchdog
    diag = places.host_diagnostics
    watchdogs = (
        start_watchdogs(
            places.key[:12],
            diag,
            soft_fraction=w.soft_fraction,
            poll_interval_s=w.poll_interval_s,
            memory_limit_bytes=w.memory_limit_bytes,
            cgroup_name=f"skewless-{places.key[:12]}",
        )
        if w.enabled
        else []
    )
    what = f"training run {places.run_id or places.name}"
    incidents: list[dict[str, Any]] = []
    try:
        result = trainer.fit()
    except SkewlessError:
        raise
    except Exception as exc:
        incidents = _stop(watchdogs, places)
        watchdogs = []
        if incidents:
            raise TrainingError(
                f"{what} failed on host memory: "
                + "; ".join(i["summary"] for i in incidents)
                + f". Diagnostics (stack and allocation dumps, REPORT.md): {diag}. Ray reported: {redact(str(exc))}"
            ) from exc
        raise TrainingError(f"{what} failed: {redact(str(exc))}") from exc
    finally:
        incidents = incidents or _stop(watchdogs, places)
    if incidents:  # workers were replaced (max_failures) and the run went on: say so
        progress("host memory incidents during the run: " + "; ".join(i["summary"] for i in incidents))
    return result


def _stop(watchdogs: list[Any], places: RunPlaces) -> list[dict[str, Any]]:
    if not watchdogs:
        return []
    incidents = stop_watchdogs(watchdogs)
    if incidents and places.run_id:
        run = RunLogger(registry.tracking_uri(), places.run_id)
        run.set_tags({Tag.HOST_MEMORY_INCIDENTS: "; ".join(i["summary"] for i in incidents)[:5000]})
        if Path(places.host_diagnostics).is_dir():
            run.log_artifacts(places.host_diagnostics, "diagnostics/host-memory")
    return incidents


def scaling(num_workers: int, use_gpu: bool, cpus_per_worker: float, gpus_per_worker: float = 1.0) -> dict[str, Any]:
    """``scaling_config`` and ``torch_config`` for a ``TorchTrainer``: workers sharing a GPU
    (``gpus_per_worker`` < 1) talk over gloo, since NCCL refuses two ranks on one device."""
    from ray.train import ScalingConfig
    from ray.train.torch import TorchConfig

    resources: dict[str, float] = {"CPU": cpus_per_worker}
    if use_gpu:
        resources["GPU"] = gpus_per_worker
    shared = use_gpu and gpus_per_worker < 1.0
    return {
        "scaling_config": ScalingConfig(num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=resources),
        "torch_config": TorchConfig(backend="gloo" if shared else None),
    }
