"""GPU and host memory: NVML sampling, /proc and cgroup readers, run tracking, fractional budgets.

``import runtime.gpu`` stays cheap and works on a machine without torch, pynvml or a
driver: those are imported inside the functions that need them. The training-callback
names (:class:`MemoryTracker`, :class:`MemorySampler`, :class:`ThrashDetector`) load on
first use, because the callback base lives in :mod:`runtime.training`, which imports torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from runtime.gpu._budget import (
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
from runtime.gpu._hostmem import (
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
from runtime.gpu._nvml import (
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

if TYPE_CHECKING:
    from runtime.gpu._oom import OomGuard
    from runtime.gpu._tracker import MemorySampler, MemoryTracker, ThrashDetector
    from runtime.gpu._watchdog import HostMemoryWatchdog, WatchdogClient

_LAZY = {
    "MemorySampler": "runtime.gpu._tracker",
    "MemoryTracker": "runtime.gpu._tracker",
    "ThrashDetector": "runtime.gpu._tracker",
    "OomGuard": "runtime.gpu._oom",
    "HostMemoryWatchdog": "runtime.gpu._watchdog",
    "WatchdogClient": "runtime.gpu._watchdog",
}

__all__ = [
    "DEFAULT_CONTEXT_HEADROOM",
    "BudgetUsage",
    "CgroupLocation",
    "CgroupMemory",
    "CgroupPermissionError",
    "DeviceMemory",
    "GpuBudget",
    "GpuDevice",
    "HostMemoryWatchdog",
    "LimitedCgroup",
    "MemoryReading",
    "MemorySampler",
    "MemoryTracker",
    "OomGuard",
    "PackingPlan",
    "ReplicaBudget",
    "ReplicaDemand",
    "ThrashDetector",
    "WatchdogClient",
    "apply_budget",
    "budget_usage",
    "cgroup_memory",
    "check_packing",
    "create_limited_cgroup",
    "effective_limit",
    "find_memory_cgroup",
    "gpu_available",
    "memory",
    "memory_pressure",
    "no_gpu_reason",
    "node_memory",
    "process_rss",
    "process_tree_rss",
    "process_usage",
    "shutdown",
    "this_process_usage",
    "try_create_limited_cgroup",
    "utilization",
    "visible_devices",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'runtime.gpu' has no attribute {name!r}")
