"""The memory tracker: samples memory over a run and reports it per step and at the end."""

from __future__ import annotations

import json
import logging
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from runtime.errors import ConfigError
from runtime.memory import (
    CgroupLocation,
    MemorySampler,
    allocator_stats,
    find_memory_cgroup,
    host_stats,
    plot_timeline,
    set_gauges,
    summarize,
)
from runtime.registry import RunLogger
from runtime.training.callbacks._base import Callback, LoopState

logger = logging.getLogger(__name__)


class MemoryTracker(Callback):
    """Tracks memory over a training run and writes a report when it ends.

    On each ``log_every_steps``-th step the latest values go to MLflow (through ``run_logger``
    when given; keys ``mem/rank<r>/...``) and to Prometheus gauges
    (``skewless_memory_bytes`` / ``skewless_memory_stat``, labels rank, device, kind, on the
    default registry). ``state.extra["memory"]`` holds the latest summary after every step.
    At run end: ``memory_timeline_rank<r>.jsonl``, ``memory_rank<r>.png`` and
    ``memory_report_rank<r>.json`` in ``output_dir`` (and under ``memory/`` in MLflow).
    """

    def __init__(
        self,
        interval_s: float = 1.0,
        output_dir: str | None = None,
        run_logger: RunLogger | None = None,
        prometheus: bool = True,
        log_every_steps: int = 50,
    ) -> None:
        if not interval_s > 0:
            raise ConfigError(f"interval_s ({interval_s!r}) must be > 0 seconds, e.g. 1.0")
        if log_every_steps < 1:
            raise ConfigError(f"log_every_steps ({log_every_steps}) must be >= 1")
        self.interval_s, self.output_dir = interval_s, output_dir
        self.run_logger = run_logger
        self.prometheus, self.log_every_steps = prometheus, log_every_steps
        self.report_paths: dict[str, Path] = {}
        self.peaks: dict[str, float] = {}
        self._reset_runtime()

    def _reset_runtime(self) -> None:
        # Everything a run creates; left out of pickles (Ray ships callbacks to workers).
        self._lock = threading.Lock()
        self._sampler: MemorySampler | None = None
        self._cgroup: CgroupLocation | None = None
        self._timeline: Any = None
        self._rank = 0
        self._raw_peaks: dict[str, float] = {}
        self._last_step: dict[str, Any] = {}
        self._counts = {"sampler": 0, "step": 0}
        self._warned: set[str] = set()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        for key in ("_lock", "_sampler", "_timeline"):
            del state[key]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock, self._sampler, self._timeline = threading.Lock(), None, None

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
        self._cgroup = find_memory_cgroup()
        self._sampler = MemorySampler(self.interval_s, rank=state.rank, sink=self._record)
        self._sampler.start()

    def on_step_end(self, state: LoopState) -> None:
        # Only on publishing steps (and the first): reading the allocator's counters builds a
        # dict of ~100 entries (70-130 µs, 5% of a 2 ms GPU step if done every step), and
        # /proc costs more. Nothing is lost between reads: the allocator keeps its own peak
        # (peak_allocated), and the background sampler reads everything every interval_s.
        if state.step % self.log_every_steps and "memory" in state.extra:
            return
        record: dict[str, Any] = {"source": "step", "t": time.time(), "rank": state.rank, "step": state.step}
        record.update(allocator_stats() or host_stats(self._cgroup))  # no CUDA synchronization
        self._record(record)
        self._last_step = record
        summary = self.summary()
        state.extra["memory"] = summary
        self._publish(summary, state.step)

    def on_run_end(self, state: LoopState) -> None:
        if self._sampler is None:
            return  # never started
        self._sampler.stop()  # first: the thread must not outlive a failed run
        try:
            self._sampler.sample_once()  # a short run still gets a closing sample
            summary = self.summary()
            state.extra["memory"] = summary
            self._publish(summary, state.step)
        finally:
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
        if self.run_logger is not None:  # never raises: retries, then carries on
            # frequent samples: not worth holding through an outage (the timeline file has them)
            self.run_logger.log_metrics({f"mem/rank{self._rank}/{k}": v for k, v in summary.items()}, step, hold=False)

    def _safely(self, what: str, action: Any) -> None:
        """Publishing must not end a training run: warn once per target, keep going."""
        try:
            action()
        except Exception as exc:
            if what not in self._warned:
                self._warned.add(what)
                logger.warning("memory tracker: publishing to %s failed (%s); will keep trying", what, exc)

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
        if self.run_logger is not None:
            for path in self.report_paths.values():
                self.run_logger.log_artifact(path, "memory")


# ---------------------------------------------------------------- plot
