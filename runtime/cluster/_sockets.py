"""Which processes listen where: TCP listening sockets read from /proc (Linux)."""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple


class Listener(NamedTuple):
    pid: int
    process: str
    host: str
    port: int


def _listening_inodes() -> dict[str, tuple[str, int]]:
    sockets: dict[str, tuple[str, int]] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] != "0A":  # LISTEN
                continue
            hexhost, hexport = fields[1].rsplit(":", 1)
            raw = bytes.fromhex(hexhost)
            # /proc prints each 32-bit word in host (little-endian) order
            host = str(ipaddress.ip_address(b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))))
            sockets[fields[9]] = (host, int(hexport, 16))
    return sockets


def listening_sockets(pids: Iterable[int] | None = None) -> list[Listener]:
    """Every listening TCP socket of ``pids`` (default: every process this user can inspect)."""
    sockets = _listening_inodes()
    if pids is None:
        pids = (int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit())
    found = []
    for pid in sorted(pids):
        try:
            name = Path(f"/proc/{pid}/comm").read_text().strip()
            links = [os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()]
        except OSError:  # gone, or not ours
            continue
        for link in links:
            inode = link[8:-1] if link.startswith("socket:[") else ""
            if inode in sockets:
                found.append(Listener(pid, name, *sockets[inode]))
    return found
