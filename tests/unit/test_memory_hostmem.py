"""Host memory readers: real /proc, a fake /proc + cgroupfs for both cgroup versions, a real OOM kill."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest

from runtime.memory import _hostmem
from tests.conftest import wait_for_condition

MIB, GIB = 2**20, 2**30
PID = 4321


# ------------------------------------------------------------ processes (real /proc)


def test_process_rss_sees_an_allocation() -> None:
    before = _hostmem.process_rss()
    block = np.ones(100 * MIB // 8)  # written, so resident
    after = _hostmem.process_rss(os.getpid())
    assert after - before >= 90 * MIB
    del block


def test_process_rss_of_a_gone_process() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    with pytest.raises(ProcessLookupError, match=rf"no process {child.pid}"):
        _hostmem.process_rss(child.pid)


def test_process_tree_rss_counts_descendants() -> None:
    code = "import sys; b = b'x' * (80 * 2**20); print('ready', flush=True); sys.stdin.readline()"
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        assert child.pid in _hostmem.descendants(os.getpid())
        own, tree = _hostmem.process_rss(), _hostmem.process_tree_rss()
        assert tree - own >= 80 * MIB
    finally:
        child.communicate("done\n", timeout=30)


def test_node_memory() -> None:
    total, available = _hostmem.node_memory()
    assert total > available > 0


def test_this_machines_cgroup_reads() -> None:
    location = _hostmem.find_memory_cgroup()
    if location is None:
        pytest.skip("this process is in no memory cgroup with accounting")
    reading = location.read()
    assert reading.version in (1, 2)
    assert reading.usage > 0 and 0 <= reading.working_set <= reading.usage
    assert reading.source == f"cgroup v{reading.version} {location.path}"
    assert _hostmem.effective_limit() <= _hostmem.node_memory()[0]


# ------------------------------------------------------------ cgroups (fake /proc and cgroupfs)


def _fake_proc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mounts: list[str], cgroup: str, pid: int = PID) -> None:
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / str(pid)).mkdir()
    base = "22 27 0:21 / /proc rw,relatime - proc proc rw"
    (proc / "self" / "mountinfo").write_text("\n".join([base, *mounts]) + "\n")
    (proc / str(pid) / "cgroup").write_text(cgroup)
    (proc / "meminfo").write_text("MemTotal:       16777216 kB\nMemFree:  1000 kB\nMemAvailable:    8388608 kB\n")
    monkeypatch.setattr(_hostmem, "_PROC", proc)


def _files(directory: Path, **files: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (directory / name.replace("__", ".")).write_text(text)


def test_cgroup_v2_with_a_limit_on_an_ancestor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mount = tmp_path / "cg 2"  # mountinfo escapes the space
    mount_field = str(mount).replace(" ", "\\040")
    _fake_proc(
        tmp_path, monkeypatch, [f"41 31 0:38 / {mount_field} rw,relatime - cgroup2 cgroup2 rw"], "0::/job/leaf\n"
    )
    _files(mount, cgroup__controllers="cpu memory\n")
    _files(mount / "job", memory__max="1073741824\n")
    _files(
        mount / "job" / "leaf",
        memory__current=f"{900 * MIB}\n",
        memory__max="max\n",
        memory__events="low 0\nhigh 0\nmax 7\noom 2\noom_kill 1\n",
        memory__stat=f"anon 5\ninactive_file {100 * MIB}\n",
    )
    location = _hostmem.find_memory_cgroup(PID)
    assert location == _hostmem.CgroupLocation(2, str(mount / "job" / "leaf"), str(mount))
    reading = _hostmem.cgroup_memory(PID)
    assert reading is not None
    assert (reading.usage, reading.working_set, reading.limit) == (900 * MIB, 800 * MIB, GIB)
    assert reading.oom_kills == 1
    assert reading.events == {"low": 0, "high": 0, "max": 7, "oom": 2, "oom_kill": 1}
    assert _hostmem.effective_limit(PID) == GIB
    pressure = _hostmem.memory_pressure(PID)
    assert pressure == _hostmem.MemoryReading(800 * MIB, GIB, 800 / 1024, f"cgroup v2 {mount}/job/leaf")

    (mount / "job" / "memory.max").write_text("max\n")  # unlimited all the way up: the node binds
    assert _hostmem.cgroup_memory(PID).limit is None  # type: ignore[union-attr]
    assert _hostmem.effective_limit(PID) == 16 * GIB
    assert _hostmem.memory_pressure(PID) == _hostmem.MemoryReading(8 * GIB, 16 * GIB, 0.5, "node")


def test_cgroup_v2_root_has_no_accounting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mount = tmp_path / "cg2"
    _fake_proc(tmp_path, monkeypatch, [f"41 31 0:38 / {mount} rw - cgroup2 cgroup2 rw"], "0::/\n")
    _files(mount, cgroup__controllers="memory\n")
    assert _hostmem.find_memory_cgroup(PID) is None
    assert _hostmem.memory_pressure(PID).source == "node"


def test_cgroup_v1_in_a_container_hybrid_layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    memory, unified = tmp_path / "memory", tmp_path / "unified"
    _fake_proc(
        tmp_path,
        monkeypatch,
        [
            f"35 31 0:32 /docker/abc {memory} rw,relatime - cgroup cgroup rw,memory",
            f"41 31 0:38 / {unified} rw,relatime - cgroup2 cgroup2 rw",
        ],
        "9:name=systemd:/docker/abc\n4:memory:/docker/abc\n0::/docker/abc\n",
    )
    _files(unified / "docker" / "abc", memory__current="1\n")  # v1 memory must still win
    _files(
        memory,  # the mount shows the container's own cgroup as its root
        memory__usage_in_bytes=f"{500 * MIB}\n",
        memory__limit_in_bytes="9223372036854771712\n",
        memory__stat=f"cache 0\ntotal_inactive_file {50 * MIB}\nhierarchical_memory_limit {2 * GIB}\n",
        memory__oom_control="oom_kill_disable 0\nunder_oom 0\noom_kill 3\n",
        memory__failcnt="12\n",
    )
    reading = _hostmem.cgroup_memory(PID)
    assert reading == _hostmem.CgroupMemory(
        version=1,
        path=str(memory),
        usage=500 * MIB,
        working_set=450 * MIB,
        limit=2 * GIB,  # an ancestor's limit, via hierarchical_memory_limit
        oom_kills=3,
        events={"failcnt": 12, "under_oom": 0, "oom_kill": 3},
    )
    # An older kernel: no oom_kill counter, no limit anywhere.
    _files(
        memory,
        memory__stat="total_inactive_file 0\nhierarchical_memory_limit 9223372036854771712\n",
        memory__oom_control="oom_kill_disable 0\nunder_oom 0\n",
    )
    reading = _hostmem.cgroup_memory(PID)
    assert reading is not None and reading.limit is None and reading.oom_kills is None
    assert _hostmem.memory_pressure(PID).source == "node"


def test_no_cgroup_file_means_no_cgroup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_proc(tmp_path, monkeypatch, [], "")
    assert _hostmem.find_memory_cgroup(99999) is None
    assert _hostmem.cgroup_memory(PID) is None


def test_limited_cgroup_on_v2_is_a_sibling_with_swap_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mount = tmp_path / "cg2"
    _fake_proc(tmp_path, monkeypatch, [f"41 31 0:38 / {mount} rw - cgroup2 cgroup2 rw"], "0::/job/me\n", os.getpid())
    _files(mount / "job", cgroup__subtree_control="cpu memory\n")
    # This process's own cgroup holds it, so it cannot delegate memory to a child.
    _files(mount / "job" / "me", memory__current="1\n", cgroup__subtree_control="\n")
    group = _hostmem.create_limited_cgroup("limited", 200 * MIB)
    assert group.path == mount / "job" / "limited"
    assert (group.path / "memory.max").read_text() == str(200 * MIB)
    group.add(1234)
    assert (group.path / "cgroup.procs").read_text() == "1234\n"
    with pytest.raises(_hostmem.CgroupPermissionError, match=r"already exists .*`rmdir "):
        _hostmem.create_limited_cgroup("limited", 200 * MIB)


# ------------------------------------------------------------ limited cgroup (real)


def test_create_limited_cgroup_checks_its_arguments() -> None:
    with pytest.raises(ValueError, match="must be one path component"):
        _hostmem.create_limited_cgroup("a/b", GIB)
    with pytest.raises(ValueError, match=r"limit_bytes \(0\) must be > 0"):
        _hostmem.create_limited_cgroup("ok", 0)


@pytest.mark.timeout(60)
def test_a_process_over_its_cgroup_limit_is_oom_killed() -> None:
    name = f"skewless-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        group = _hostmem.create_limited_cgroup(name, 200 * MIB)
    except _hostmem.CgroupPermissionError as exc:
        pytest.skip(f"this machine does not allow a limited memory cgroup: {exc}")
    with group:
        assert group.read().limit == 200 * MIB
        before = group.oom_kills()
        if before is None:
            pytest.skip("this kernel does not count OOM kills per cgroup")
        # Waits for the go, then writes 400 MiB (bytes * n touches every page).
        code = "import sys; sys.stdin.readline(); data = b'x' * (400 * 2**20); print('survived', flush=True)"
        child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        group.add(child.pid)
        assert group.pids() == [child.pid]
        out, _ = child.communicate("go\n", timeout=50)
        assert child.returncode == -signal.SIGKILL, out
        assert "survived" not in out
        wait_for_condition(lambda: (group.oom_kills() or 0) > before, timeout=10, message="oom_kill counter")
        assert group.pids() == []
    assert not group.path.exists()
    group.remove()  # idempotent
