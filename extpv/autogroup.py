"""The scheduler's *autogroup*: where a nice value weighs, and how to set the one that does.

Linux keeps a nice value per thread, but it weighs a thread only against the threads of its own
task group. With autogroup on (``kernel.sched_autogroup_enabled``, the default of most
distribution kernels), every session of a task in the root CPU cgroup is a task group of its
own with its own nice value (``/proc/<pid>/autogroup``, sched(7)): against load started in
other sessions (each ``yes`` of the paper's experiment, say) only that group value counts, and
the threads' values change nothing (measured: bench/results/vm-stages.md, where QEMU at nice -10
waited on the run queue as long as at 0). A process in a CPU cgroup of its own (a systemd unit
on a cgroup v2 host) is weighed by the cgroup's weight instead; its autogroup value is then
unused, and setting it is harmless.

The group value is the whole session's: only a session leader (a daemon, a VM the lab started
in a session of its own) may set it for itself without changing its neighbours'.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["autogroup_nice", "leads_its_session", "set_autogroup_nice"]

_SWITCH = Path("/proc/sys/kernel/sched_autogroup_enabled")


def autogroup_nice(pid: int) -> int | None:
    """The nice value of ``pid``'s autogroup; None where the kernel has no autogroup or has it
    off (then a thread's own nice value is what counts)."""
    try:
        if _SWITCH.read_text().strip() != "1":
            return None
        text = Path(f"/proc/{pid}/autogroup").read_text()
    except FileNotFoundError:
        return None
    return int(text.split()[-1])  # "/autogroup-123 nice 0"


def leads_its_session(pid: int) -> bool:
    """Whether ``pid`` leads its session (its autogroup holds its session only)."""
    return os.getsid(pid) == pid


def set_autogroup_nice(pid: int, nice: int) -> bool:
    """Give ``pid``'s autogroup (its whole session) the nice value ``nice``; False where the
    kernel has no autogroup or has it off. Raises PermissionError below the current value
    without CAP_SYS_NICE."""
    if autogroup_nice(pid) is None:
        return False
    Path(f"/proc/{pid}/autogroup").write_text(str(nice))
    return True
