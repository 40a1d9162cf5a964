"""Diagnostics a process writes about itself: thread stacks, its largest live arrays and
tensors, NVML and host-memory reports, and a step beacon another process can read.

The host-memory watchdog (:mod:`runtime.memory._watchdog`) lives outside the worker and
asks for these dumps before the kernel's OOM killer strikes:

- :func:`install_worker_side` makes ``SIGUSR1`` write every thread's stack through
  :mod:`faulthandler` (C level: works while Python is stuck in native code), and starts a
  small thread that answers a request file with :func:`largest_allocations_report` and the
  Python stacks (Python-level dumps need the GIL, and with signals the main thread, which
  Ray Train does not run the loop on);
- a :class:`StepBeacon` (8 bytes in a memory-mapped file) carries the worker's current
  step at the cost of one memory write per step.
"""

from __future__ import annotations

import datetime as _dt
import faulthandler
import gc
import logging
import mmap
import os
import signal
import stat
import struct
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from runtime.memory import _hostmem, _nvml

logger = logging.getLogger(__name__)
_MB = 1 << 20
STACKS_SIGNAL = signal.SIGUSR1

# ------------------------------------------------------------------ worker side


class StepBeacon:
    """The worker's current step, readable by another process; one 8-byte store per update."""

    def __init__(self, path: str | Path, create: bool = True) -> None:
        self.path = str(path)
        if create:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "wb") as f:
                f.write(struct.pack("<q", -1))
        self._file = open(self.path, "r+b")  # noqa: SIM115 - kept open for the mmap's lifetime
        self._map = mmap.mmap(self._file.fileno(), 8)

    def set(self, step: int) -> None:
        self._map[:8] = struct.pack("<q", step)

    def get(self) -> int:
        value: int = struct.unpack("<q", self._map[:8])[0]
        return value

    def close(self) -> None:
        self._map.close()
        self._file.close()


def read_beacon(path: str | Path) -> int | None:
    try:
        with open(path, "rb") as f:
            value: int = struct.unpack("<q", f.read(8))[0]
            return value
    except (OSError, struct.error):
        return None


_STACK_FILES: list[Any] = []  # faulthandler writes to the fd: keep the files open


def install_worker_side(dump_dir: str | Path, rank: int) -> dict[str, str]:
    """Install the dump-on-signal handlers in this (worker) process; returns the dump paths."""
    d = Path(dump_dir)
    d.mkdir(parents=True, exist_ok=True)
    stacks = d / f"stacks-rank{rank}-pid{os.getpid()}.txt"
    allocations = d / f"allocations-rank{rank}-pid{os.getpid()}.txt"
    trigger = d / f"dump-request-rank{rank}-pid{os.getpid()}"
    f = open(stacks, "a")  # noqa: SIM115 - faulthandler needs it open for the process's life
    _STACK_FILES.append(f)
    faulthandler.register(STACKS_SIGNAL, file=f, all_threads=True, chain=False)

    # Python-level dumps need the GIL and, with signals, the main thread (Ray Train runs the
    # loop in another one), so a small thread answers a request file instead.
    def answer_requests() -> None:
        partial = allocations.with_suffix(".partial")
        while True:
            time.sleep(0.05)
            if not trigger.exists():
                continue
            try:  # written whole, then renamed: a reader never sees half a report
                partial.write_text(largest_allocations_report() + "\n" + python_stacks())
                partial.replace(allocations)
            except Exception as exc:  # never let a diagnostic kill the worker
                logger.warning("allocation dump failed: %s", exc)
            trigger.unlink(missing_ok=True)

    threading.Thread(target=answer_requests, name="skewless-memory-dumps", daemon=True).start()
    return {"stacks": str(stacks), "allocations": str(allocations), "trigger": str(trigger)}


def python_stacks() -> str:
    return "# python stacks\n" + all_thread_stacks()


def largest_allocations_report(top: int = 15) -> str:
    """The largest live numpy arrays and torch tensors (by bytes), plus tracemalloc's top sites."""
    sizes: list[tuple[int, str]] = []
    np_mod, torch_mod = sys.modules.get("numpy"), sys.modules.get("torch")
    # Arrays are not tracked by the GC themselves: find them through the containers that are.
    seen: set[int] = set()
    candidates = []
    for container in gc.get_objects():
        for obj in (container, *gc.get_referents(container)):
            if id(obj) not in seen:
                seen.add(id(obj))
                candidates.append(obj)
    for obj in candidates:
        try:
            # type(), not isinstance(): isinstance reads __class__, which lazy modules answer
            # with deprecation warnings (torch.distributed.reduce_op)
            kind = type(obj)
            if np_mod is not None and issubclass(kind, np_mod.ndarray) and obj.base is None:
                sizes.append((int(obj.nbytes), f"numpy.ndarray shape={obj.shape} dtype={obj.dtype}"))
            elif torch_mod is not None and issubclass(kind, torch_mod.Tensor):
                nbytes = obj.untyped_storage().nbytes()
                sizes.append((int(nbytes), f"torch.Tensor shape={tuple(obj.shape)} dtype={obj.dtype} {obj.device}"))
        except Exception:
            continue
    sizes.sort(reverse=True)
    lines = [
        f"# largest allocations, pid {os.getpid()}, {_dt.datetime.now(_dt.timezone.utc).isoformat()}",
        f"process RSS {_hostmem.process_rss() / _MB:,.1f} MiB; {len(sizes)} arrays/tensors live, "
        f"{sum(s for s, _ in sizes) / _MB:,.1f} MiB in total",
        "",
    ]
    lines += [f"{s / _MB:10,.1f} MiB  {what}" for s, what in sizes[:top]]
    import tracemalloc

    if tracemalloc.is_tracing():
        lines += ["", "# tracemalloc top sites"]
        for stat in tracemalloc.take_snapshot().statistics("lineno")[:top]:
            lines.append(f"{stat.size / _MB:10,.1f} MiB  {stat.traceback}")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ where dumps go


def private_diagnostics_dir() -> Path:
    """This user's own diagnostics directory, mode 0700: ``<tmp>/skewless-<uid>/diagnostics``.

    Dumps hold stacks, shapes and config: never a shared, world-readable path. A path someone
    else owns, or a symlink planted there, is not used: a fresh private temp dir is.
    """
    base = Path(tempfile.gettempdir()) / f"skewless-{os.getuid()}"
    try:
        for d in (base, base / "diagnostics"):
            d.mkdir(mode=0o700, exist_ok=True)
            info = os.lstat(d)
            if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
                raise PermissionError(f"{d} is not a directory this user owns")
            if info.st_mode & 0o077:
                os.chmod(d, 0o700)
        return base / "diagnostics"
    except OSError as exc:
        fallback = Path(tempfile.mkdtemp(prefix="skewless-diagnostics-"))
        logger.warning("diagnostics go to %s: %s", fallback, exc)
        return fallback


# ------------------------------------------------------------------ reports


def all_thread_stacks() -> str:
    """Every Python thread's stack, as text."""
    names = {t.ident: t.name for t in threading.enumerate()}
    out = []
    for ident, frame in sys._current_frames().items():
        out.append(f"--- thread {names.get(ident, '?')} ({ident})\n")
        out.extend(traceback.format_stack(frame))
    return "".join(out)


def nvml_report() -> dict[str, Any]:
    """Every visible GPU's memory and per-process usage, as NVML sees it (JSON-able)."""
    if not _nvml.gpu_available():
        return {"available": False, "reason": _nvml.no_gpu_reason()}
    out: dict[str, Any] = {"available": True, "devices": []}
    for dev in _nvml.visible_devices():
        try:
            mem: Any = _nvml.memory(dev)
        except Exception:  # a GPU NVML can no longer read: report the rest
            mem = None
        out["devices"].append(
            {
                "device": dev.label,
                "total": mem.total if mem else None,
                "used": mem.used if mem else None,
                "processes": _nvml.process_usage(dev),
            }
        )
    return out


def host_memory_report() -> dict[str, Any]:
    """This process's RSS and how close it is to its memory limit (cgroup or node), in MiB."""
    try:
        reading = _hostmem.memory_pressure()
        return {
            "usage_mb": round(reading.usage / _MB, 1),
            "limit_mb": round(reading.limit / _MB, 1),
            "source": reading.source,
            "rss_mb": round(_hostmem.process_rss() / _MB, 1),
        }
    except Exception as exc:
        return {"error": str(exc)}
