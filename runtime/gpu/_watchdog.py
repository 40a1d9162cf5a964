"""The host-memory watchdog: it lives outside the training workers, because the kernel's OOM
killer sends SIGKILL, which no process can catch or report on itself.

Two halves:

- **in each worker** (:func:`install_worker_side`, done by :class:`WatchdogClient` at run
  start): ``SIGUSR1`` makes :mod:`faulthandler` write every thread's stack (C-level, works
  even while Python is stuck in native code); a request file makes a small thread write the
  largest live arrays and tensors (and, when tracing, the top ``tracemalloc`` sites) and the
  Python stacks. A
  :class:`StepBeacon` (8 bytes in a memory-mapped file) carries the current step at the cost
  of one memory write per step.
- **one per node** (:class:`HostMemoryWatchdog`, run in a Ray actor started with the job, or
  anywhere): polls each registered worker's memory cgroup (v2 ``memory.current``/``max``/
  ``events``, v1 ``usage_in_bytes``/``limit_in_bytes``/``oom_control``) or the node's memory,
  and each worker's RSS. Above ``soft_fraction`` of the limit it signals the worker to dump
  (once per crossing). When a worker disappears it reads the cgroup's ``oom_kill`` counter,
  and writes an incident (``incident-rank<r>.json`` and ``REPORT.md``): which rank, at which
  step, how much memory against which limit, where the dumps are.

With ``memory_limit_bytes`` it also puts the registered workers in a child memory cgroup
with that limit (where the machine lets us create one), so a runaway worker is killed by
the kernel at a known limit instead of taking down the node.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import faulthandler
import gc
import json
import logging
import mmap
import os
import signal
import struct
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from runtime.gpu._hostmem import (
    LimitedCgroup,
    cgroup_memory,
    memory_pressure,
    process_rss,
    process_tree_rss,
    try_create_limited_cgroup,
)
from runtime.training._events import Callback, LoopState

logger = logging.getLogger(__name__)
_MB = 1 << 20
STACKS_SIGNAL = signal.SIGUSR1


# ------------------------------------------------------------------ worker side


class StepBeacon:
    """The worker's current step, readable by another process; one 8-byte store per update."""

    def __init__(self, path: str | Path, create: bool = True) -> None:
        self.path = str(path)
        if create:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "wb") as f:
                f.write(struct.pack("<q", -1))
        self._file = open(self.path, "r+b")  # noqa: SIM115 - kept open for the mmap's lifetime
        self._map = mmap.mmap(self._file.fileno(), 8)

    def set(self, step: int) -> None:
        self._map[:8] = struct.pack("<q", step)

    def get(self) -> int:
        value: int = struct.unpack("<q", self._map[:8])[0]
        return value

    def close(self) -> None:
        self._map.close()
        self._file.close()


def read_beacon(path: str | Path) -> int | None:
    try:
        with open(path, "rb") as f:
            value: int = struct.unpack("<q", f.read(8))[0]
            return value
    except (OSError, struct.error):
        return None


_STACK_FILES: list[Any] = []  # faulthandler writes to the fd: keep the files open


def install_worker_side(dump_dir: str | Path, rank: int) -> dict[str, str]:
    """Install the dump-on-signal handlers in this (worker) process; returns the dump paths."""
    d = Path(dump_dir)
    d.mkdir(parents=True, exist_ok=True)
    stacks = d / f"stacks-rank{rank}-pid{os.getpid()}.txt"
    allocations = d / f"allocations-rank{rank}-pid{os.getpid()}.txt"
    trigger = d / f"dump-request-rank{rank}-pid{os.getpid()}"
    f = open(stacks, "a")  # noqa: SIM115 - faulthandler needs it open for the process's life
    _STACK_FILES.append(f)
    faulthandler.register(STACKS_SIGNAL, file=f, all_threads=True, chain=False)

    # Python-level dumps need the GIL and, with signals, the main thread (Ray Train runs the
    # loop in another one), so a small thread answers a request file instead.
    def answer_requests() -> None:
        partial = allocations.with_suffix(".partial")
        while True:
            time.sleep(0.05)
            if not trigger.exists():
                continue
            try:  # written whole, then renamed: a reader never sees half a report
                partial.write_text(largest_allocations_report() + "\n" + python_stacks())
                partial.replace(allocations)
            except Exception as exc:  # never let a diagnostic kill the worker
                logger.warning("allocation dump failed: %s", exc)
            trigger.unlink(missing_ok=True)

    threading.Thread(target=answer_requests, name="skewless-memory-dumps", daemon=True).start()
    return {"stacks": str(stacks), "allocations": str(allocations), "trigger": str(trigger)}


def python_stacks() -> str:
    from runtime.gpu._oom import all_thread_stacks

    return "# python stacks\n" + all_thread_stacks()


def largest_allocations_report(top: int = 15) -> str:
    """The largest live numpy arrays and torch tensors (by bytes), plus tracemalloc's top sites."""
    sizes: list[tuple[int, str]] = []
    np_mod, torch_mod = sys.modules.get("numpy"), sys.modules.get("torch")
    # Arrays are not tracked by the GC themselves: find them through the containers that are.
    seen: set[int] = set()
    candidates = []
    for container in gc.get_objects():
        for obj in (container, *gc.get_referents(container)):
            if id(obj) not in seen:
                seen.add(id(obj))
                candidates.append(obj)
    for obj in candidates:
        try:
            # type(), not isinstance(): isinstance reads __class__, which lazy modules answer
            # with deprecation warnings (torch.distributed.reduce_op)
            kind = type(obj)
            if np_mod is not None and issubclass(kind, np_mod.ndarray) and obj.base is None:
                sizes.append((int(obj.nbytes), f"numpy.ndarray shape={obj.shape} dtype={obj.dtype}"))
            elif torch_mod is not None and issubclass(kind, torch_mod.Tensor):
                nbytes = obj.untyped_storage().nbytes()
                sizes.append((int(nbytes), f"torch.Tensor shape={tuple(obj.shape)} dtype={obj.dtype} {obj.device}"))
        except Exception:
            continue
    sizes.sort(reverse=True)
    lines = [
        f"# largest allocations, pid {os.getpid()}, {_dt.datetime.now(_dt.timezone.utc).isoformat()}",
        f"process RSS {process_rss() / _MB:,.1f} MiB; {len(sizes)} arrays/tensors live, "
        f"{sum(s for s, _ in sizes) / _MB:,.1f} MiB in total",
        "",
    ]
    lines += [f"{s / _MB:10,.1f} MiB  {what}" for s, what in sizes[:top]]
    import tracemalloc

    if tracemalloc.is_tracing():
        lines += ["", "# tracemalloc top sites"]
        for stat in tracemalloc.take_snapshot().statistics("lineno")[:top]:
            lines.append(f"{stat.size / _MB:10,.1f} MiB  {stat.traceback}")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ the watchdog


@dataclass
class _Watched:
    rank: int
    pid: int
    beacon: str
    dumps: dict[str, str]
    limit_source: str = ""
    last_usage: int = 0
    last_limit: int = 0
    last_rss: int = 0
    peak_fraction: float = 0.0
    oom_kills_before: int | None = None
    cgroup_path: str | None = None
    dumped_at: list[int] = field(default_factory=list)
    soft: bool = False
    killed_by_watchdog: bool = False


@dataclass
class Incident:
    rank: int
    pid: int
    step: int | None
    cause: str
    oom_killed: bool
    usage_bytes: int
    limit_bytes: int
    limit_source: str
    rss_bytes: int
    dumps: dict[str, str]
    time: str

    def summary(self) -> str:
        return (
            f"rank {self.rank} (pid {self.pid}) {self.cause} at step {self.step if self.step is not None else '?'}: "
            f"{self.usage_bytes / _MB:,.0f} MiB used of its {self.limit_bytes / _MB:,.0f} MiB limit "
            f"({self.limit_source}), RSS {self.rss_bytes / _MB:,.0f} MiB"
        )


class HostMemoryWatchdog:
    """Watches registered worker processes on this node; see the module docstring."""

    def __init__(
        self,
        diagnostics_dir: str | Path,
        soft_fraction: float = 0.9,
        poll_interval_s: float = 0.5,
        memory_limit_bytes: int | None = None,
        cgroup_name: str | None = None,
    ) -> None:
        self.diagnostics_dir = Path(diagnostics_dir)
        self.diagnostics_dir.mkdir(parents=True, exist_ok=True)
        self.soft_fraction = soft_fraction
        self.poll_interval_s = poll_interval_s
        self.memory_limit_bytes = memory_limit_bytes
        self.cgroup_name = cgroup_name or f"skewless-watchdog-{os.getpid()}"
        self.cgroups: dict[int, LimitedCgroup] = {}  # pid -> its own limited cgroup
        self.use_cgroups = False
        self.limit_note = ""
        if memory_limit_bytes:
            probe = try_create_limited_cgroup(f"{self.cgroup_name}-probe", memory_limit_bytes)
            self.use_cgroups = probe is not None
            if probe is not None:
                probe.remove()
            else:
                self.limit_note = (
                    f"memory_limit_bytes={memory_limit_bytes}: this machine does not let us create a memory "
                    "cgroup, so the watchdog enforces it itself (SIGKILL when a worker's RSS reaches it)"
                )
                logger.warning(self.limit_note)
        self.watched: dict[int, _Watched] = {}
        self.incidents: list[Incident] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- registration

    def register(self, rank: int, pid: int, beacon: str, dumps: dict[str, str]) -> str:
        """Watch ``pid``; returns the limit it is watched against, in words."""
        if self.use_cgroups:
            # One cgroup per worker: the limit is per worker, and the kernel's choice of whom
            # to kill cannot fall on a neighbour. Charges made before the move stay behind.
            assert self.memory_limit_bytes is not None
            cgroup = try_create_limited_cgroup(f"{self.cgroup_name}-rank{rank}-{pid}", self.memory_limit_bytes)
            if cgroup is not None:
                try:
                    cgroup.add(pid)
                    self.cgroups[pid] = cgroup
                except OSError as exc:  # e.g. across a delegation boundary: watch without it
                    logger.warning("rank %d (pid %d) not moved into %s: %s", rank, pid, cgroup.path, exc)
                    cgroup.remove()
        w = _Watched(rank=rank, pid=pid, beacon=beacon, dumps=dumps)
        cg = cgroup_memory(pid)
        if cg is not None:
            w.oom_kills_before, w.cgroup_path = cg.oom_kills, cg.path
        self._sample(w)
        with self._lock:
            self.watched[pid] = w
        return w.limit_source

    # -- the loop

    def start(self) -> HostMemoryWatchdog:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="skewless-host-watchdog", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.poll()  # a worker that died just before stop still gets its incident
        for pid, cgroup in list(self.cgroups.items()):
            # remove() moves a still-exiting worker back to the parent first
            try:
                cgroup.remove()
                del self.cgroups[pid]
            except OSError as exc:
                logger.warning("could not remove %s: %s", cgroup.path, exc)

    def watched_alive(self) -> list[int]:
        return [pid for pid in self.watched if _alive(pid)]

    def _run(self) -> None:
        while not self._stop.wait(self.poll_interval_s):
            try:
                self.poll()
            except Exception:  # the watchdog must outlive anything it watches
                logger.exception("watchdog poll failed")

    def poll(self) -> None:
        with self._lock:
            items = list(self.watched.items())
        for pid, w in items:
            if not _alive(pid):
                self._incident(w)
                with self._lock:
                    self.watched.pop(pid, None)
                continue
            self._sample(w)
            fraction = w.last_usage / w.last_limit if w.last_limit else 0.0
            w.peak_fraction = max(w.peak_fraction, fraction)
            if fraction >= self.soft_fraction and not w.soft:
                w.soft = True
                w.dumped_at.append(read_beacon(w.beacon) or -1)
                logger.warning(
                    "rank %d (pid %d) at %.0f%% of %s: asking it to dump stacks and allocations",
                    w.rank,
                    pid,
                    fraction * 100,
                    w.limit_source,
                )
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, STACKS_SIGNAL)
                if w.dumps.get("trigger"):
                    Path(w.dumps["trigger"]).touch()
            elif fraction < self.soft_fraction * 0.9:
                w.soft = False  # re-arm once it is well below the threshold again
            if self.enforces_limit and fraction >= 1.0:
                logger.error("rank %d (pid %d) reached memory_limit_bytes: killing it", w.rank, pid)
                w.killed_by_watchdog = True
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    @property
    def enforces_limit(self) -> bool:
        """True when no cgroup holds ``memory_limit_bytes`` and this watchdog kills at it."""
        return bool(self.memory_limit_bytes) and not self.use_cgroups

    def _sample(self, w: _Watched) -> None:
        try:
            w.last_rss = process_tree_rss(w.pid)
            if self.enforces_limit:
                assert self.memory_limit_bytes is not None
                w.last_usage, w.last_limit = w.last_rss, self.memory_limit_bytes
                w.limit_source = "memory_limit_bytes, enforced by the watchdog on RSS"
                return
            if w.pid in self.cgroups:  # ours: the limit that binds it, whatever the node's state
                cg = self.cgroups[w.pid].read()
                w.last_usage, w.last_limit, w.limit_source = cg.working_set, cg.limit or 0, cg.source
                return
            reading = memory_pressure(w.pid)
        except (OSError, ValueError):
            return
        w.last_usage, w.last_limit, w.limit_source = reading.usage, reading.limit, reading.source

    def _incident(self, w: _Watched) -> None:
        own = w.pid in self.cgroups  # its own cgroup: its counters are about it alone
        killed_in_cgroup = False
        if own or w.cgroup_path is not None:
            cg = self.cgroups[w.pid].read() if own else _read_cgroup_at(w.cgroup_path)
            if cg is not None and cg.oom_kills is not None:
                killed_in_cgroup = cg.oom_kills > (w.oom_kills_before or 0)
        near = bool(w.last_limit) and w.last_usage / w.last_limit >= self.soft_fraction
        # In a shared cgroup (or against the node) a kill may have been a neighbour's, and
        # high usage may be anyone's: claim an OOM for this worker only with both signs.
        oom = killed_in_cgroup if own else (killed_in_cgroup and near)
        near = near and (own or self.enforces_limit)
        if w.killed_by_watchdog:
            oom, cause = True, "was killed by the watchdog at its memory limit (SIGKILL, exit code 137)"
        elif oom:
            cause = "was killed by the kernel OOM killer (SIGKILL, exit code 137)"
        elif near:
            cause = "died at its memory limit (most likely the OOM killer: SIGKILL, exit code 137)"
        else:
            cause = "exited"
        incident = Incident(
            rank=w.rank,
            pid=w.pid,
            step=read_beacon(w.beacon),
            cause=cause,
            oom_killed=oom,
            usage_bytes=w.last_usage,
            limit_bytes=w.last_limit,
            limit_source=w.limit_source,
            rss_bytes=w.last_rss,
            dumps={
                k: v for k, v in w.dumps.items() if k != "trigger" and Path(v).exists() and Path(v).stat().st_size > 0
            },
            time=_dt.datetime.now(_dt.timezone.utc).isoformat(),
        )
        if not (oom or near):
            return  # a clean exit (or a crash unrelated to memory) is not ours to report
        self.incidents.append(incident)
        path = self.diagnostics_dir / f"incident-rank{w.rank}-pid{w.pid}.json"
        path.write_text(json.dumps(asdict(incident), indent=2))
        (self.diagnostics_dir / "REPORT.md").write_text(self.report())
        logger.error("host memory: %s; diagnostics in %s", incident.summary(), self.diagnostics_dir)

    def report(self) -> str:
        lines = ["# Host memory incidents", ""]
        for i in self.incidents:
            lines += [f"## {i.summary()}", ""]
            lines += [f"- dump: `{k}` {v}" for k, v in sorted(i.dumps.items())] or ["- no dump was written"]
            lines.append("")
        if self.limit_note:
            lines += [self.limit_note, ""]
        return "\n".join(lines)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except (OSError, IndexError):
        return False


def _read_cgroup_at(path: str | None) -> Any:
    """Re-read a cgroup whose member died (it may be gone with it)."""
    if path is None:
        return None
    from runtime.gpu._hostmem import CgroupLocation

    version = 2 if (Path(path) / "memory.current").exists() else 1
    try:
        return CgroupLocation(version=version, path=path, mount=str(Path(path).anchor)).read()
    except OSError:
        return None


# ------------------------------------------------------------------ Ray wiring


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
        return [asdict(i) | {"summary": i.summary()} for i in self.dog.incidents]

    def stop(self) -> list[dict[str, Any]]:
        self.dog.stop()
        return [asdict(i) | {"summary": i.summary()} for i in self.dog.incidents]


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

    def __getstate__(self) -> dict[str, Any]:
        return {"run": self.run, "diagnostics_dir": self.diagnostics_dir, "beacon": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
