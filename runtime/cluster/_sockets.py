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
            address = ipaddress.ip_address(b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4)))
            mapped = getattr(address, "ipv4_mapped", None)  # an IPv6 socket bound to ::ffff:127.0.0.1
            sockets[fields[9]] = (str(mapped or address), int(hexport, 16))
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
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:  # gone, or not ours
            continue
        links = []
        for fd in fds:
            try:
                links.append(os.readlink(fd))
            except OSError:  # closed since the listing (the listing's own fd, in this process)
                continue
        for link in links:
            inode = link[8:-1] if link.startswith("socket:[") else ""
            if inode in sockets:
                found.append(Listener(pid, name, *sockets[inode]))
    return found
