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

A task whose session was never given a group (PID 1's session, sid 0, and whatever descends from
it without ``setsid``; every kernel thread) stays in the kernel's default group, which is the
root task group itself: ``/proc/<pid>/autogroup`` is then empty, its threads' own nice values
weigh directly, and there is no group value to set (the kernel refuses the write). CI runners
started by a container's init are such tasks.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["autogroup_nice", "leads_its_session", "parse_autogroup", "set_autogroup_nice"]

_SWITCH = Path("/proc/sys/kernel/sched_autogroup_enabled")


def autogroup_nice(pid: int) -> int | None:
    """The nice value of ``pid``'s autogroup; None where no autogroup weighs ``pid``: the
    kernel has none or has it off, or ``pid`` is in the kernel's default group (then a thread's
    own nice value is what counts)."""
    try:
        if _SWITCH.read_text().strip() != "1":
            return None
        text = Path(f"/proc/{pid}/autogroup").read_text()
    except FileNotFoundError:
        return None
    return parse_autogroup(text)


def parse_autogroup(text: str) -> int | None:
    """The nice value in a ``/proc/<pid>/autogroup`` text (``/autogroup-123 nice 0``); None
    for the empty text the kernel shows for a task in its default group. Anything else is
    not a format this code knows: ValueError, not a guess."""
    if not text.strip():
        return None
    fields = text.split()
    if len(fields) != 3 or not fields[0].startswith("/autogroup-") or fields[1] != "nice":
        raise ValueError(f"unknown /proc/<pid>/autogroup format: {text!r}")
    return int(fields[2])


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
