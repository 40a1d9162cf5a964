"""The host-memory watchdog's Ray half: one actor per node started by the driver, and the
training-loop callback that registers each worker with its node's actor.

The poller itself is :class:`runtime.memory.HostMemoryWatchdog`; the worker-side dumps are
:func:`runtime.memory.install_worker_side` and :class:`runtime.memory.StepBeacon`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from runtime.memory import HostMemoryWatchdog, StepBeacon, install_worker_side
from runtime.training.callbacks._base import Callback, LoopState

logger = logging.getLogger(__name__)


def actor_name(node_id: str, run: str) -> str:
    return f"skewless-watchdog-{run}-{node_id[:12]}"


class WatchdogActor:
    """:class:`HostMemoryWatchdog` in a Ray actor pinned to one node (``num_cpus=0``)."""

    def __init__(self, diagnostics_dir: str, **kwargs: Any) -> None:
        self.dog = HostMemoryWatchdog(diagnostics_dir, **kwargs).start()

    def register(self, rank: int, pid: int, beacon: str, dumps: dict[str, str]) -> str:
        return self.dog.register(rank, pid, beacon, dumps)

    def incidents(self) -> list[dict[str, Any]]:
        self.dog.poll()
        return [i.to_dict() for i in self.dog.incidents]

    def stop(self) -> list[dict[str, Any]]:
        self.dog.stop()
        return [i.to_dict() for i in self.dog.incidents]


def start_watchdogs(run: str, diagnostics_dir: str, **kwargs: Any) -> list[Any]:
    """One :class:`WatchdogActor` per alive node, named so workers find theirs."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    remote = ray.remote(num_cpus=0, max_restarts=0)(WatchdogActor)
    actors = []
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        actors.append(
            remote.options(
                name=actor_name(node["NodeID"], run),
                scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False),
            ).remote(diagnostics_dir, **kwargs)
        )
    return actors


def stop_watchdogs(actors: list[Any]) -> list[dict[str, Any]]:
    """Stop them; returns every incident they saw."""
    import ray

    incidents: list[dict[str, Any]] = []
    for actor in actors:
        try:
            incidents += ray.get(actor.stop.remote(), timeout=30)
        except Exception as exc:
            logger.warning("watchdog did not stop cleanly: %s", exc)
        ray.kill(actor)
    return incidents


class WatchdogClient(Callback):
    """The training-loop callback half: registers the worker with its node's watchdog."""

    def __init__(self, run: str, diagnostics_dir: str) -> None:
        self.run, self.diagnostics_dir = run, diagnostics_dir
        self.beacon: StepBeacon | None = None

    def on_run_start(self, state: LoopState) -> None:
        import ray

        d = Path(self.diagnostics_dir)
        dumps = install_worker_side(d, state.rank)
        self.beacon = StepBeacon(d / f"rank{state.rank}-pid{os.getpid()}.step")
        self.beacon.set(state.step)
        name = actor_name(ray.get_runtime_context().get_node_id(), self.run)
        try:
            actor = ray.get_actor(name)
            limit = str(ray.get(actor.register.remote(state.rank, os.getpid(), self.beacon.path, dumps), timeout=30))
            logger.info("rank %d watched by the host-memory watchdog against %s", state.rank, limit)
        except Exception as exc:  # no actor, or it failed: train on, undiagnosed
            logger.warning("host-memory watchdog %r unavailable (%s); host OOMs will not be diagnosed", name, exc)

    def on_step_end(self, state: LoopState) -> None:
        if self.beacon is not None:
            self.beacon.set(state.step)

    def on_run_end(self, state: LoopState) -> None:
        if self.beacon is not None:
            self.beacon.close()
            self.beacon = None

    def __getstate__(self) -> dict[str, Any]:
        return {"run": self.run, "diagnostics_dir": self.diagnostics_dir, "beacon": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
