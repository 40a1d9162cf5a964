"""The memory sampler and tracker on CPU, for real: /proc, a sqlite MLflow store, Prometheus text."""

from __future__ import annotations

import json
import logging
import pickle
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import runtime.memory
from runtime.errors import ConfigError
from runtime.memory import MemorySampler, ThrashDetector, allocator_stats, set_gauges, summarize
from runtime.registry import RunLogger
from runtime.training import LoopState
from runtime.training.callbacks import MemoryTracker
from tests.conftest import wait_for_condition

MIB = 2**20


@pytest.fixture(scope="module")
def mlflow_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Any, str]:
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root}/mlflow.db"
    client = MlflowClient(uri)
    experiment = client.create_experiment("memory", artifact_location=(root / "artifacts").as_uri())
    return uri, client, experiment


def _state(rank: int = 0) -> LoopState:
    return LoopState(rank=rank, world_size=2, epochs=1, batch_size=8, micro_batch_size=8)


def _gauge(family: str, **labels: str) -> float | None:
    text = generate_latest(REGISTRY).decode()
    for metric in text_string_to_metric_families(text):
        if metric.name == family:
            for sample in metric.samples:
                if sample.labels == labels:
                    return float(sample.value)
    return None


def _sampler_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("skewless-memory-sampler")]


def test_sampler_sees_rss_rise_and_stops() -> None:
    sampler = MemorySampler(interval_s=0.05)
    sampler.start()
    sampler.start()  # idempotent: still one thread
    assert len(_sampler_threads()) == 1
    wait_for_condition(lambda: len(sampler.samples) >= 3, timeout=5, interval=0.02, message="3 samples")
    base = sampler.samples[0]["rss"]
    block = np.ones(150 * MIB // 8)
    wait_for_condition(
        lambda: sampler.latest and sampler.latest["rss"] >= base + 140 * MIB, timeout=5, interval=0.02, message="rss"
    )
    sampler.stop()
    sampler.stop()  # idempotent
    assert _sampler_threads() == []
    samples = sampler.samples
    times = [s["t"] for s in samples]
    assert times == sorted(times) and len(samples) >= 4
    assert {s["source"] for s in samples} == {"sampler"} and {s["rank"] for s in samples} == {0}
    assert max(s["rss"] for s in samples) - samples[0]["rss"] >= 140 * MIB
    assert all("cgroup_usage" in s and "cgroup_limit" in s for s in samples)
    assert not any(k.startswith("cuda") for s in samples for k in s)  # no GPU here
    del block


def test_memory_tracker_run_writes_the_report_and_publishes(tmp_path: Path, mlflow_store: tuple[str, Any, str]) -> None:
    uri, client, experiment = mlflow_store
    run_id = client.create_run(experiment).info.run_id
    tracker = MemoryTracker(
        interval_s=0.05, output_dir=str(tmp_path / "out"), run_logger=RunLogger(uri, run_id), log_every_steps=2
    )
    state = _state(rank=1)
    tracker.on_run_start(state)
    blocks = []
    for step in (1, 2, 3):
        blocks.append(np.ones(40 * MIB // 8))
        state.step = step
        tracker.on_step_end(state)
        assert state.extra["memory"]["rss_mb"] > 0
    wait_for_condition(lambda: tracker._sampler and len(tracker._sampler.samples) >= 2, timeout=5, interval=0.02)
    tracker.on_run_end(state)
    assert _sampler_threads() == []

    # The three files, in output_dir.
    assert set(tracker.report_paths) == {"timeline", "plot", "report"}
    assert [p.name for p in tracker.report_paths.values()] == [
        "memory_timeline_rank1.jsonl",
        "memory_rank1.png",
        "memory_report_rank1.json",
    ]
    records = [json.loads(line) for line in tracker.report_paths["timeline"].read_text().splitlines()]
    steps = [r for r in records if r["source"] == "step"]
    assert [r["step"] for r in steps] == [1, 2]  # on CPU: the first step and each publishing one
    assert all("rss" in r and "cgroup_usage" in r for r in steps)  # the CPU record: RSS + cgroup
    assert sum(r["source"] == "sampler" for r in records) >= 3  # the sampler's, plus the closing one
    assert steps[-1]["rss"] - steps[0]["rss"] >= 30 * MIB
    assert tracker.report_paths["plot"].read_bytes().startswith(b"\x89PNG")
    report = json.loads(tracker.report_paths["report"].read_text())
    assert report["peaks"] == tracker.peaks
    assert report["rank"] == 1 and report["step_records"] == 2 and report["samples"] >= 3
    assert tracker.peaks["rss_mb"] >= max(r["rss"] for r in records) / MIB
    assert set(state.extra["memory"]) <= set(tracker.peaks)

    # MLflow: the summary every 2nd step and at the end, the files under memory/.
    history = client.get_metric_history(run_id, "mem/rank1/rss_mb")
    assert [m.step for m in history] == [1, 2, 3]  # the first step, every 2nd, and the run end
    assert all(m.value > 0 for m in history)
    artifacts = {Path(f.path).name for f in client.list_artifacts(run_id, "memory")}
    assert artifacts == {"memory_timeline_rank1.jsonl", "memory_rank1.png", "memory_report_rank1.json"}

    # Prometheus: the last published values, in the text format a scraper reads.
    rss = _gauge("skewless_memory_bytes", rank="1", device="host", kind="rss")
    assert rss == pytest.approx(state.extra["memory"]["rss_mb"] * MIB)


def test_publishing_failures_warn_and_never_stop_the_run(
    tmp_path: Path, mlflow_store: tuple[str, Any, str], caplog: pytest.LogCaptureFixture
) -> None:
    uri, _, _ = mlflow_store
    logger = RunLogger(uri, "0" * 32, attempts=2, backoff_s=0.01, cooldown_s=0.0)  # a run that does not exist
    tracker = MemoryTracker(interval_s=0.05, output_dir=str(tmp_path), run_logger=logger)
    state = _state()
    with caplog.at_level(logging.WARNING, logger="runtime.registry._run_logger"):
        tracker.on_run_start(state)
        for step in (50, 100):
            state.step = step
            tracker.on_step_end(state)
        tracker.on_run_end(state)
    warnings = [r.getMessage() for r in caplog.records if "training goes on" in r.getMessage()]
    assert [w.split(": logging ")[1].split(" ")[0] for w in warnings] == ["metrics", "artifacts"]  # once per kind
    assert logger.failures >= 4 and logger.pending == 0  # every call failed; memory samples are not held
    assert tracker.report_paths["report"].exists()


def test_tracker_pickles_before_and_during_a_run(tmp_path: Path) -> None:
    tracker = MemoryTracker(interval_s=0.05, output_dir=str(tmp_path), prometheus=False)
    copy = pickle.loads(pickle.dumps(tracker))
    assert (copy.interval_s, copy.output_dir, copy.prometheus) == (0.05, str(tmp_path), False)
    tracker.on_run_start(_state())
    try:
        running = pickle.loads(pickle.dumps(tracker))
        assert running._sampler is None and running._timeline is None
    finally:
        tracker.on_run_end(_state())


def test_default_output_dir_is_a_fresh_temp_dir() -> None:
    tracker = MemoryTracker(interval_s=0.05, prometheus=False)
    tracker.on_run_start(_state())
    tracker.on_run_end(_state())
    assert tracker.output_dir is not None and Path(tracker.output_dir).name.startswith("skewless-memory-")
    assert all(p.parent == Path(tracker.output_dir) for p in tracker.report_paths.values())


def test_arguments_are_checked() -> None:
    with pytest.raises(ConfigError, match=r"interval_s \(0\) must be > 0"):
        MemoryTracker(interval_s=0)
    with pytest.raises(ConfigError, match=r"log_every_steps \(0\) must be >= 1"):
        MemoryTracker(log_every_steps=0)
    with pytest.raises(ConfigError, match=r"window \(0\) must be >= 1"):
        ThrashDetector(window=0)


def test_summary_units_and_gauge_labels() -> None:
    record = {"source": "step", "t": 1.0, "rank": 0, "step": 7, "rss": 2 * MIB, "cgroup_limit": None}
    record |= {"cuda0/allocated": MIB, "cuda0/num_alloc_retries": 4, "cuda0/utilization": 37}
    summary = summarize(record)
    assert summary == {
        "rss_mb": 2.0,
        "cuda0/allocated_mb": 1.0,
        "cuda0/num_alloc_retries": 4.0,
        "cuda0/utilization": 37.0,
    }
    set_gauges(5, summary)
    assert _gauge("skewless_memory_bytes", rank="5", device="cuda0", kind="allocated") == MIB
    assert _gauge("skewless_memory_stat", rank="5", device="cuda0", kind="num_alloc_retries") == 4.0


def test_allocator_stats_are_empty_without_cuda() -> None:
    assert allocator_stats() == {}


def test_thrash_detector() -> None:
    detector = ThrashDetector(window=3)
    assert [detector.update(n) for n in (0, 0, 1, 2, 3, 4, 4, 5)] == [
        False,  # no previous step
        False,
        False,  # grew once
        False,  # twice
        True,  # on each of the last 3 steps
        True,
        False,  # flat: the streak ends
        False,
    ]


def test_import_stays_cheap() -> None:
    code = (
        "import sys, runtime.memory; heavy = [m for m in ('torch', 'pynvml', 'matplotlib', 'mlflow', 'ray') "
        "if m in sys.modules]; assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    assert all(hasattr(runtime.memory, name) for name in runtime.memory.__all__)


def test_public_surface_is_locked() -> None:
    assert set(runtime.memory.__all__) == {
        # NVML
        "DeviceMemory", "GpuDevice", "gpu_available", "memory", "no_gpu_reason", "process_usage", "shutdown",
        "this_process_usage", "utilization", "visible_devices",
        # host memory
        "CgroupLocation", "CgroupMemory", "CgroupPermissionError", "LimitedCgroup", "MemoryReading", "cgroup_memory",
        "create_limited_cgroup", "effective_limit", "find_memory_cgroup", "memory_pressure", "node_memory",
        "process_rss", "process_tree_rss", "try_create_limited_cgroup",
        # sampling
        "COUNT_KINDS", "MIB", "MemorySampler", "ThrashDetector", "allocator_stats", "host_stats", "plot_timeline",
        "set_gauges", "summarize",
        # dumps and the host-memory watchdog's poller
        "STACKS_SIGNAL", "StepBeacon", "all_thread_stacks", "host_memory_report", "install_worker_side",
        "largest_allocations_report", "nvml_report", "private_diagnostics_dir", "python_stacks", "read_beacon",
        "HostMemoryWatchdog", "Incident",
        # budgets
        "DEFAULT_CONTEXT_HEADROOM", "BudgetUsage", "GpuBudget", "PackingPlan", "ReplicaBudget", "ReplicaDemand",
        "apply_budget", "budget_usage", "check_packing",
    }  # fmt: skip
