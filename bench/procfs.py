"""What the kernel says about the servers and the cores, read from /proc.

A server is measured as its whole process tree: nginx is a master and a
worker, a server with workers is several processes, and a socket-activated
server is first ``systemd-socket-activate`` and then, in the same process,
the server it executed.

CPU time comes from ``/proc/PID/task/TID/schedstat``, whose first field is
the nanoseconds each thread has spent on a CPU (the scheduler's own
account, not sampled at clock ticks), summed over every thread of every
process of the tree.  On this kernel that includes the network stack's
softirq work done in the process's context, which on loopback is part of
what serving a connection costs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")


def _parent_of(pid: int) -> int | None:
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name (field 2) is in parentheses and may hold spaces.
    return int(stat.rsplit(")", 1)[1].split()[1])


def tree(pid: int) -> list[int]:
    """``pid`` and every process descended from it that is alive now."""
    children: dict[int, list[int]] = {}
    for entry in PROC.iterdir():
        if entry.name.isdigit():
            parent = _parent_of(int(entry.name))
            if parent is not None:
                children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        if (PROC / str(current)).exists():
            found.append(current)
            todo.extend(children.get(current, []))
    return found


def cpu_ns(pids: list[int]) -> int:
    """Nanoseconds on a CPU, over every thread of ``pids``."""
    total = 0
    for pid in pids:
        try:
            threads = list((PROC / str(pid) / "task").iterdir())
        except FileNotFoundError:
            continue
        for thread in threads:
            try:
                total += int((thread / "schedstat").read_text().split()[0])
            except (FileNotFoundError, ProcessLookupError):
                pass  # the thread ended meanwhile
    return total


def rss_kib(pids: list[int]) -> int:
    """VmRSS summed over ``pids`` (pages two processes share count twice)."""
    total = 0
    for pid in pids:
        try:
            status = (PROC / str(pid) / "status").read_text()
        except FileNotFoundError:
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total


def command_line(pid: int) -> list[str]:
    """What ``pid`` is running now (empty once it is gone)."""
    try:
        raw = (PROC / str(pid) / "cmdline").read_bytes()
    except FileNotFoundError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


#: What /proc/stat counts in: ticks of this many a second.
TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class CoreTimes:
    """One core's line of /proc/stat, in clock ticks."""

    busy: int  # user, nice, system, irq, softirq
    steal: int  # taken by the hypervisor
    total: int  # all of it, idle and iowait included

    def __sub__(self, other: CoreTimes) -> CoreTimes:
        return CoreTimes(self.busy - other.busy, self.steal - other.steal, self.total - other.total)

    def busy_percent(self) -> float:
        return 100.0 * self.busy / self.total if self.total else 0.0

    def steal_percent(self) -> float:
        return 100.0 * self.steal / self.total if self.total else 0.0


def core_times() -> dict[int, CoreTimes]:
    """Every core's time so far, by core number."""
    cores = {}
    for line in (PROC / "stat").read_text().splitlines():
        name, *fields = line.split()
        if not (name.startswith("cpu") and name[3:].isdigit()):
            continue
        user, nice, system, idle, iowait, irq, softirq, steal = (int(f) for f in fields[:8])
        busy = user + nice + system + irq + softirq
        cores[int(name[3:])] = CoreTimes(busy, steal, busy + idle + iowait + steal)
    return cores


def online_cores() -> list[int]:
    """The cores this process may run on."""
    return sorted(os.sched_getaffinity(0))
