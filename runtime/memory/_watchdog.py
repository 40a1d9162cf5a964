"""The host-memory watchdog's node poller: it lives outside the training workers, because the
kernel's OOM killer sends SIGKILL, which no process can catch or report on itself.

:class:`HostMemoryWatchdog` (run in a Ray actor started with the job, see
``runtime.training.callbacks``, or anywhere) polls each registered worker's memory cgroup
(v2 ``memory.current``/``max``/``events``, v1 ``usage_in_bytes``/``limit_in_bytes``/
``oom_control``) or the node's memory, and each worker's RSS. Above ``soft_fraction`` of the
limit it asks the worker to dump its stacks and largest allocations (the worker side is
:mod:`runtime.memory._diagnostics`), once per crossing. When a worker disappears it reads
the cgroup's ``oom_kill`` counter, and writes an incident (``incident-rank<r>.json`` and
``REPORT.md``): which rank, at which step, how much memory against which limit, where the
dumps are.

With ``memory_limit_bytes`` it also puts the registered workers in a child memory cgroup
with that limit (where the machine lets us create one), so a runaway worker is killed by
the kernel at a known limit instead of taking down the node.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import os
import signal
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from runtime.memory._diagnostics import STACKS_SIGNAL, read_beacon
from runtime.memory._hostmem import (
    CgroupLocation,
    LimitedCgroup,
    cgroup_memory,
    memory_pressure,
    process_tree_rss,
    try_create_limited_cgroup,
)

logger = logging.getLogger(__name__)
_MB = 1 << 20


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

    def to_dict(self) -> dict[str, Any]:
        """JSON-able, with :meth:`summary` under ``"summary"`` (what crosses a Ray call)."""
        return asdict(self) | {"summary": self.summary()}

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
    version = 2 if (Path(path) / "memory.current").exists() else 1
    try:
        return CgroupLocation(version=version, path=path, mount=str(Path(path).anchor)).read()
    except OSError:
        return None


# ------------------------------------------------------------------ Ray wiring
