"""The host-memory watchdog against a worker process that really exceeds a real memory
limit: a memory cgroup where the machine allows one (the kernel's OOM killer does the
killing), else the watchdog's own enforcement of the limit. Either way the worker is
SIGKILLed, its stacks and largest allocations were dumped on the way up, and the incident
says which rank, at which step, against which limit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from runtime.memory import HostMemoryWatchdog, StepBeacon, process_tree_rss, read_beacon, try_create_limited_cgroup

# A leak of 16 MiB per step. The dump races a leak this fast (on a loaded 2-core machine the
# kernel can kill the worker before the scan of live objects finishes), so once asked to dump
# the worker waits for the dump to land (at most 30 s) and then leaks on to its death: the test
# checks what the dump holds, not who wins the race.
WORKER = r"""
import os, sys, time
import numpy as np
from runtime.memory import StepBeacon, install_worker_side
dumps = install_worker_side(sys.argv[1], rank=3)
beacon = StepBeacon(sys.argv[2], create=False)
sys.stdout.write("ready\n"); sys.stdout.flush()
sys.stdin.readline()  # wait until the watchdog has it (and moved it into the limited cgroup)
held = []
for step in range(10_000):
    beacon.set(step)
    held.append(np.ones(2 << 20))  # 16 MiB, touched
    if os.path.exists(dumps["trigger"]):
        deadline = time.monotonic() + 30
        while not os.path.exists(dumps["allocations"]) and time.monotonic() < deadline:
            time.sleep(0.02)
    time.sleep(0.06)
"""


def _cgroups_allowed() -> bool:
    probe = try_create_limited_cgroup(f"skewless-probe-{os.getpid()}", 64 << 20)
    if probe is None:
        return False
    probe.remove()
    return True


@pytest.mark.parametrize("mode", ["cgroup", "watchdog"])
def test_worker_over_its_limit_is_killed_and_the_cause_is_readable(tmp_path: Path, mode: str) -> None:
    if mode == "cgroup" and not _cgroups_allowed():
        pytest.skip("this machine does not let us create a memory cgroup")
    limit = 320 << 20
    diag = tmp_path / "diagnostics"
    beacon = StepBeacon(tmp_path / "rank3.step")
    dog = HostMemoryWatchdog(
        diag, soft_fraction=0.6, poll_interval_s=0.05, memory_limit_bytes=limit, cgroup_name=f"skewless-t-{os.getpid()}"
    )
    if mode == "watchdog":  # force the fallback path
        dog.use_cgroups = False
    assert dog.enforces_limit == (mode == "watchdog")
    worker = subprocess.Popen(
        [sys.executable, "-c", WORKER, str(diag), beacon.path],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    try:
        assert worker.stdout is not None and worker.stdin is not None
        assert worker.stdout.readline().strip() == "ready"
        dumps = {
            "stacks": str(diag / f"stacks-rank3-pid{worker.pid}.txt"),
            "allocations": str(diag / f"allocations-rank3-pid{worker.pid}.txt"),
            "trigger": str(diag / f"dump-request-rank3-pid{worker.pid}"),
        }
        if mode == "watchdog":  # it limits RSS: on top of what the interpreter and imports hold
            limit = dog.memory_limit_bytes = process_tree_rss(worker.pid) + (320 << 20)
        source = dog.register(3, worker.pid, beacon.path, dumps)
        assert ("cgroup" in source) if mode == "cgroup" else ("watchdog" in source)
        dog.start()
        worker.stdin.write("go\n")
        worker.stdin.flush()
        assert worker.wait(timeout=60) == -9  # SIGKILL: exit code 137 from a shell
    finally:
        if worker.poll() is None:
            worker.kill()
        deadline = time.monotonic() + 10
        while not dog.incidents and time.monotonic() < deadline:
            time.sleep(0.05)
        dog.stop()

    [incident] = dog.incidents
    assert incident.rank == 3 and incident.pid == worker.pid and incident.oom_killed
    assert incident.step is not None and incident.step > 5 and incident.step == read_beacon(beacon.path)
    assert incident.limit_bytes == limit
    assert "kernel OOM killer" in incident.cause if mode == "cgroup" else "watchdog" in incident.cause
    # the soft threshold made the worker dump its stacks (faulthandler) and largest arrays
    stacks = Path(dumps["stacks"]).read_text()
    assert "Thread" in stacks or "thread" in stacks
    allocations = Path(dumps["allocations"]).read_text()
    assert "numpy.ndarray shape=(2097152,)" in allocations
    saved = json.loads((diag / f"incident-rank3-pid{worker.pid}.json").read_text())
    assert saved["step"] == incident.step
    report = (diag / "REPORT.md").read_text()
    assert f"rank 3 (pid {worker.pid})" in report and f"at step {incident.step}" in report
    assert f"{limit / (1 << 20):,.0f} MiB limit" in report


def test_step_beacon_is_shared_between_processes(tmp_path: Path) -> None:
    beacon = StepBeacon(tmp_path / "b.step")
    assert read_beacon(beacon.path) == -1
    beacon.set(41)
    out = subprocess.run(
        [sys.executable, "-c", f"from runtime.memory import read_beacon; print(read_beacon({beacon.path!r}))"],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert out.stdout.strip() == "41"
    assert read_beacon(tmp_path / "missing") is None
