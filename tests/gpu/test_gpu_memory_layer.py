"""The GPU memory layer on a real CUDA device: NVML agrees with torch, budgets bite, the tracker reports."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from runtime.memory import (
    GpuBudget,
    MemorySampler,
    allocator_stats,
    apply_budget,
    budget_usage,
    gpu_available,
    memory,
    no_gpu_reason,
    this_process_usage,
    visible_devices,
)
from runtime.training import LoopState
from runtime.training.callbacks import MemoryTracker

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

MIB, GIB = 2**20, 2**30


@pytest.fixture(autouse=True)
def clean_cuda() -> Iterator[None]:
    yield
    torch.cuda.set_per_process_memory_fraction(1.0, 0)
    torch.cuda.empty_cache()


def test_nvml_sees_the_devices_torch_uses() -> None:
    assert gpu_available(), no_gpu_reason()
    devices = visible_devices()
    assert len(devices) == torch.cuda.device_count()
    props = torch.cuda.get_device_properties(0)
    assert devices[0].label == "cuda0"
    if getattr(props, "uuid", None) is not None:  # torch's UUID has no GPU-/MIG- prefix
        assert devices[0].uuid.endswith(str(props.uuid))
    total = memory(devices[0]).total
    assert abs(total - props.total_memory) <= 0.05 * total  # NVML counts memory the driver keeps


def test_nvml_and_the_allocator_see_an_allocation() -> None:
    device = visible_devices()[0]
    torch.ones(1, device="cuda")  # the CUDA context first, so it is not counted below
    torch.cuda.synchronize()
    before = memory(device).used
    block = torch.ones(2 * GIB // 4, device="cuda")
    torch.cuda.synchronize()
    assert memory(device).used - before >= 1.9 * GIB
    own = this_process_usage(device)
    if own is not None:  # None when NVML lists host pids (a container)
        assert own >= 2 * GIB
    stats = allocator_stats()
    assert stats["cuda0/allocated"] >= 2 * GIB
    assert stats["cuda0/reserved"] >= stats["cuda0/allocated"]
    del block


def test_a_budget_caps_the_allocator() -> None:
    budget = apply_budget(0.25)
    assert budget is not None and budget.device == torch.cuda.current_device()
    limit = budget.budget_bytes()
    assert limit == GpuBudget(0.25).budget_bytes(torch.cuda.get_device_properties(0).total_memory)
    inside = torch.empty(limit // 2, dtype=torch.uint8, device="cuda")  # below the budget: fine
    usage = budget_usage(budget)
    assert usage.within_budget and usage.torch_reserved <= limit
    with pytest.raises(torch.cuda.OutOfMemoryError):
        torch.empty(limit // 2 + 256 * MIB, dtype=torch.uint8, device="cuda")  # together past it
    del inside


def test_the_sampler_never_initializes_cuda() -> None:
    # A sampler that created a CUDA context could also synchronize one; NVML needs neither.
    code = (
        "import time, torch; from runtime.memory import MemorySampler; s = MemorySampler(0.02); s.start(); "
        "time.sleep(0.3); s.stop(); assert s.samples[-1]['cuda0/nvml_used'] > 0; "
        "assert not torch.cuda.is_initialized(), 'the sampler initialized CUDA'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_tracker_report_on_gpu(tmp_path: Path) -> None:
    tracker = MemoryTracker(interval_s=0.05, output_dir=str(tmp_path), prometheus=False, log_every_steps=1)
    state = LoopState(rank=0, world_size=1, epochs=1, batch_size=8, micro_batch_size=8)
    tracker.on_run_start(state)
    blocks = []
    for step in (1, 2, 3):
        blocks.append(torch.ones(256 * MIB // 4, device="cuda"))
        state.step = step
        tracker.on_step_end(state)
    assert state.extra["memory"]["cuda0/allocated_mb"] >= 768
    sampler = tracker._sampler
    assert isinstance(sampler, MemorySampler)
    tracker.on_run_end(state)
    peaks = json.loads(tracker.report_paths["report"].read_text())["peaks"]
    assert peaks["cuda0/allocated_mb"] >= 768 and peaks["cuda0/peak_allocated_mb"] >= 768
    assert peaks["cuda0/nvml_used_mb"] >= 768
    assert peaks["cuda0/nvml_total_mb"] > peaks["cuda0/nvml_used_mb"]
    assert tracker.report_paths["plot"].read_bytes().startswith(b"\x89PNG")
    del blocks
