"""NVML sampling: which GPUs this process sees, and how much memory they (and it) use.

NVML is initialized once per process, lazily and under a lock, and its device handles are
cached: ``nvmlInit`` costs milliseconds and a poller that re-initializes on every tick
leaks driver state on some releases. :func:`shutdown` (also registered with ``atexit``)
is the only place that calls ``nvmlShutdown``.

A machine without the NVIDIA driver or library is normal (CI, laptops): every reader here
then reports "no GPU" (:func:`gpu_available` is False, :func:`no_gpu_reason` says why)
instead of raising. Only a reading of a device that was there and then failed raises
:class:`~runtime.errors.GpuError`.

``CUDA_VISIBLE_DEVICES`` is mapped the way the CUDA driver reads it, so ``local_index``
``N`` is torch's ``cuda:N``: entries are NVML indices, ``GPU-`` UUIDs (a unique prefix is
enough), ``MIG-`` UUIDs or the legacy ``MIG-GPU-<uuid>/<gi>/<ci>`` form. Indices follow NVML
(PCI bus) order, which CUDA guarantees only with ``CUDA_DEVICE_ORDER=PCI_BUS_ID``; on a
machine with one GPU model the two orders agree in practice. An entry that matches nothing
is an error: guessing device 0 would sample someone else's GPU.
"""

from __future__ import annotations

import atexit
import importlib
import logging
import os
import re
import threading
from dataclasses import dataclass, field
from typing import Any

from runtime.errors import ConfigError, GpuError

logger = logging.getLogger(__name__)

ENV = "CUDA_VISIBLE_DEVICES"
# NVML reports an unknown per-process figure as an all-ones unsigned long long.
_NOT_AVAILABLE = 2**64 - 1
_LEGACY_MIG = re.compile(r"^MIG-(GPU-[0-9a-fA-F-]+)/(\d+)/(\d+)$")


@dataclass(frozen=True)
class GpuDevice:
    """One device as this process sees it; ``local_index`` is torch's ``cuda:N``."""

    local_index: int
    nvml_index: int  # the physical GPU's NVML index (a MIG device's parent)
    uuid: str
    name: str
    is_mig: bool
    handle: Any = field(default=None, compare=False, repr=False)

    @property
    def label(self) -> str:
        return f"cuda{self.local_index}"


@dataclass(frozen=True)
class DeviceMemory:
    """Device memory in bytes, as NVML reports it (includes other processes)."""

    total: int
    used: int
    free: int


@dataclass(frozen=True)
class _Mig:
    handle: Any
    uuid: str
    name: str
    gpu_instance: int | None
    compute_instance: int | None


@dataclass(frozen=True)
class _Gpu:
    index: int
    handle: Any
    uuid: str
    name: str
    mig_enabled: bool
    migs: tuple[_Mig, ...]


@dataclass
class _State:
    nvml: Any  # the pynvml module, or None when NVML is unusable
    reason: str | None
    inventory: tuple[_Gpu, ...] = ()
    memory_v2: bool = True  # cleared once the driver refuses nvmlDeviceGetMemoryInfo_v2
    resolved: dict[str | None, tuple[GpuDevice, ...]] = field(default_factory=dict)


_lock = threading.Lock()
_state: _State | None = None
_atexit_registered = False


def _import_pynvml() -> Any:
    """The ``pynvml`` module (tests put a fake one in ``sys.modules``)."""
    return importlib.import_module("pynvml")


def _init_state() -> _State:
    try:
        nvml = _import_pynvml()
    except ImportError as exc:
        return _State(None, f"pynvml is not importable ({exc}); install nvidia-ml-py")
    try:
        nvml.nvmlInit()
    except Exception as exc:
        return _State(None, _init_failure(nvml, exc))
    try:
        inventory = _take_inventory(nvml)
    except Exception as exc:  # a driver that initializes but cannot list devices
        _quiet_shutdown(nvml)
        return _State(None, f"NVML initialized but listing devices failed: {exc}")
    if not inventory:
        _quiet_shutdown(nvml)
        return _State(None, "NVML initialized but sees no GPU on this machine")
    return _State(nvml, None, inventory)


def _init_failure(nvml: Any, exc: Exception) -> str:
    if isinstance(exc, getattr(nvml, "NVMLError_LibraryNotFound", ())):
        return (
            "NVML library (libnvidia-ml.so.1) not found: no NVIDIA driver is installed here, "
            "or it is not mounted into this container"
        )
    if isinstance(exc, getattr(nvml, "NVMLError_DriverNotLoaded", ())):
        return "the NVIDIA driver is not loaded (nvmlInit: Driver Not Loaded)"
    return f"nvmlInit failed: {type(exc).__name__}: {exc}"


def _quiet_shutdown(nvml: Any) -> None:
    try:
        nvml.nvmlShutdown()
    except Exception:
        logger.debug("nvmlShutdown failed", exc_info=True)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _flag(value: Any) -> bool:
    # pynvml's nvmlDeviceIsMigDeviceHandle returns a ctypes c_uint, not an int.
    return bool(getattr(value, "value", value))


def _take_inventory(nvml: Any) -> tuple[_Gpu, ...]:
    gpus = []
    for index in range(int(nvml.nvmlDeviceGetCount())):
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        mig_enabled = _mig_enabled(nvml, handle)
        gpus.append(
            _Gpu(
                index=index,
                handle=handle,
                uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
                name=_text(nvml.nvmlDeviceGetName(handle)),
                mig_enabled=mig_enabled,
                migs=_mig_devices(nvml, handle) if mig_enabled else (),
            )
        )
    return tuple(gpus)


def _mig_enabled(nvml: Any, handle: Any) -> bool:
    try:
        current, _pending = nvml.nvmlDeviceGetMigMode(handle)
    except Exception:  # NotSupported on pre-Ampere parts, FunctionNotFound on old drivers
        return False
    return int(current) == int(getattr(nvml, "NVML_DEVICE_MIG_ENABLE", 1))


def _mig_devices(nvml: Any, handle: Any) -> tuple[_Mig, ...]:
    migs = []
    for i in range(int(nvml.nvmlDeviceGetMaxMigDeviceCount(handle))):
        try:
            mig = nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, i)
        except Exception:  # NotFound: no compute instance at this slot (or hidden from us)
            continue
        if not _flag(nvml.nvmlDeviceIsMigDeviceHandle(mig)):
            continue
        migs.append(
            _Mig(
                handle=mig,
                uuid=_text(nvml.nvmlDeviceGetUUID(mig)),
                name=_text(nvml.nvmlDeviceGetName(mig)),
                gpu_instance=_optional_int(nvml, "nvmlDeviceGetGpuInstanceId", mig),
                compute_instance=_optional_int(nvml, "nvmlDeviceGetComputeInstanceId", mig),
            )
        )
    return tuple(migs)


def _optional_int(nvml: Any, function: str, handle: Any) -> int | None:
    try:
        return int(getattr(nvml, function)(handle))
    except Exception:
        return None


def _get_state() -> _State:
    global _state, _atexit_registered
    state = _state
    if state is not None:
        return state
    with _lock:
        if _state is None:
            _state = _init_state()
            if _state.nvml is not None and not _atexit_registered:
                atexit.register(shutdown)
                _atexit_registered = True
            if _state.reason:
                logger.debug("no GPU: %s", _state.reason)
        return _state


def shutdown() -> None:
    """Release NVML; the next reading initializes it again."""
    global _state
    with _lock:
        state, _state = _state, None
    if state is not None and state.nvml is not None:
        _quiet_shutdown(state.nvml)


def gpu_available() -> bool:
    """True when NVML works and sees at least one GPU on this machine.

    That is about the machine; :func:`visible_devices` says which of them this process may
    use (``CUDA_VISIBLE_DEVICES=""`` leaves none).
    """
    return _get_state().nvml is not None


def no_gpu_reason() -> str | None:
    """Why :func:`gpu_available` is False, in words; None when a GPU is available."""
    return _get_state().reason


def visible_devices() -> list[GpuDevice]:
    """The devices this process may use, in ``CUDA_VISIBLE_DEVICES`` order; [] without a GPU.

    Unset means every GPU (a GPU in MIG mode contributes its MIG devices, though CUDA may
    show one process fewer of them: list MIG UUIDs to be exact); ``""``, ``-1``
    and ``NoDevFiles`` (Slurm) mean none. A negative index ends the list, as it does for
    CUDA. Raises :class:`~runtime.errors.ConfigError` for an entry that matches no device.
    """
    state = _get_state()
    if state.nvml is None:
        return []
    value = os.environ.get(ENV)
    cached = state.resolved.get(value)
    if cached is None:
        cached = _resolve(value, state.inventory)
        state.resolved[value] = cached
    return list(cached)


def _resolve(value: str | None, inventory: tuple[_Gpu, ...]) -> tuple[GpuDevice, ...]:
    """Map a ``CUDA_VISIBLE_DEVICES`` value onto the inventory (pure, for testing)."""
    if value is None:
        picked = [d for gpu in inventory for d in _expand(gpu)]
    else:
        entries = [e.strip() for e in value.split(",")]
        if entries and entries[-1] == "":
            entries.pop()  # "0,1," reads as "0,1"
        picked = []
        for position, entry in enumerate(entries):
            if entry == "NoDevFiles" or re.fullmatch(r"-\d+", entry):
                break  # CUDA stops at the first negative index
            for device in _match(entry, position, value, inventory):
                if any(p[1] == device[1] for p in picked):
                    raise ConfigError(
                        f"{ENV}={value!r}: entry {entry!r} names a device already listed ({device[1]}); "
                        "list each device once"
                    )
                picked.append(device)
    return tuple(
        GpuDevice(local_index=i, nvml_index=gpu.index, uuid=uuid, name=name, is_mig=is_mig, handle=handle)
        for i, (gpu, uuid, name, is_mig, handle) in enumerate(picked)
    )


_Picked = tuple[_Gpu, str, str, bool, Any]


def _expand(gpu: _Gpu) -> list[_Picked]:
    if gpu.mig_enabled:
        return [(gpu, m.uuid, m.name, True, m.handle) for m in gpu.migs]
    return [(gpu, gpu.uuid, gpu.name, False, gpu.handle)]


def _match(entry: str, position: int, value: str, inventory: tuple[_Gpu, ...]) -> list[_Picked]:
    if entry.isdigit():
        for gpu in inventory:
            if gpu.index == int(entry):
                return _expand(gpu)
        raise _no_match(entry, position, value, inventory)
    legacy = _LEGACY_MIG.match(entry)
    if legacy:
        gpu_uuid, gi, ci = legacy.group(1), int(legacy.group(2)), int(legacy.group(3))
        for gpu in inventory:
            if gpu.uuid.lower() == gpu_uuid.lower():
                for m in gpu.migs:
                    if (m.gpu_instance, m.compute_instance) == (gi, ci):
                        return [(gpu, m.uuid, m.name, True, m.handle)]
        raise _no_match(entry, position, value, inventory)
    if entry.startswith(("GPU-", "MIG-")):
        candidates: list[_Picked] = [
            (gpu, gpu.uuid, gpu.name, False, gpu.handle) for gpu in inventory if not gpu.mig_enabled
        ] + [(gpu, m.uuid, m.name, True, m.handle) for gpu in inventory for m in gpu.migs]
        hits = [c for c in candidates if c[1].lower().startswith(entry.lower())]
        if len(hits) == 1:
            return hits
        if len(hits) > 1:
            raise ConfigError(
                f"{ENV}={value!r}: entry {entry!r} is a prefix of {len(hits)} device UUIDs "
                f"({', '.join(h[1] for h in hits)}); give enough of the UUID to name one device"
            )
    raise _no_match(entry, position, value, inventory)


def _no_match(entry: str, position: int, value: str, inventory: tuple[_Gpu, ...]) -> ConfigError:
    return ConfigError(
        f"{ENV}={value!r}: entry {position} ({entry!r}) matches no device NVML sees: {describe(inventory)}. "
        "Use an index, a GPU-/MIG- UUID from `nvidia-smi -L`, or unset it for all devices "
        "(skewless does not fall back to device 0)"
    )


def describe(inventory: tuple[_Gpu, ...] | None = None) -> str:
    """The devices NVML sees, in one line, for error messages."""
    if inventory is None:
        state = _get_state()
        if state.nvml is None:
            return f"no GPU ({state.reason})"
        inventory = state.inventory
    parts = []
    for gpu in inventory:
        text = f"{gpu.index}: {gpu.name} {gpu.uuid}"
        if gpu.mig_enabled:
            migs = ", ".join(f"{m.uuid} (gi {m.gpu_instance}, ci {m.compute_instance})" for m in gpu.migs)
            text += f" [MIG: {migs or 'no instances'}]"
        parts.append(text)
    return "; ".join(parts) or "none"


def _nvml_for(device: GpuDevice) -> tuple[_State, Any]:
    state = _get_state()
    if state.nvml is None:
        raise GpuError(f"cannot read {device.label} ({device.uuid}): {state.reason}")
    return state, state.nvml


def memory(device: GpuDevice) -> DeviceMemory:
    """Total, used and free bytes of the device (for a MIG device, of its slice).

    Prefers ``nvmlDeviceGetMemoryInfo_v2``, whose ``used`` leaves out the memory the driver
    reserves for itself; falls back to v1 on drivers without it.
    """
    state, nvml = _nvml_for(device)
    version = getattr(nvml, "nvmlMemory_v2", None)
    info = None
    if state.memory_v2 and version is not None:
        try:
            info = nvml.nvmlDeviceGetMemoryInfo(device.handle, version=version)
        except Exception as exc:  # FunctionNotFound / NotSupported / version mismatch
            logger.debug("nvmlDeviceGetMemoryInfo_v2 unavailable (%s); using v1", exc)
            state.memory_v2 = False
    if info is None:
        try:
            info = nvml.nvmlDeviceGetMemoryInfo(device.handle)
        except Exception as exc:
            raise GpuError(f"reading memory of {device.label} ({device.name}, {device.uuid}) failed: {exc}") from exc
    return DeviceMemory(total=int(info.total), used=int(info.used), free=int(info.free))


def utilization(device: GpuDevice) -> int | None:
    """GPU busy percent over the driver's last sample period; None on MIG or when unsupported."""
    if device.is_mig:
        return None
    _state, nvml = _nvml_for(device)
    try:
        return int(nvml.nvmlDeviceGetUtilizationRates(device.handle).gpu)
    except Exception:
        return None


def _processes(device: GpuDevice) -> list[tuple[int, int | None]] | None:
    state = _get_state()
    if state.nvml is None:
        return None
    try:
        procs = state.nvml.nvmlDeviceGetComputeRunningProcesses(device.handle)
    except Exception:  # NotSupported (MIG without privileges), NoPermission, containers
        return None
    out = []
    for p in procs:
        used = getattr(p, "usedGpuMemory", None)
        out.append((int(p.pid), None if used is None or int(used) >= _NOT_AVAILABLE else int(used)))
    return out


def process_usage(device: GpuDevice) -> dict[int, int] | None:
    """Bytes per pid of the compute processes on the device; None when NVML cannot tell.

    Processes whose usage NVML does not report are left out. In a container the pids are
    the host's, so they need not match ``os.getpid()``.
    """
    procs = _processes(device)
    if procs is None:
        return None
    return {pid: used for pid, used in procs if used is not None}


def this_process_usage(device: GpuDevice) -> int | None:
    """Bytes this process holds on the device (CUDA context included); None when unknown.

    None also when NVML does not list this pid: either no CUDA context exists yet, or NVML
    reports pids of another pid namespace (a container); the two look the same from here.
    """
    procs = _processes(device)
    if procs is None:
        return None
    pid = os.getpid()
    for p, used in procs:
        if p == pid:
            return used
    return None


def _reset_for_tests() -> None:
    """Forget the NVML state without calling into NVML (tests swap the module)."""
    global _state
    with _lock:
        _state = None
