"""Memory readings over time: a sampler thread, the allocator's counters, a plot, gauges.

Two sources, on purpose:

* :class:`MemorySampler`, a daemon thread, reads what the driver and kernel see (NVML
  device used/total, this process's NVML usage, RSS, the memory cgroup) every
  ``interval_s``. It calls nothing that synchronizes CUDA, so it never stalls the step.
* :func:`allocator_stats` reads PyTorch's caching-allocator counters (``torch.cuda.memory_stats``
  is a dict read, no sync): allocated vs reserved is what tells fragmentation from a real
  leak, and ``num_alloc_retries`` rising step after step is the allocator thrashing just
  before an OOM (:class:`ThrashDetector`). The sampler reads it with the rest; the training
  loop's memory tracker (``runtime.training.callbacks``) also reads it on each step it publishes.

Records are flat dicts whose keys are ``rss``, ``cgroup_usage``, ``cgroup_limit`` and
``cuda<N>/<kind>`` (``cuda<N>`` is torch's ``cuda:N``); byte values, except the counters in
:data:`COUNT_KINDS`. Summaries convert bytes to MiB with an ``_mb`` suffix.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

from runtime.errors import ConfigError, SkewlessError
from runtime.memory import _hostmem, _nvml

logger = logging.getLogger(__name__)

MIB = 2**20
COUNT_KINDS = frozenset({"num_alloc_retries", "num_ooms", "utilization"})
_ALLOCATOR_KEYS = {
    "allocated": "allocated_bytes.all.current",
    "reserved": "reserved_bytes.all.current",
    "peak_allocated": "allocated_bytes.all.peak",
    "num_alloc_retries": "num_alloc_retries",
    "num_ooms": "num_ooms",
}


def allocator_stats() -> dict[str, int]:
    """PyTorch caching-allocator counters per device in use; {} on CPU or before CUDA starts.

    Never initializes CUDA: torch is only consulted if something already imported it and
    CUDA is already initialized.
    """
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return {}
    current = torch.cuda.current_device()
    out: dict[str, int] = {}
    for index in range(torch.cuda.device_count()):
        stats = torch.cuda.memory_stats(index)
        if index != current and not stats.get("reserved_bytes.all.current"):
            continue  # a device this process never allocated on
        for kind, key in _ALLOCATOR_KEYS.items():
            out[f"cuda{index}/{kind}"] = int(stats.get(key, 0))
    return out


def host_stats(cgroup: _hostmem.CgroupLocation | None, pid: int | None = None) -> dict[str, int | None]:
    """This process's RSS and its memory cgroup's working set and limit."""
    out: dict[str, int | None] = {"rss": _hostmem.process_rss(pid), "cgroup_usage": None, "cgroup_limit": None}
    if cgroup is not None:
        try:
            reading = cgroup.read()
        except OSError:  # the cgroup went away; report no cgroup rather than fail
            return out
        out["cgroup_usage"], out["cgroup_limit"] = reading.working_set, reading.limit
    return out


def summarize(record: dict[str, Any]) -> dict[str, float]:
    """A record as a flat dict of floats: bytes become MiB (``_mb``), counters stay counts."""
    out = {}
    for key, value in record.items():
        if key in ("source", "t", "rank", "step") or not isinstance(value, (int, float)):
            continue
        kind = key.rsplit("/", 1)[-1]
        out[key if kind in COUNT_KINDS else f"{key}_mb"] = float(value) if kind in COUNT_KINDS else value / MIB
    return out


class MemorySampler:
    """Samples device and host memory on a daemon thread every ``interval_s`` seconds.

    ``sink`` receives each record (on the sampler thread); the last ``keep`` records stay in
    :attr:`samples`. ``devices`` defaults to :func:`runtime.memory.visible_devices`.
    """

    def __init__(
        self,
        interval_s: float = 1.0,
        rank: int = 0,
        devices: list[_nvml.GpuDevice] | None = None,
        sink: Any = None,
        keep: int = 10_000,
    ) -> None:
        if not interval_s > 0:
            raise ConfigError(f"interval_s ({interval_s!r}) must be > 0 seconds, e.g. 1.0")
        self.interval_s, self.rank, self.sink = interval_s, rank, sink
        self._devices = devices
        self._records: deque[dict[str, Any]] = deque(maxlen=keep)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._cgroup: _hostmem.CgroupLocation | None = None
        self._failed: set[str] = set()
        self.latest: dict[str, Any] | None = None

    @property
    def samples(self) -> list[dict[str, Any]]:
        return list(self._records)

    @property
    def devices(self) -> list[_nvml.GpuDevice]:
        if self._devices is None:
            try:
                self._devices = _nvml.visible_devices()
            except SkewlessError as exc:  # a bad CUDA_VISIBLE_DEVICES: watch the host only
                logger.warning("memory sampler watches no GPU: %s", exc)
                self._devices = []
        return self._devices

    def start(self) -> None:
        """Start the thread (a no-op when it is running)."""
        if self._thread is not None and self._thread.is_alive():
            return
        _ = self.devices  # resolve on the caller's thread, so a warning shows where it belongs
        self._cgroup = _hostmem.find_memory_cgroup()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=f"skewless-memory-sampler-{self.rank}", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the thread and wait for it (a no-op when it is not running)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None

    def _run(self) -> None:
        while True:
            self.sample_once()
            if self._stop.wait(self.interval_s):
                return

    def sample_once(self) -> dict[str, Any]:
        """Take one sample now, record it and hand it to the sink."""
        record: dict[str, Any] = {"source": "sampler", "t": time.time(), "rank": self.rank}
        record.update(self._guard("host", lambda: host_stats(self._cgroup)) or {})
        for device in self.devices:
            record.update(self._guard(device.label, lambda d=device: _device_stats(d)) or {})
        record.update(self._guard("allocator", allocator_stats) or {})  # a locked read: thread-safe
        self._records.append(record)
        self.latest = record
        if self.sink is not None:
            self._guard("sink", lambda: self.sink(record))
        return record

    def _guard(self, what: str, read: Any) -> Any:
        """Run one reading; a failure is logged once per source and skipped, never raised."""
        try:
            return read()
        except Exception as exc:
            if what not in self._failed:
                self._failed.add(what)
                logger.warning("memory sampler: reading %s failed (%s); skipping it", what, exc)
            return None


def _device_stats(device: _nvml.GpuDevice) -> dict[str, int | None]:
    mem = _nvml.memory(device)
    label = device.label
    return {
        f"{label}/nvml_used": mem.used,
        f"{label}/nvml_total": mem.total,
        f"{label}/nvml_process": _nvml.this_process_usage(device),
        f"{label}/utilization": _nvml.utilization(device),
    }


class ThrashDetector:
    """True when the allocator's retry count grew on each of the last ``window`` steps.

    A retry means the caching allocator freed its cache and tried again (``cudaFree`` +
    ``cudaMalloc``, a device sync); growing every step, the run is a step away from an OOM
    and already slow.
    """

    def __init__(self, window: int = 3) -> None:
        if window < 1:
            raise ConfigError(f"window ({window}) must be >= 1 step")
        self.window = window
        self._last: int | None = None
        self._growing = 0

    def update(self, num_alloc_retries: int) -> bool:
        if self._last is not None and num_alloc_retries > self._last:
            self._growing += 1
        else:
            self._growing = 0
        self._last = num_alloc_retries
        return self._growing >= self.window


_LIMIT_KINDS = ("cgroup_limit", "nvml_total")  # drawn dashed: the ceilings
_PLOTTED = {
    "host": ("rss", "cgroup_usage", "cgroup_limit"),
    "gpu": ("allocated", "reserved", "nvml_used", "nvml_process", "nvml_total"),
}


def plot_timeline(timeline: Path, png: Path, rank: int, max_points: int = 20_000) -> None:
    """Draw a timeline file: host memory, then one panel per GPU, in GiB over seconds."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    series: dict[str, tuple[list[float], list[float]]] = {}
    t0: float | None = None
    with timeline.open() as lines:
        for line in lines:
            record = json.loads(line)
            t0 = record["t"] if t0 is None else t0
            for key, value in record.items():
                if key not in ("source", "t", "rank", "step") and isinstance(value, (int, float)):
                    xs, ys = series.setdefault(key, ([], []))
                    xs.append(record["t"] - t0)
                    ys.append(value / 2**30)
    devices = sorted({k.split("/", 1)[0] for k in series if "/" in k})
    panels = [("host", "host", "")] + [(d, "gpu", f"{d}/") for d in devices]
    fig = Figure(figsize=(10, 3.2 * len(panels)), layout="constrained")
    FigureCanvasAgg(fig)
    for i, (title, group, prefix) in enumerate(panels):
        ax = fig.add_subplot(len(panels), 1, i + 1)
        for kind in _PLOTTED[group]:
            xs, ys = series.get(prefix + kind, ([], []))
            stride = max(1, len(xs) // max_points)
            if xs:
                ax.plot(xs[::stride], ys[::stride], label=kind, linestyle="--" if kind in _LIMIT_KINDS else "-")
        ax.set_title(f"rank {rank}: {title} memory")
        ax.set_ylabel("GiB")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(loc="upper left", fontsize="small")
    fig.axes[-1].set_xlabel("seconds since the first sample")
    fig.savefig(png, dpi=100)


# ---------------------------------------------------------------- Prometheus

_GAUGES = (
    ("skewless_memory_bytes", "Memory in bytes (host RSS/cgroup, CUDA allocator, NVML)"),
    ("skewless_memory_stat", "CUDA allocator retry/OOM counts and GPU utilization percent"),
)
_LABELS = ("rank", "device", "kind")
_gauges: dict[str, tuple[Any, Any]] = {}  # backend -> (bytes gauge, stat gauge), created once
_gauges_lock = threading.Lock()


def _gauge_pair(backend: str) -> tuple[Any, Any]:
    with _gauges_lock:
        if backend not in _gauges:
            if backend == "ray":
                from ray.util.metrics import Gauge as RayGauge

                _gauges[backend] = tuple(RayGauge(n, doc, _LABELS) for n, doc in _GAUGES)  # type: ignore[assignment]
            else:
                from prometheus_client import Gauge

                _gauges[backend] = tuple(Gauge(n, doc, _LABELS) for n, doc in _GAUGES)  # type: ignore[assignment]
        return _gauges[backend]


def _in_ray_worker() -> bool:
    import sys

    ray = sys.modules.get("ray")
    return ray is not None and bool(ray.is_initialized())


def set_gauges(rank: int, summary: dict[str, float]) -> None:
    """Publish a :func:`summarize` dict as gauges (device ``host`` for the host figures):
    on prometheus_client's default registry, and through Ray's metrics inside a Ray worker."""
    local = _gauge_pair("prometheus")
    on_ray = _gauge_pair("ray") if _in_ray_worker() else None
    for key, value in summary.items():
        device, _, kind = key.rpartition("/")
        device = device or "host"
        which = 0 if kind.endswith("_mb") else 1
        if which == 0:
            kind, value = kind[:-3], value * MIB
        local[which].labels(str(rank), device, kind).set(value)
        if on_ray is not None:
            on_ray[which].set(value, tags={"rank": str(rank), "device": device, "kind": kind})
