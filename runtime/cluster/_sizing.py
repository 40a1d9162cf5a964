"""What a job config and a Serve config ask of a cluster: the few keys the specs are sized from.

``runtime.cluster`` sits below ``runtime.training`` and ``runtime.serving``, so it reads these
keys from the parsed YAML itself, type-checked here; the defaults are ``TrainingConfig``'s (a
test holds them equal). The configs' full validation stays with their owners.
"""

from __future__ import annotations

import importlib.metadata
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from runtime.errors import ConfigError

GPUS_PER_NODE = 1  # g5.xlarge (A10G), g2-standard-8 (L4), one nvidia.com/gpu per Kubernetes worker pod
SERVE_AUTO_MAX_REPLICAS = 100  # Serve's max_replicas for num_replicas: auto


@dataclass(frozen=True)
class JobResources:
    """What a training job asks of the cluster (the keys of ``training:`` the specs read)."""

    num_workers: int
    use_gpu: bool
    gpus_per_worker: float
    cpus_per_worker: float

    @property
    def gpus(self) -> float:
        return self.num_workers * self.gpus_per_worker if self.use_gpu else 0.0


def number(value: Any, where: str, source: str, *, integer: bool = False, minimum: float = 0.0) -> float:
    """``value`` as a number (an int when ``integer``) >= ``minimum``; else a ConfigError naming ``where``."""
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind):
        rule = "an integer" if integer else "a number"
        raise ConfigError(f"{source}: {where} must be {rule}, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ConfigError(f"{source}: {where} ({value}) must be >= {minimum:g}")
    return float(value)


def job_resources(job_config: Mapping[str, Any], source: str = "job config") -> JobResources:
    """``training.num_workers``/``use_gpu``/``gpus_per_worker``/``cpus_per_worker`` of a job config."""
    training = job_config.get("training") or {}
    if not isinstance(training, Mapping):
        raise ConfigError(f"{source}: training must be a mapping, got {type(training).__name__}")
    use_gpu = training.get("use_gpu", False)
    if not isinstance(use_gpu, bool):
        raise ConfigError(
            f"{source}: training.use_gpu must be true or false, got {use_gpu!r} ({type(use_gpu).__name__}); "
            "write it unquoted: use_gpu: true"
        )
    gpus_per_worker = number(training.get("gpus_per_worker", 1.0), "training.gpus_per_worker", source)
    if not 0.0 < gpus_per_worker <= 1.0:
        raise ConfigError(f"{source}: training.gpus_per_worker ({gpus_per_worker:g}) must be in (0, 1]")
    cpus_per_worker = number(training.get("cpus_per_worker", 1.0), "training.cpus_per_worker", source)
    if cpus_per_worker <= 0:
        raise ConfigError(f"{source}: training.cpus_per_worker ({cpus_per_worker:g}) must be > 0")
    workers = number(training.get("num_workers", 2), "training.num_workers", source, integer=True, minimum=1)
    return JobResources(int(workers), use_gpu, gpus_per_worker, cpus_per_worker)


def serve_gpus(serve_config: Mapping[str, Any], source: str = "serve config") -> float:
    """GPUs the Serve applications can hold at once: max replicas x ``ray_actor_options.num_gpus``."""
    apps = serve_config.get("applications")
    if not isinstance(apps, list) or not apps:
        raise ConfigError(f"{source}: applications must be a non-empty list (the Serve config format)")
    total = 0.0
    for i, app in enumerate(apps):
        if not isinstance(app, Mapping):
            raise ConfigError(f"{source}: applications[{i}] must be a mapping, got {type(app).__name__}")
        for j, dep in enumerate(app.get("deployments") or []):
            where = f"applications[{i}].deployments[{j}]"
            if not isinstance(dep, Mapping):
                raise ConfigError(f"{source}: {where} must be a mapping, got {type(dep).__name__}")
            options = dep.get("ray_actor_options") or {}
            gpus = number(options.get("num_gpus", 0), f"{where}.ray_actor_options.num_gpus", source)
            autoscaling = dep.get("autoscaling_config")
            if isinstance(autoscaling, Mapping):
                key = f"{where}.autoscaling_config.max_replicas"
                replicas = number(autoscaling.get("max_replicas", 1), key, source, integer=True)
            elif dep.get("num_replicas") == "auto":
                replicas = float(SERVE_AUTO_MAX_REPLICAS)
            else:
                replicas = number(dep.get("num_replicas", 1), f"{where}.num_replicas", source, integer=True)
            total += gpus * replicas
    return total


def gpu_nodes(gpus: float) -> int:
    """GPU nodes for ``gpus`` GPUs used at once, one GPU each; at least 1 so the type can scale."""
    return max(1, math.ceil(gpus / GPUS_PER_NODE - 1e-9))


def ray_version() -> str:
    """The installed Ray's version: the clusters run the same (``constraints.txt`` pins it)."""
    return importlib.metadata.version("ray")
