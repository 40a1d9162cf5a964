"""Host memory readers straight from /proc and the cgroup filesystem (no psutil).

The kernel OOM killer acts on the memory cgroup's limit when there is one (a container, a
Ray worker under a cgroup, a Slurm job), and on the node's RAM otherwise; so the readers
here answer "how close is this process to being killed" for both cgroup v1 and v2.

Usage figures subtract the inactive page cache (``working_set``, as the kubelet does):
a cgroup near its limit only from cache is reclaimed, not OOM-killed.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
# cgroup v1 writes "no limit" as the largest page-aligned long (9223372036854771712).
V1_UNLIMITED = 2**62
_PROC = Path("/proc")


# ---------------------------------------------------------------- processes


def process_rss(pid: int | None = None) -> int:
    """Resident set size of ``pid`` (default: this process) in bytes.

    Raises :class:`ProcessLookupError` when the process is gone.
    """
    pid = os.getpid() if pid is None else pid
    try:
        status = (_PROC / str(pid) / "status").read_text()
    except FileNotFoundError:
        raise ProcessLookupError(f"no process {pid} (it exited, or lives in another pid namespace)") from None
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024  # the kernel writes kB
    try:  # kernel threads and zombies have no VmRSS line
        return int((_PROC / str(pid) / "statm").read_text().split()[1]) * PAGE_SIZE
    except (FileNotFoundError, IndexError, ValueError):
        return 0


def _parent_pids() -> dict[int, int]:
    parents = {}
    for entry in _PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # exited while we looked
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        fields = stat.rsplit(")", 1)[1].split()
        parents[int(entry.name)] = int(fields[1])
    return parents


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (children, grandchildren, ...)."""
    children: dict[int, list[int]] = {}
    for child, parent in _parent_pids().items():
        children.setdefault(parent, []).append(child)
    out, todo = [], list(children.get(pid, []))
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def process_tree_rss(pid: int | None = None) -> int:
    """RSS of ``pid`` plus all its descendants, in bytes.

    An upper bound: pages shared between the processes (fork's copy-on-write, shared
    libraries) count once per process.
    """
    pid = os.getpid() if pid is None else pid
    total = process_rss(pid)
    for child in descendants(pid):
        try:
            total += process_rss(child)
        except ProcessLookupError:
            continue
    return total


# ---------------------------------------------------------------- cgroups


@dataclass(frozen=True)
class CgroupMemory:
    """One reading of a memory cgroup; bytes."""

    version: int  # 1 or 2
    path: str  # the cgroup's directory
    usage: int  # as the kernel charges it, page cache included
    working_set: int  # usage minus inactive file cache: what reclaim cannot free
    limit: int | None  # the tightest limit on the way to the root; None when unlimited
    oom_kills: int | None  # processes the OOM killer killed here; None on kernels without the counter
    events: dict[str, int]  # raw counters: v2 memory.events; v1 failcnt, under_oom, oom_kill

    @property
    def source(self) -> str:
        return f"cgroup v{self.version} {self.path}"


@dataclass(frozen=True)
class CgroupLocation:
    """Where a process's memory cgroup lives; find it once, :meth:`read` it often."""

    version: int
    path: str
    mount: str  # the hierarchy's mount point: limits are searched up to here

    def read(self) -> CgroupMemory:
        """Read the counters now; raises OSError when the cgroup has been removed."""
        d = Path(self.path)
        stat = _read_keyed(d / "memory.stat")
        if self.version == 2:
            usage = _read_int(d / "memory.current")
            inactive = stat.get("inactive_file", 0)
            events = _read_keyed(d / "memory.events")
            oom_kills = events.get("oom_kill")
            limit = _min_limit(self._ancestry("memory.max"))
        else:
            usage = _read_int(d / "memory.usage_in_bytes")
            inactive = stat.get("total_inactive_file", stat.get("inactive_file", 0))
            control = _read_keyed(d / "memory.oom_control")
            events = {"failcnt": _read_int(d / "memory.failcnt")}
            events.update({k: v for k, v in control.items() if k in ("under_oom", "oom_kill")})
            oom_kills = control.get("oom_kill")
            # hierarchical_memory_limit already folds in the ancestors' limits.
            limit = stat.get("hierarchical_memory_limit")
            if limit is None:
                limit = _read_int(d / "memory.limit_in_bytes")
            limit = None if limit >= V1_UNLIMITED else limit
        return CgroupMemory(
            version=self.version,
            path=self.path,
            usage=usage,
            working_set=max(0, usage - inactive),
            limit=limit,
            oom_kills=oom_kills,
            events=events,
        )

    def _ancestry(self, filename: str) -> Iterator[Path]:
        d, mount = Path(self.path), Path(self.mount)
        while True:
            yield d / filename
            if d == mount or mount not in d.parents:
                return
            d = d.parent


def _read_int(path: Path) -> int:
    return int(path.read_text().strip())


def _read_keyed(path: Path) -> dict[str, int]:
    """``key value`` lines (memory.stat, memory.events, memory.oom_control)."""
    out: dict[str, int] = {}
    try:
        text = path.read_text()
    except FileNotFoundError:
        return out
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("-").isdigit():
            out[parts[0]] = int(parts[1])
    return out


def _min_limit(paths: Iterator[Path]) -> int | None:
    limits = []
    for path in paths:
        try:
            text = path.read_text().strip()
        except FileNotFoundError:  # the root cgroup has no memory.max
            continue
        if text != "max":
            limits.append(int(text))
    return min(limits) if limits else None


def _unescape(path: str) -> str:
    # mountinfo writes space, tab, newline and backslash as octal escapes.
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        path = path.replace(code, char)
    return path


def _mounts() -> tuple[tuple[str, str] | None, tuple[str, str] | None]:
    """(root, mount point) of the cgroup v1 memory hierarchy and of the cgroup2 hierarchy."""
    v1 = v2 = None
    for line in (_PROC / "self" / "mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if len(fields) < 5 or len(tail) < 3:
            continue
        root, point = _unescape(fields[3]), _unescape(fields[4])
        if tail[0] == "cgroup2" and v2 is None:
            v2 = (root, point)
        elif tail[0] == "cgroup" and "memory" in tail[2].split(",") and v1 is None:
            v1 = (root, point)
    return v1, v2


def _join(mount: tuple[str, str], cgroup_path: str) -> str:
    root, point = mount
    if root != "/" and (cgroup_path == root or cgroup_path.startswith(root + "/")):
        cgroup_path = cgroup_path[len(root) :]  # the mount shows a subtree (a container)
    return os.path.normpath(os.path.join(point, cgroup_path.lstrip("/")))


def find_memory_cgroup(pid: int | None = None) -> CgroupLocation | None:
    """The memory cgroup of ``pid`` (default: this process); None when there is none to read.

    A v1 ``memory`` controller wins over a cgroup2 hierarchy (in the hybrid layout the
    unified tree carries no memory controller). None also for a process in the v2 root
    cgroup, which has no memory.current: the node's figures are the ones that matter then.
    """
    pid = os.getpid() if pid is None else pid
    try:
        lines = (_PROC / str(pid) / "cgroup").read_text().splitlines()
        v1_mount, v2_mount = _mounts()
    except OSError:
        return None
    v1_path = v2_path = None
    for line in lines:
        hierarchy, controllers, path = line.split(":", 2)
        if hierarchy == "0" and controllers == "":
            v2_path = path
        elif "memory" in controllers.split(","):
            v1_path = path
    if v1_path is not None and v1_mount is not None:
        directory = _join(v1_mount, v1_path)
        if os.path.exists(os.path.join(directory, "memory.usage_in_bytes")):
            return CgroupLocation(1, directory, v1_mount[1])
    if v2_path is not None and v2_mount is not None:
        directory = _join(v2_mount, v2_path)
        if os.path.exists(os.path.join(directory, "memory.current")):
            return CgroupLocation(2, directory, v2_mount[1])
    return None


def cgroup_memory(pid: int | None = None) -> CgroupMemory | None:
    """One reading of ``pid``'s memory cgroup; None when it has none (or it vanished)."""
    location = find_memory_cgroup(pid)
    if location is None:
        return None
    try:
        return location.read()
    except OSError:
        return None


# ---------------------------------------------------------------- node and pressure


def node_memory() -> tuple[int, int]:
    """(total, available) bytes of this machine, from /proc/meminfo."""
    info = {}
    for line in (_PROC / "meminfo").read_text().splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts:
            info[key] = int(parts[0]) * 1024
    available = info.get("MemAvailable")
    if available is None:  # kernels before 3.14
        available = info.get("MemFree", 0) + info.get("Buffers", 0) + info.get("Cached", 0)
    return info["MemTotal"], available


@dataclass(frozen=True)
class MemoryReading:
    """How close a process is to a memory limit: ``usage / limit`` under ``source``."""

    usage: int
    limit: int
    fraction: float
    source: str  # "cgroup v1 /sys/fs/cgroup/memory/...", "cgroup v2 ...", or "node"


def effective_limit(pid: int | None = None) -> int:
    """The memory limit that binds ``pid``: its cgroup's limit, capped by the node's RAM."""
    total, _ = node_memory()
    reading = cgroup_memory(pid)
    if reading is not None and reading.limit is not None:
        return min(reading.limit, total)
    return total


def memory_pressure(pid: int | None = None) -> MemoryReading:
    """The reading of ``pid`` closest to its limit: its cgroup's, or the node's.

    A cgroup without a limit is bound by the node only; one with a limit above free RAM can
    still be hit by the node's OOM killer, hence the larger fraction wins.
    """
    total, available = node_memory()
    node = MemoryReading(total - available, total, (total - available) / total, "node")
    reading = cgroup_memory(pid)
    if reading is None or reading.limit is None:
        return node
    cgroup = MemoryReading(reading.working_set, reading.limit, reading.working_set / reading.limit, reading.source)
    return cgroup if cgroup.fraction >= node.fraction else node


# ---------------------------------------------------------------- limited cgroups (tests, tools)


class CgroupPermissionError(PermissionError):
    """This machine does not let us create a memory cgroup with a limit."""


class LimitedCgroup:
    """A child memory cgroup with a hard limit (no swap); a context manager that removes it."""

    def __init__(self, location: CgroupLocation, limit_bytes: int) -> None:
        self.location = location
        self.limit_bytes = limit_bytes

    @property
    def path(self) -> Path:
        return Path(self.location.path)

    def add(self, pid: int) -> None:
        """Move ``pid`` (all its threads) into this cgroup; its later children follow it."""
        (self.path / "cgroup.procs").write_text(f"{pid}\n")

    def pids(self) -> list[int]:
        try:
            return [int(p) for p in (self.path / "cgroup.procs").read_text().split()]
        except FileNotFoundError:
            return []

    def read(self) -> CgroupMemory:
        return self.location.read()

    def oom_kills(self) -> int | None:
        """Processes the OOM killer killed in this cgroup; None if the kernel does not count."""
        return self.read().oom_kills

    def remove(self, timeout_s: float = 10.0) -> None:
        """Move any remaining processes to the parent and delete the cgroup; idempotent."""
        parent = self.path.parent / "cgroup.procs"
        deadline = time.monotonic() + timeout_s
        while self.path.exists():
            for pid in self.pids():
                with contextlib.suppress(OSError):  # it exited meanwhile
                    parent.write_text(f"{pid}\n")
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError as exc:
                if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)  # a dying task still holds the cgroup

    def __enter__(self) -> LimitedCgroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def create_limited_cgroup(name: str, limit_bytes: int, parent: str | None = None) -> LimitedCgroup:
    """Create memory cgroup ``name`` with a hard limit, under ``parent`` or next to this process.

    The default parent is this process's memory cgroup on v1, and its parent on v2 (see
    :func:`_default_parent`).

    Swap is limited too (v1 ``memory.memsw.limit_in_bytes``, v2 ``memory.swap.max=0``), so
    going over the limit means the OOM killer, not paging. Raises
    :class:`CgroupPermissionError` when the machine does not allow it (no memory controller,
    read-only cgroupfs, not delegated to us).
    """
    if not name or "/" in name or name in (".", ".."):
        raise ValueError(f"cgroup name {name!r} must be one path component, e.g. 'skewless-test-1234'")
    if limit_bytes <= 0:
        raise ValueError(f"limit_bytes ({limit_bytes}) must be > 0")
    here = find_memory_cgroup()
    if here is None:
        raise CgroupPermissionError(
            "no memory cgroup to create a child in: this process is in no cgroup v1 memory hierarchy "
            "and in no cgroup v2 cgroup with memory accounting"
        )
    base = Path(parent) if parent else _default_parent(here)
    path = base / name
    location = CgroupLocation(here.version, str(path), here.mount)
    try:
        if here.version == 2:
            _enable_v2_memory(base)
        path.mkdir()
    except FileExistsError:
        raise CgroupPermissionError(
            f"cgroup {path} already exists (left by an earlier run?); remove it with `rmdir {path}` or pick another name"
        ) from None
    except OSError as exc:
        raise CgroupPermissionError(f"cannot create cgroup {path}: {exc}") from exc
    group = LimitedCgroup(location, limit_bytes)
    try:
        if here.version == 2:
            (path / "memory.max").write_text(str(limit_bytes))
            if (path / "memory.swap.max").exists():
                (path / "memory.swap.max").write_text("0")
        else:
            (path / "memory.limit_in_bytes").write_text(str(limit_bytes))
            if (path / "memory.memsw.limit_in_bytes").exists():  # absent when swap accounting is off
                (path / "memory.memsw.limit_in_bytes").write_text(str(limit_bytes))
    except OSError as exc:
        group.remove()
        raise CgroupPermissionError(f"cannot set the memory limit of cgroup {path}: {exc}") from exc
    return group


def _default_parent(here: CgroupLocation) -> Path:
    """v1: our own cgroup. v2: our parent, unless ours already delegates memory.

    cgroup v2 lets no cgroup with processes enable controllers for children, and ours has
    this process in it; our parent does delegate memory (we have memory.current), so the
    new cgroup becomes our sibling: bound by the parent's limit, not by ours.
    """
    own = Path(here.path)
    if here.version == 1 or own == Path(here.mount):
        return own
    if "memory" in (own / "cgroup.subtree_control").read_text().split():
        return own
    return own.parent


def _enable_v2_memory(base: Path) -> None:
    control = base / "cgroup.subtree_control"
    if "memory" in control.read_text().split():
        return
    try:
        control.write_text("+memory")
    except OSError as exc:
        why = (
            "the cgroup holds processes itself (cgroup v2's no-internal-processes rule); "
            "run from a leaf cgroup whose parent has memory enabled"
            if exc.errno == errno.EBUSY
            else str(exc)
        )
        raise CgroupPermissionError(f"cannot enable the memory controller in {control}: {why}") from exc


def try_create_limited_cgroup(name: str, limit_bytes: int, parent: str | None = None) -> LimitedCgroup | None:
    """:func:`create_limited_cgroup`, or None (logged) where the machine does not allow it."""
    try:
        return create_limited_cgroup(name, limit_bytes, parent)
    except CgroupPermissionError as exc:
        logger.info("no limited cgroup: %s", exc)
        return None
