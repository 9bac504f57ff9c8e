"""Is the process that holds something (a ledger claim, a Dagster run) still alive?

Only a process on this host can be judged: one elsewhere is taken to be alive (its lease or
the run's monitoring tells). "This host" is the hostname together with the boot and the pid
namespace (`host_id`): containers sharing a hostname (`--network host`) have pids of their
own, and a reboot reuses pids. A pid is compared with its start time, so a pid reused by a
younger process does not pass for the old one; a zombie (killed, not yet reaped) is gone.
"""

from __future__ import annotations

import os
import socket
from functools import cache
from pathlib import Path

import psutil


@cache
def host_id() -> str:
    """This host as far as its pids are concerned: hostname, boot id, pid namespace."""
    parts = [socket.gethostname()]
    try:
        parts.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip()[:8])
        parts.append(str(os.stat("/proc/self/ns/pid").st_ino))
    except OSError:
        pass  # not Linux: the hostname alone
    return ":".join(parts)


def started_at(pid: int | None = None) -> float | None:
    """When process `pid` (default: this one) started, in seconds since the epoch."""
    try:
        return psutil.Process(pid or os.getpid()).create_time()
    except psutil.Error:
        return None


def process_gone(host: str, pid: int, started: float | None = None) -> str | None:
    """Why that process is certainly gone, or None (alive, or not ours to judge).

    `host` is the `host_id()` it recorded. `started` is when the process was known to be
    running (its start time, or any later moment it was seen alive): a process of that pid
    that started after it is another one.
    """
    if host != host_id():
        return None
    name = host.split(":", 1)[0]
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return f"process {pid} on {name} was killed"
        if started is not None and process.create_time() > started + 1.0:
            return f"pid {pid} on {name} is another process now"
        return None
    except psutil.NoSuchProcess:
        return f"process {pid} on {name} is gone"
    except psutil.Error:  # cannot tell (permissions): take it as alive
        return None
