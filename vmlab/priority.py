"""QEMU's CPU priority: one nice value for every thread of the process.

Linux keeps a nice value per thread, and a new thread inherits its creator's. QEMU creates its
vCPU, I/O and worker threads while it starts (and more later), so renicing the process once
would miss threads made meanwhile. :func:`renice_all_threads` therefore sets every thread it
finds and scans again until a whole pass finds each one at the value: from then on every thread
QEMU creates descends from a reniced one.

A thread's value weighs it only inside its task group; where the scheduler's autogroup is on,
the session's group value is what weighs QEMU against other sessions' load
(:mod:`extpv.autogroup`). QEMU leads a session of its own (the lab starts it so), and the lab
gives that group the same value.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

__all__ = ["renice_all_threads", "thread_nices"]

#: A pass that still finds a thread to change is repeated; QEMU settles within a few.
_MAX_PASSES = 50


def thread_nices(pid: int) -> dict[int, int]:
    """Each live thread of ``pid`` → its nice value (threads that end meanwhile are left out)."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(ProcessLookupError):
            out[int(task.name)] = os.getpriority(os.PRIO_PROCESS, int(task.name))
    return out


def renice_all_threads(pid: int, nice: int) -> int:
    """Give every thread of ``pid`` the nice value ``nice``; returns how many it has now.

    Raises PermissionError where the caller may not (below the current value needs
    CAP_SYS_NICE), ProcessLookupError when the process is gone, RuntimeError when threads keep
    appearing at another value after many passes.
    """
    for _ in range(_MAX_PASSES):
        changed = 0
        nices = thread_nices(pid)
        if not nices:
            raise ProcessLookupError(f"process {pid} has no threads (it ended)")
        for tid, now in nices.items():
            if now != nice:
                with contextlib.suppress(ProcessLookupError):
                    os.setpriority(os.PRIO_PROCESS, tid, nice)
                changed += 1
        if not changed:
            return len(nices)
        time.sleep(0.01)
    raise RuntimeError(f"threads of process {pid} kept appearing at another nice value")
