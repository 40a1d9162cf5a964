"""Fractional-GPU budgets: enforce a replica's share of a GPU, and check a plan before Ray runs it.

Ray's fractional ``num_gpus`` is bookkeeping: a replica given 0.25 of a GPU can still
allocate all of it and OOM its neighbours. :func:`apply_budget` caps PyTorch's caching
allocator at the share (minus the CUDA context, which the cap does not see);
:func:`check_packing` refuses, with the numbers, a deployment whose replicas cannot fit.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from typing import Any

from runtime.errors import ConfigError, SkewlessError

logger = logging.getLogger(__name__)

MIB = 2**20
GIB = 2**30
# Memory a process holds on the GPU outside PyTorch's caching allocator, which
# set_per_process_memory_fraction therefore does not count: the CUDA context with the
# lazily loaded kernels of torch, cuBLAS and cuDNN, plus cuBLAS workspaces. About 500 MiB
# with CUDA 12 on an H100; 600 MiB leaves a margin. Raise it for models that load more
# kernel libraries (e.g. flash-attention, NCCL buffers with many peers).
DEFAULT_CONTEXT_HEADROOM = 600 * MIB
_EPS = 1e-9  # Ray keeps resources at 1e-4 granularity; this only absorbs float error


def _gib(n: float) -> str:
    return f"{n / GIB:.1f}"


@dataclass(frozen=True)
class GpuBudget:
    """A process's share of one GPU: ``fraction`` of it, of which the context takes ``headroom_bytes``.

    :func:`apply_budget` returns one with ``device`` and ``total_bytes`` filled in.
    """

    fraction: float
    headroom_bytes: int = DEFAULT_CONTEXT_HEADROOM
    device: int | None = None
    total_bytes: int | None = None

    def __post_init__(self) -> None:
        if not 0 < self.fraction <= 1:
            raise ConfigError(
                f"fraction ({self.fraction!r}) must be in (0, 1]: the share of one GPU this process may use, "
                "e.g. 0.25 for num_gpus=0.25"
            )
        if self.headroom_bytes < 0:
            raise ConfigError(f"headroom_bytes ({self.headroom_bytes}) must be >= 0")

    def budget_bytes(self, total: int | None = None) -> int:
        """Bytes PyTorch's allocator may reserve: ``fraction × total − headroom``."""
        total = total if total is not None else self.total_bytes
        if total is None:
            raise ValueError("budget_bytes needs the device's total memory: pass total, or use apply_budget's result")
        budget = int(self.fraction * total) - self.headroom_bytes
        if budget <= 0:
            raise ConfigError(
                f"fraction {self.fraction:g} of a {_gib(total)} GiB GPU is {_gib(self.fraction * total)} GiB, "
                f"which does not hold the {_gib(self.headroom_bytes)} GiB CUDA context; raise num_gpus"
            )
        return budget


@dataclass(frozen=True)
class BudgetUsage:
    budget_bytes: int
    nvml_used_by_this_process: int | None  # context included; None when NVML cannot tell
    torch_reserved: int
    within_budget: bool


def apply_budget(
    fraction: float, device: Any = None, headroom_bytes: int = DEFAULT_CONTEXT_HEADROOM
) -> GpuBudget | None:
    """Cap this process's PyTorch allocator at ``fraction`` of the GPU; None on a machine without one.

    Past the cap an allocation raises ``torch.cuda.OutOfMemoryError`` in this process
    instead of taking memory a neighbouring replica counted on. ``device`` is an index,
    ``"cuda:N"`` or a ``torch.device``; default the current device.
    """
    budget = GpuBudget(fraction, headroom_bytes)  # a bad fraction is an error on any machine
    try:
        import torch
    except ImportError:
        logger.info("no GPU: budget not applied (torch is not installed)")
        return None
    if not torch.cuda.is_available():
        logger.info("no GPU: budget not applied")
        return None
    if device is None:
        index = torch.cuda.current_device()
    elif isinstance(device, int):
        index = device
    else:
        dev = torch.device(device)
        if dev.type != "cuda":
            raise ConfigError(f"device ({device!r}) must be a CUDA device, e.g. 'cuda:0' or 0")
        index = dev.index if dev.index is not None else torch.cuda.current_device()
    total = int(torch.cuda.get_device_properties(index).total_memory)
    nbytes = budget.budget_bytes(total)
    torch.cuda.set_per_process_memory_fraction(nbytes / total, index)
    logger.info(
        "GPU budget on cuda:%d: %s GiB of %s GiB (%g of the device, %s GiB kept for the CUDA context)",
        index,
        _gib(nbytes),
        _gib(total),
        fraction,
        _gib(headroom_bytes),
    )
    return replace(budget, device=index, total_bytes=total)


def budget_usage(budget: GpuBudget) -> BudgetUsage:
    """How this process stands against an applied budget (no CUDA sync)."""
    if budget.device is None or budget.total_bytes is None:
        raise ValueError("budget_usage needs an applied budget: pass what apply_budget returned")
    import torch

    from runtime.memory import _nvml

    nbytes = budget.budget_bytes()
    reserved = int(torch.cuda.memory_reserved(budget.device))
    nvml_used = None
    try:
        devices = _nvml.visible_devices()
    except SkewlessError:
        devices = []
    if budget.device < len(devices):
        nvml_used = _nvml.this_process_usage(devices[budget.device])
    share = int(budget.fraction * budget.total_bytes)
    within = reserved <= nbytes and (nvml_used is None or nvml_used <= share)
    return BudgetUsage(nbytes, nvml_used, reserved, within)


# ---------------------------------------------------------------- packing


@dataclass(frozen=True)
class ReplicaDemand:
    """One deployment: ``num_replicas`` replicas of ``num_gpus`` each, and their memory need.

    ``declared_bytes`` is what its config says; ``measured_bytes`` what a profiling run
    saw (peak reserved). The larger one counts.
    """

    name: str
    num_replicas: int
    num_gpus: float
    declared_bytes: int | None = None
    measured_bytes: int | None = None

    def __post_init__(self) -> None:
        where = f"deployment {self.name!r}"
        if self.num_replicas < 1:
            raise ConfigError(f"{where}: num_replicas ({self.num_replicas}) must be >= 1")
        if not self.num_gpus > 0:
            raise ConfigError(f"{where}: num_gpus ({self.num_gpus!r}) must be > 0 (use the CPU path for 0)")
        if self.num_gpus > 1 and self.num_gpus != int(self.num_gpus):
            raise ConfigError(
                f"{where}: num_gpus ({self.num_gpus:g}) must be <= 1 or a whole number (Ray's rule: a "
                f"replica gets a share of one GPU or whole GPUs); use {math.ceil(self.num_gpus)} or {math.floor(self.num_gpus)}"
            )
        for field in ("declared_bytes", "measured_bytes"):
            value = getattr(self, field)
            if value is not None and value < 0:
                raise ConfigError(f"{where}: {field} ({value}) must be >= 0")

    @property
    def need_bytes(self) -> int | None:
        known = [b for b in (self.declared_bytes, self.measured_bytes) if b is not None]
        return max(known) if known else None

    @property
    def basis(self) -> str:
        if self.measured_bytes is not None and self.measured_bytes >= (self.declared_bytes or 0):
            return "measured"
        return "declared"


@dataclass(frozen=True)
class ReplicaBudget:
    name: str
    num_replicas: int
    num_gpus: float
    budget_bytes: int  # what apply_budget(num_gpus) lets each replica's allocator reserve
    need_bytes: int | None


@dataclass(frozen=True)
class PackingPlan:
    device_total_bytes: int
    devices: int
    headroom_bytes: int
    replicas: tuple[ReplicaBudget, ...]
    device_load: tuple[float, ...]  # GPU fraction used per device by a first-fit-decreasing placement


def check_packing(
    replicas: list[ReplicaDemand],
    device_total_bytes: int,
    devices: int = 1,
    headroom_bytes: int = DEFAULT_CONTEXT_HEADROOM,
) -> PackingPlan:
    """Refuse, with the numbers, replicas that cannot fit on ``devices`` GPUs of ``device_total_bytes``.

    Two rules: the fractions must pack onto the GPUs with at most 1 per GPU (Ray places a
    fractional replica on a single GPU), and each replica's need plus its CUDA context must
    fit in its share, ``num_gpus × device_total_bytes``. All violations are reported at once.
    """
    if device_total_bytes <= 0:
        raise ConfigError(f"device_total_bytes ({device_total_bytes}) must be > 0")
    if devices < 1:
        raise ConfigError(f"devices ({devices}) must be >= 1")
    problems: list[str] = []
    load, packing_problem = _place(replicas, devices)
    if packing_problem:
        problems.append(packing_problem)
    budgets = []
    for d in replicas:
        share = d.num_gpus * device_total_bytes
        context = headroom_bytes * math.ceil(d.num_gpus)
        need = d.need_bytes
        plural = "replica" if d.num_replicas == 1 else "replicas"
        if share - context <= 0:
            problems.append(
                f"deployment {d.name!r}: {d.num_gpus:g} GPU is {_gib(share)} GiB, which does not hold the "
                f"{_gib(context)} GiB CUDA context; raise num_gpus per replica"
            )
        elif need is not None and need + context > share + _EPS:
            n = d.num_replicas
            problems.append(
                f"deployment {d.name!r}: {n} {plural} × {d.num_gpus:g} GPU need {n} × {_gib(need)} GiB {d.basis} "
                f"(+{_gib(context)} GiB context each) = {_gib(n * (need + context))} GiB > {_gib(n * share)} GiB "
                f"on {n * d.num_gpus:g} GPU; lower num_replicas, raise num_gpus per replica or shrink the model"
            )
        budgets.append(ReplicaBudget(d.name, d.num_replicas, d.num_gpus, int(share - context), need))
    if problems:
        raise ConfigError("\n".join(problems))
    return PackingPlan(device_total_bytes, devices, headroom_bytes, tuple(budgets), tuple(load))


def _place(replicas: list[ReplicaDemand], devices: int) -> tuple[list[float], str | None]:
    """First-fit decreasing of every replica onto the GPUs; (loads, the problem or None)."""
    total = sum(d.num_replicas * d.num_gpus for d in replicas)
    parts = " + ".join(f"{d.name!r} {d.num_replicas} × {d.num_gpus:g}" for d in replicas)
    gpus = "GPU" if devices == 1 else "GPUs"
    if total > devices + _EPS:
        return [], (
            f"replicas need {total:g} GPU but {devices} {gpus} {'is' if devices == 1 else 'are'} available: "
            f"{parts}; lower num_replicas or num_gpus per replica, or add GPUs"
        )
    load = [0.0] * devices
    items = sorted(((d.num_gpus, d.name) for d in replicas for _ in range(d.num_replicas)), reverse=True)
    for size, name in items:
        if size >= 1:  # whole GPUs: needs that many idle ones
            idle = [i for i, used in enumerate(load) if used <= _EPS][: int(size)]
            if len(idle) < size:
                return load, _fragmented(name, size, load, parts)
            for i in idle:
                load[i] = 1.0
            continue
        for i, used in enumerate(load):
            if used + size <= 1 + _EPS:
                load[i] = used + size
                break
        else:
            return load, _fragmented(name, size, load, parts)
    return load, None


def _fragmented(name: str, size: float, load: list[float], parts: str) -> str:
    loads = ", ".join(f"{x:g}" for x in load)
    return (
        f"replicas of {parts} do not pack onto {len(load)} GPUs: a replica of {name!r} needs {size:g} of one GPU "
        f"and the GPUs are already at {loads}; Ray places a fractional replica on a single GPU. Use fractions "
        "that divide 1 (0.5, 0.25, ...) or add GPUs"
    )
