"""NVML sampling against a fake ``pynvml`` (no driver here), plus the real one on this machine."""

from __future__ import annotations

import ctypes
import os
import sys
import threading
import types
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from runtime.errors import ConfigError, GpuError
from runtime.memory import _nvml

GIB = 2**30
UUID0 = "GPU-11111111-aaaa-bbbb-cccc-000000000000"
UUID1 = "GPU-22222222-aaaa-bbbb-cccc-000000000001"
MIG_A = "MIG-aaaaaaaa-0000-0000-0000-00000000000a"
MIG_B = "MIG-bbbbbbbb-0000-0000-0000-00000000000b"


class FakeNvml:
    """A ``pynvml`` stand-in: physical GPUs, MIG slices, and the failures NVML has."""

    def __init__(
        self,
        gpus: list[dict[str, Any]] | None = None,
        init_error: str | None = None,
        memory_v2: bool = True,
        processes: list[tuple[int, int | None]] | None = None,
    ) -> None:
        self.gpus = gpus if gpus is not None else [{"uuid": UUID0}, {"uuid": UUID1}]
        self.calls: Counter[str] = Counter()
        self.init_error, self.memory_v2, self.processes = init_error, memory_v2, processes
        self.lost = False
        m = types.ModuleType("pynvml")

        class NVMLError(Exception):
            pass

        for name in ("LibraryNotFound", "DriverNotLoaded", "NotSupported", "NotFound", "FunctionNotFound", "GpuIsLost"):
            setattr(m, f"NVMLError_{name}", type(f"NVMLError_{name}", (NVMLError,), {}))
        m.NVMLError = NVMLError  # type: ignore[attr-defined]
        m.NVML_DEVICE_MIG_ENABLE = 1  # type: ignore[attr-defined]
        m.nvmlMemory_v2 = 0x02000028  # type: ignore[attr-defined]
        for name in dir(self):
            if name.startswith("nvml"):
                setattr(m, name, self._counted(name, getattr(self, name)))
        self.module = m

    def _counted(self, name: str, fn: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] += 1
            return fn(*args, **kwargs)

        return call

    def _err(self, name: str) -> Exception:
        return getattr(self.module, f"NVMLError_{name}")()

    # --- the API surface runtime.memory uses
    def nvmlInit(self) -> None:
        if self.init_error == "generic":
            raise self.module.NVMLError("Unknown Error")
        if self.init_error:
            raise self._err(self.init_error)

    def nvmlShutdown(self) -> None:
        pass

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> dict[str, Any]:
        return {"gpu": i}

    def _info(self, h: dict[str, Any]) -> dict[str, Any]:
        gpu = self.gpus[h["gpu"]]
        return gpu["migs"][h["mig"]] if "mig" in h else gpu

    def nvmlDeviceGetUUID(self, h: dict[str, Any]) -> bytes:
        return self._info(h)["uuid"].encode()  # old pynvml releases return bytes

    def nvmlDeviceGetName(self, h: dict[str, Any]) -> str:
        return self._info(h).get("name", "MIG 1g.10gb" if "mig" in h else "NVIDIA H100 80GB HBM3")

    def nvmlDeviceGetMigMode(self, h: dict[str, Any]) -> list[int]:
        if "migs" not in self.gpus[h["gpu"]]:
            raise self._err("NotSupported")
        return [1, 1]

    def nvmlDeviceGetMaxMigDeviceCount(self, h: dict[str, Any]) -> int:
        return 7

    def nvmlDeviceGetMigDeviceHandleByIndex(self, h: dict[str, Any], i: int) -> dict[str, Any]:
        if i >= len(self.gpus[h["gpu"]]["migs"]):
            raise self._err("NotFound")
        return {"gpu": h["gpu"], "mig": i}

    def nvmlDeviceIsMigDeviceHandle(self, h: dict[str, Any]) -> ctypes.c_uint:
        return ctypes.c_uint(1 if "mig" in h else 0)  # as the real pynvml does

    def nvmlDeviceGetGpuInstanceId(self, h: dict[str, Any]) -> int:
        return int(self._info(h)["gi"])

    def nvmlDeviceGetComputeInstanceId(self, h: dict[str, Any]) -> int:
        return int(self._info(h)["ci"])

    def nvmlDeviceGetMemoryInfo(self, h: dict[str, Any], version: int | None = None) -> Any:
        if self.lost:
            raise self._err("GpuIsLost")
        if version and not self.memory_v2:
            raise self._err("FunctionNotFound")
        total = 10 * GIB if "mig" in h else 80 * GIB
        used = (h["gpu"] + 1) * GIB
        return types.SimpleNamespace(total=total, used=used, free=total - used)

    def nvmlDeviceGetUtilizationRates(self, h: dict[str, Any]) -> Any:
        if "mig" in h:
            raise self._err("NotSupported")
        return types.SimpleNamespace(gpu=37, memory=5)

    def nvmlDeviceGetComputeRunningProcesses(self, h: dict[str, Any]) -> list[Any]:
        if "mig" in h or self.processes is None:
            raise self._err("NotSupported")
        return [types.SimpleNamespace(pid=p, usedGpuMemory=m) for p, m in self.processes]


def _mig_gpus() -> list[dict[str, Any]]:
    migs = [{"uuid": MIG_A, "gi": 1, "ci": 0}, {"uuid": MIG_B, "gi": 2, "ci": 0}]
    return [{"uuid": UUID0, "migs": migs}, {"uuid": UUID1}]


@pytest.fixture
def install(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Put a fake (or None: not installed) ``pynvml`` in place, with fresh NVML state."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)

    def put(fake: FakeNvml | None) -> FakeNvml | None:
        monkeypatch.setitem(sys.modules, "pynvml", fake.module if fake else None)
        _nvml._reset_for_tests()
        return fake

    yield put
    _nvml._reset_for_tests()


def _visible(monkeypatch: pytest.MonkeyPatch, value: str) -> list[_nvml.GpuDevice]:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", value)
    return _nvml.visible_devices()


# ------------------------------------------------------------ no GPU


def test_pynvml_not_installed_means_no_gpu(install: Any) -> None:
    install(None)
    assert not _nvml.gpu_available()
    assert "nvidia-ml-py" in (_nvml.no_gpu_reason() or "")
    assert _nvml.visible_devices() == []


@pytest.mark.parametrize(
    ("error", "words"),
    [("LibraryNotFound", "libnvidia-ml.so.1"), ("DriverNotLoaded", "driver is not loaded"), ("generic", "Unknown")],
)
def test_init_failures_mean_no_gpu_and_nothing_raises(install: Any, error: str, words: str) -> None:
    install(FakeNvml(init_error=error))
    assert not _nvml.gpu_available()
    assert words in (_nvml.no_gpu_reason() or "")
    assert _nvml.visible_devices() == []
    assert "no GPU" in _nvml.describe()


def test_zero_devices_means_no_gpu(install: Any) -> None:
    install(FakeNvml(gpus=[]))
    assert not _nvml.gpu_available()
    assert "sees no GPU" in (_nvml.no_gpu_reason() or "")


@pytest.mark.skipif(Path("/proc/driver/nvidia").exists(), reason="this machine has an NVIDIA driver")
def test_real_pynvml_without_a_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    real = pytest.importorskip("pynvml")
    monkeypatch.setitem(sys.modules, "pynvml", real)
    _nvml._reset_for_tests()
    try:
        assert _nvml.gpu_available() is False
        reason = _nvml.no_gpu_reason() or ""
        assert "driver" in reason or "library" in reason, reason
        assert _nvml.visible_devices() == []
    finally:
        _nvml._reset_for_tests()


# ------------------------------------------------------------ init once


def test_nvml_initializes_once_across_threads_and_caches_handles(install: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = install(FakeNvml())
    barrier = threading.Barrier(8)

    def poll() -> None:
        barrier.wait()
        for _ in range(20):
            for dev in _nvml.visible_devices():
                _nvml.memory(dev)

    threads = [threading.Thread(target=poll) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert fake.calls["nvmlInit"] == 1
    assert fake.calls["nvmlDeviceGetHandleByIndex"] == 2  # one lookup per GPU, ever
    assert fake.calls["nvmlDeviceGetMemoryInfo"] == 8 * 20 * 2
    _nvml.shutdown()
    assert fake.calls["nvmlShutdown"] == 1
    _nvml.shutdown()  # idempotent
    assert fake.calls["nvmlShutdown"] == 1
    assert _nvml.gpu_available()  # a later reading initializes again
    assert fake.calls["nvmlInit"] == 2


# ------------------------------------------------------------ CUDA_VISIBLE_DEVICES


def test_unset_means_every_gpu_in_nvml_order(install: Any) -> None:
    install(FakeNvml())
    devs = _nvml.visible_devices()
    assert [(d.local_index, d.nvml_index, d.uuid, d.is_mig, d.label) for d in devs] == [
        (0, 0, UUID0, False, "cuda0"),
        (1, 1, UUID1, False, "cuda1"),
    ]
    assert devs[0].name == "NVIDIA H100 80GB HBM3"
    assert "handle" not in repr(devs[0])
    assert devs[0] == _nvml.GpuDevice(0, 0, UUID0, "NVIDIA H100 80GB HBM3", False, handle="another handle")


def test_indices_map_in_the_listed_order(install: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    install(FakeNvml())
    devs = _visible(monkeypatch, "1,0")
    assert [(d.local_index, d.nvml_index, d.uuid) for d in devs] == [(0, 1, UUID1), (1, 0, UUID0)]
    assert [(d.local_index, d.nvml_index) for d in _visible(monkeypatch, " 1 ")] == [(0, 1)]


def test_uuids_and_unique_prefixes(install: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    install(FakeNvml())
    assert [d.nvml_index for d in _visible(monkeypatch, f"{UUID1},{UUID0}")] == [1, 0]
    assert [d.nvml_index for d in _visible(monkeypatch, "GPU-2222")] == [1]
    with pytest.raises(ConfigError, match=r"'GPU-' is a prefix of 2 device UUIDs"):
        _visible(monkeypatch, "GPU-")


@pytest.mark.parametrize("value", ["", "-1", "NoDevFiles", " "])
def test_hidden_devices(install: Any, monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    install(FakeNvml())
    assert _visible(monkeypatch, value) == []


def test_a_negative_index_ends_the_list_as_in_cuda(install: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    install(FakeNvml())
    assert [d.nvml_index for d in _visible(monkeypatch, "1,-1,0")] == [1]


@pytest.mark.parametrize("entry", ["7", "GPU-99999999", "MIG-99999999", "cuda:0", "MIG-GPU-deadbeef/1/0"])
def test_an_entry_that_matches_nothing_is_an_error_not_device_0(
    install: Any, monkeypatch: pytest.MonkeyPatch, entry: str
) -> None:
    install(FakeNvml())
    with pytest.raises(ConfigError) as info:
        _visible(monkeypatch, f"1,{entry}")
    message = str(info.value)
    assert f"entry 1 ({entry!r}) matches no device NVML sees" in message
    assert f"0: NVIDIA H100 80GB HBM3 {UUID0}; 1: NVIDIA H100 80GB HBM3 {UUID1}" in message
    assert "does not fall back to device 0" in message


def test_a_device_listed_twice_is_an_error(install: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    install(FakeNvml())
    with pytest.raises(ConfigError, match=r"entry 'GPU-1111' names a device already listed"):
        _visible(monkeypatch, "0,GPU-1111")


def test_mig_devices(install: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    install(FakeNvml(gpus=_mig_gpus()))
    unset = _nvml.visible_devices()
    assert [(d.uuid, d.is_mig, d.nvml_index) for d in unset] == [(MIG_A, True, 0), (MIG_B, True, 0), (UUID1, False, 1)]
    assert [d.uuid for d in _visible(monkeypatch, MIG_B)] == [MIG_B]
    assert [d.uuid for d in _visible(monkeypatch, f"MIG-{UUID0}/2/0,{MIG_A}")] == [MIG_B, MIG_A]
    assert [d.uuid for d in _visible(monkeypatch, "0")] == [MIG_A, MIG_B]  # the GPU's slices
    mig = _visible(monkeypatch, MIG_A)[0]
    assert _nvml.memory(mig).total == 10 * GIB
    assert _nvml.utilization(mig) is None
    assert _nvml.process_usage(mig) is None
    assert _nvml.this_process_usage(mig) is None
    with pytest.raises(ConfigError, match=r"MIG: MIG-aaaaaaaa.* \(gi 1, ci 0\)"):
        _visible(monkeypatch, f"MIG-{UUID0}/3/0")


# ------------------------------------------------------------ readings


def test_memory_prefers_v2_and_falls_back_to_v1_once(install: Any) -> None:
    fake = install(FakeNvml(memory_v2=False))
    dev = _nvml.visible_devices()[1]
    for _ in range(3):
        assert _nvml.memory(dev) == _nvml.DeviceMemory(total=80 * GIB, used=2 * GIB, free=78 * GIB)
    assert fake.calls["nvmlDeviceGetMemoryInfo"] == 1 + 3  # one refused v2 call, then v1 only


def test_a_lost_gpu_raises_gpu_error_naming_it(install: Any) -> None:
    fake = install(FakeNvml())
    dev = _nvml.visible_devices()[0]
    fake.lost = True
    with pytest.raises(GpuError, match=rf"reading memory of cuda0 \(NVIDIA H100 80GB HBM3, {UUID0}\) failed"):
        _nvml.memory(dev)


def test_utilization(install: Any) -> None:
    install(FakeNvml())
    assert _nvml.utilization(_nvml.visible_devices()[0]) == 37


def test_per_process_usage(install: Any) -> None:
    me = os.getpid()
    install(FakeNvml(processes=[(me, 3 * GIB), (4242, None), (4343, 2**64 - 1), (4444, GIB)]))
    dev = _nvml.visible_devices()[0]
    assert _nvml.process_usage(dev) == {me: 3 * GIB, 4444: GIB}  # unknown figures left out
    assert _nvml.this_process_usage(dev) == 3 * GIB


def test_per_process_usage_unknown(install: Any) -> None:
    fake = install(FakeNvml(processes=[(4444, GIB)]))
    dev = _nvml.visible_devices()[0]
    assert _nvml.this_process_usage(dev) is None  # not listed: no context yet, or another pid namespace
    fake.processes = [(os.getpid(), None)]
    assert _nvml.this_process_usage(dev) is None
    fake.processes = None  # NotSupported (containers, MIG)
    assert _nvml.process_usage(dev) is None
    assert _nvml.this_process_usage(dev) is None


def test_readings_without_nvml_raise_only_for_a_device(install: Any) -> None:
    install(FakeNvml(init_error="DriverNotLoaded"))
    dev = _nvml.GpuDevice(0, 0, UUID0, "gone", False)
    assert _nvml.process_usage(dev) is None
    with pytest.raises(GpuError, match="cannot read cuda0 .*driver is not loaded"):
        _nvml.memory(dev)
