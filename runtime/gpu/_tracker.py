"""Memory tracking for a training run: a sampler thread, allocator stats per step, a report.

Two sources, on purpose:

* :class:`MemorySampler`, a daemon thread, reads what the driver and kernel see (NVML
  device used/total, this process's NVML usage, RSS, the memory cgroup) every
  ``interval_s``. It calls nothing that synchronizes CUDA, so it never stalls the step.
* :class:`MemoryTracker` reads PyTorch's caching-allocator counters at each step end
  (``torch.cuda.memory_stats`` is a dict read, no sync): allocated vs reserved is what
  tells fragmentation from a real leak, and ``num_alloc_retries`` rising step after step
  is the allocator thrashing just before an OOM (:class:`ThrashDetector`).

Records are flat dicts whose keys are ``rss``, ``cgroup_usage``, ``cgroup_limit`` and
``cuda<N>/<kind>`` (``cuda<N>`` is torch's ``cuda:N``); byte values, except the counters in
:data:`COUNT_KINDS`. Summaries convert bytes to MiB with an ``_mb`` suffix.
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

from runtime.errors import ConfigError, SkewlessError
from runtime.gpu import _hostmem, _nvml
from runtime.training._events import Callback, LoopState

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
    :attr:`samples`. ``devices`` defaults to :func:`runtime.gpu.visible_devices`.
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


class MemoryTracker(Callback):
    """Tracks memory over a training run and writes a report when it ends.

    On each ``log_every_steps``-th step the latest values go to MLflow (when
    ``mlflow_run_id`` is given; keys ``mem/rank<r>/...``) and to Prometheus gauges
    (``skewless_memory_bytes`` / ``skewless_memory_stat``, labels rank, device, kind, on the
    default registry). ``state.extra["memory"]`` holds the latest summary after every step.
    At run end: ``memory_timeline_rank<r>.jsonl``, ``memory_rank<r>.png`` and
    ``memory_report_rank<r>.json`` in ``output_dir`` (and under ``memory/`` in MLflow).
    """

    def __init__(
        self,
        interval_s: float = 1.0,
        output_dir: str | None = None,
        mlflow_run_id: str | None = None,
        tracking_uri: str | None = None,
        prometheus: bool = True,
        log_every_steps: int = 50,
    ) -> None:
        if not interval_s > 0:
            raise ConfigError(f"interval_s ({interval_s!r}) must be > 0 seconds, e.g. 1.0")
        if log_every_steps < 1:
            raise ConfigError(f"log_every_steps ({log_every_steps}) must be >= 1")
        self.interval_s, self.output_dir = interval_s, output_dir
        self.mlflow_run_id, self.tracking_uri = mlflow_run_id, tracking_uri
        self.prometheus, self.log_every_steps = prometheus, log_every_steps
        self.report_paths: dict[str, Path] = {}
        self.peaks: dict[str, float] = {}
        self._reset_runtime()

    def _reset_runtime(self) -> None:
        # Everything a run creates; left out of pickles (Ray ships callbacks to workers).
        self._lock = threading.Lock()
        self._sampler: MemorySampler | None = None
        self._cgroup: _hostmem.CgroupLocation | None = None
        self._timeline: Any = None
        self._client: Any = None  # MlflowClient, made on first use
        self._rank = 0
        self._raw_peaks: dict[str, float] = {}
        self._last_step: dict[str, Any] = {}
        self._counts = {"sampler": 0, "step": 0}
        self._warned: set[str] = set()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        for key in ("_lock", "_sampler", "_timeline", "_client"):
            del state[key]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock, self._sampler, self._timeline, self._client = threading.Lock(), None, None, None

    # ------------------------------------------------------------ events

    def on_run_start(self, state: LoopState) -> None:
        if self._sampler is not None:  # a run that never reached on_run_end
            self._sampler.stop()
        self._reset_runtime()
        self._rank = state.rank
        directory = Path(self.output_dir or tempfile.mkdtemp(prefix="skewless-memory-"))
        directory.mkdir(parents=True, exist_ok=True)
        self.output_dir = str(directory)
        self.report_paths = {"timeline": directory / f"memory_timeline_rank{state.rank}.jsonl"}
        self._timeline = self.report_paths["timeline"].open("w")
        self._cgroup = _hostmem.find_memory_cgroup()
        self._sampler = MemorySampler(self.interval_s, rank=state.rank, sink=self._record)
        self._sampler.start()

    def on_step_end(self, state: LoopState) -> None:
        stats = allocator_stats()  # a host-side counter read: no CUDA synchronization
        publish = state.step % self.log_every_steps == 0 or "memory" not in state.extra
        # Without a CUDA allocator the host figures (RSS, cgroup) are what can run out; the
        # background sampler has them, so a step reads /proc only when it publishes (reading
        # it every step cost 0.4 ms, more than a small step's own 10%).
        if stats or publish:
            record: dict[str, Any] = {"source": "step", "t": time.time(), "rank": state.rank, "step": state.step}
            record.update(stats or host_stats(self._cgroup))
            self._record(record)
            self._last_step = record
        if publish:
            summary = self.summary()
            state.extra["memory"] = summary
            self._publish(summary, state.step)

    def on_run_end(self, state: LoopState) -> None:
        if self._sampler is None:
            return  # never started
        self._sampler.stop()
        self._sampler.sample_once()  # a short run still gets a closing sample
        summary = self.summary()
        state.extra["memory"] = summary
        self._publish(summary, state.step)
        with self._lock:
            self._timeline.close()
        self._write_report()
        self._sampler = None

    # ------------------------------------------------------------ records and output

    def summary(self) -> dict[str, float]:
        """The latest sampler values overlaid with the latest step's, as MiB / counts."""
        latest = dict(self._sampler.latest or {}) if self._sampler else {}
        latest.update(self._last_step)
        return summarize(latest)

    def _record(self, record: dict[str, Any]) -> None:
        line = json.dumps(record)
        with self._lock:
            self._counts[record["source"]] += 1
            for key, value in record.items():
                if key not in ("t", "rank", "step") and isinstance(value, (int, float)):
                    self._raw_peaks[key] = max(value, self._raw_peaks.get(key, value))
            if self._timeline is not None and not self._timeline.closed:
                self._timeline.write(line + "\n")
                if record["source"] == "sampler":
                    self._timeline.flush()

    def _publish(self, summary: dict[str, float], step: int) -> None:
        if self.prometheus:
            self._safely("prometheus", lambda: set_gauges(self._rank, summary))
        if self.mlflow_run_id:
            self._safely("mlflow", lambda: self._log_mlflow(summary, step))

    def _safely(self, what: str, action: Any) -> None:
        """Publishing must not end a training run: warn once per target, keep going."""
        try:
            action()
        except Exception as exc:
            if what not in self._warned:
                self._warned.add(what)
                logger.warning("memory tracker: publishing to %s failed (%s); will keep trying", what, exc)

    def _log_mlflow(self, summary: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(f"mem/rank{self._rank}/{k}", v, now, step) for k, v in sorted(summary.items())]
        self._mlflow().log_batch(self.mlflow_run_id or "", metrics=metrics)

    def _mlflow(self) -> Any:
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(self.tracking_uri)
        return self._client

    def _write_report(self) -> None:
        directory = Path(self.output_dir or ".")
        rank = self._rank
        self.peaks = summarize(self._raw_peaks)
        png = directory / f"memory_rank{rank}.png"
        try:
            plot_timeline(self.report_paths["timeline"], png, rank)
            self.report_paths["plot"] = png
        except Exception as exc:  # matplotlib missing or broken: the data is still there
            logger.warning("memory tracker: no plot (%s)", exc)
        report = directory / f"memory_report_rank{rank}.json"
        report.write_text(
            json.dumps(
                {
                    "rank": rank,
                    "interval_s": self.interval_s,
                    "samples": self._counts["sampler"],
                    "step_records": self._counts["step"],
                    "peaks": self.peaks,
                    "files": {k: p.name for k, p in self.report_paths.items()},
                },
                indent=2,
                sort_keys=True,
            )
        )
        self.report_paths["report"] = report
        if self.mlflow_run_id:
            self._safely("mlflow", self._log_artifacts)

    def _log_artifacts(self) -> None:
        client = self._mlflow()
        for path in self.report_paths.values():
            client.log_artifact(self.mlflow_run_id or "", str(path), artifact_path="memory")


# ---------------------------------------------------------------- plot

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
