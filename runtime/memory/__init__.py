"""Memory you can see: NVML, host memory and cgroups, samplers, dumps, a watchdog, GPU budgets.

A leaf package: it imports nothing from training or serving, and ``import runtime.memory``
works on a machine without torch, pynvml or a driver (those are imported inside the
functions that need them, and torch only when the caller already imported it).

- :mod:`._nvml`: GPUs as NVML sees them (one init, cached handles, ``CUDA_VISIBLE_DEVICES``
  indices / UUIDs / MIG UUIDs mapped, never a silent device 0).
- :mod:`._hostmem`: /proc and cgroup v1/v2 readers; limited child cgroups.
- :mod:`._sampler`: a background sampler, the caching allocator's counters, a thrash
  detector, the timeline plot and Prometheus gauges.
- :mod:`._diagnostics`: what a process dumps about itself (stacks, largest allocations,
  NVML and host reports) and the step beacon.
- :mod:`._watchdog`: the node poller that watches other processes' memory.
- :mod:`._budget`: fractional-GPU budgets and the packing check.
"""

from __future__ import annotations

from runtime.memory._budget import (
    DEFAULT_CONTEXT_HEADROOM,
    BudgetUsage,
    GpuBudget,
    PackingPlan,
    ReplicaBudget,
    ReplicaDemand,
    apply_budget,
    budget_usage,
    check_packing,
)
from runtime.memory._diagnostics import (
    STACKS_SIGNAL,
    StepBeacon,
    all_thread_stacks,
    host_memory_report,
    install_worker_side,
    largest_allocations_report,
    nvml_report,
    private_diagnostics_dir,
    python_stacks,
    read_beacon,
)
from runtime.memory._hostmem import (
    CgroupLocation,
    CgroupMemory,
    CgroupPermissionError,
    LimitedCgroup,
    MemoryReading,
    cgroup_memory,
    create_limited_cgroup,
    effective_limit,
    find_memory_cgroup,
    memory_pressure,
    node_memory,
    process_rss,
    process_tree_rss,
    try_create_limited_cgroup,
)
from runtime.memory._nvml import (
    DeviceMemory,
    GpuDevice,
    gpu_available,
    memory,
    no_gpu_reason,
    process_usage,
    shutdown,
    this_process_usage,
    utilization,
    visible_devices,
)
from runtime.memory._sampler import (
    COUNT_KINDS,
    MIB,
    MemorySampler,
    ThrashDetector,
    allocator_stats,
    host_stats,
    plot_timeline,
    set_gauges,
    summarize,
)
from runtime.memory._watchdog import HostMemoryWatchdog, Incident

__all__ = [
    "COUNT_KINDS",
    "DEFAULT_CONTEXT_HEADROOM",
    "MIB",
    "STACKS_SIGNAL",
    "BudgetUsage",
    "CgroupLocation",
    "CgroupMemory",
    "CgroupPermissionError",
    "DeviceMemory",
    "GpuBudget",
    "GpuDevice",
    "HostMemoryWatchdog",
    "Incident",
    "LimitedCgroup",
    "MemoryReading",
    "MemorySampler",
    "PackingPlan",
    "ReplicaBudget",
    "ReplicaDemand",
    "StepBeacon",
    "ThrashDetector",
    "all_thread_stacks",
    "allocator_stats",
    "apply_budget",
    "budget_usage",
    "cgroup_memory",
    "check_packing",
    "create_limited_cgroup",
    "effective_limit",
    "find_memory_cgroup",
    "gpu_available",
    "host_memory_report",
    "host_stats",
    "install_worker_side",
    "largest_allocations_report",
    "memory",
    "memory_pressure",
    "no_gpu_reason",
    "node_memory",
    "nvml_report",
    "plot_timeline",
    "private_diagnostics_dir",
    "process_rss",
    "process_tree_rss",
    "process_usage",
    "python_stacks",
    "read_beacon",
    "set_gauges",
    "shutdown",
    "summarize",
    "this_process_usage",
    "try_create_limited_cgroup",
    "utilization",
    "visible_devices",
]
