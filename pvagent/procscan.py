"""Threads that were pinned before the agent started, read from ``/proc``.

The affinity program sees ``sched_setaffinity`` calls and clones from the moment it is
attached; a thread that pinned itself earlier (before a restart of the agent, a crash, an
upgrade) would otherwise be invisible until it pins itself again, and the host would undo a
placement the guest still wants. At a fresh load the agent seeds its table with these.

Kernel threads are skipped: per-CPU kthreads are bound by the kernel, not by a request.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from pvproto import CpuListError, parse_cpulist

__all__ = ["pinned_threads"]

#: ``PF_KTHREAD`` in the flags field of ``/proc/<pid>/stat``.
_PF_KTHREAD = 0x00200000


def _is_kthread(stat: str) -> bool:
    # Fields after the command (which may hold spaces and parentheses): state is the first,
    # flags the seventh.
    fields = stat.rsplit(")", 1)[-1].split()
    return len(fields) > 6 and int(fields[6]) & _PF_KTHREAD != 0


def pinned_threads(proc: Path = Path("/proc")) -> dict[int, frozenset[int]]:
    """tid → the CPUs it may run on, for every live user thread (the caller filters)."""
    found: dict[int, frozenset[int]] = {}
    for task in proc.glob("[0-9]*/task/[0-9]*"):
        try:
            if _is_kthread((task / "stat").read_text()):
                continue
            status = (task / "status").read_text()
        except (OSError, ValueError):
            continue  # it exited meanwhile
        for line in status.splitlines():
            if line.startswith("Cpus_allowed_list:"):
                with contextlib.suppress(CpuListError):
                    found[int(task.name)] = parse_cpulist(line.split(":", 1)[1].strip())
                break
    return found
