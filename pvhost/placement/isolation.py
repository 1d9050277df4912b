"""What a pin achieved for its pCPU, read back from the kernel: ``isolated`` or ``restricted``.

``isolated``: no task but the vCPU thread may run on the pCPU (kernel threads aside: per-CPU
ones run on every CPU, in a cgroup v2 isolated partition too). ``restricted``: the vCPU thread
is confined to the pCPU, other tasks may still run there — and then why, as a short code (the
``why`` label of ``/metrics``) and a sentence that says what would isolate it.

The decisions are pure functions of what the backend read back (:func:`cgroup2_isolation`,
:func:`cgroup1_isolation`); :func:`sharing_tasks` is the read for cgroup v1, where the kernel
keeps no record of isolation: it asks, per task, whether the task may run on the pCPU.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pvproto import CpuListError, IsolationMode, parse_cpulist

__all__ = [
    "ISOLATED",
    "Isolation",
    "IsolationMode",
    "KernelThreads",
    "TaskScan",
    "cgroup1_isolation",
    "cgroup2_isolation",
    "libvirt_isolation",
    "sharing_tasks",
]

#: ``flags`` bit of a kernel thread in /proc/<tid>/stat (include/linux/sched.h).
_PF_KTHREAD = 0x00200000


@dataclass(frozen=True)
class Isolation:
    """One pin's isolation. ``why`` (a code) and ``reason`` (a sentence) are empty when
    isolated."""

    mode: IsolationMode
    why: str = ""
    reason: str = ""

    def fields(self) -> dict[str, Any]:
        """The keys a placement carries in ``pvctl status --json``."""
        return {"isolation": self.mode, "isolation_reason": self.reason or None}


ISOLATED = Isolation("isolated")


def cgroup2_isolation(partition: str | None) -> Isolation:
    """cgroup v2: isolated exactly when the vCPU cgroup reads back as a valid ``isolated``
    partition (the kernel then takes the pCPU from every other cgroup's effective CPUs).
    ``partition``: what ``cpuset.cpus.partition`` says, None when the kernel has no such file
    or pins without partitions."""
    if partition == "isolated":
        return ISOLATED
    if partition is None:
        return Isolation(
            "restricted",
            "no-partitions",
            "this kernel pins without cpuset partitions (remote partitions need "
            "cpuset.cpus.exclusive, Linux >= 6.7): other tasks may still run on its pCPU",
        )
    if "invalid" in partition:
        return Isolation(
            "restricted",
            "partition-invalid",
            f"the kernel turned the partition {partition!r}: other tasks may run "
            "there (pvctl verify)",
        )
    return Isolation(
        "restricted",
        "not-isolated-partition",
        f"the vCPU cgroup is a {partition!r} partition, not an isolated one: other tasks may "
        f"still run on its pCPU",
    )


def cgroup1_isolation(isolate_from: Iterable[str], sharing: Mapping[str, int]) -> Isolation:
    """cgroup v1: isolated exactly when no task outside extpv's cpusets may run on the pCPU.

    ``sharing``: per cpuset (``/`` the root), how many tasks (kernel threads not counted) may
    run on the pCPU now; ``isolate_from``: the cpusets the operator named."""
    sharing = {cpuset: n for cpuset, n in sharing.items() if n}
    if not sharing:
        return ISOLATED
    total = sum(sharing.values())
    named = list(isolate_from)
    where = ", ".join(f"{n} in {c}" for c, n in sorted(sharing.items())[:4])
    if len(sharing) > 4:
        where += ", …"
    if not named:
        return Isolation(
            "restricted",
            "no-isolate-from",
            f"cgroup v1 without placement.isolate_from: {total} other task(s) may still run on "
            f"its pCPU ({where}); name the cpusets they run in",
        )
    root = sharing.get("/", 0)
    if root:
        return Isolation(
            "restricted",
            "root-cpuset-tasks",
            f"{root} task(s) of the root cpuset may still run on its pCPU (cgroup v1 cannot "
            f"take CPUs from the root cpuset; placement.isolate_from keeps {', '.join(named)} "
            f"off it): move them into a cpuset named in isolate_from, or use cgroup v2",
        )
    return Isolation(
        "restricted",
        "other-cpusets",
        f"{total} task(s) in cpusets not named in placement.isolate_from may still run on "
        f"its pCPU ({where}): add those cpusets to isolate_from",
    )


def libvirt_isolation() -> Isolation:
    """A libvirt domain's pin where extpv isolates nothing (no cgroup v1 ``isolate_from``
    backend: libvirt's own vcpuN cgroups are no partitions extpv made)."""
    return Isolation(
        "restricted",
        "libvirt",
        "pinned through libvirt (vcpupin): the vCPU thread is confined; extpv isolates "
        "libvirt domains on cgroup v1 only (placement.isolate_from), other tasks may still "
        "run on its pCPU",
    )


@dataclass(frozen=True)
class TaskScan:
    """Per cpuset (path relative to the hierarchy, ``/`` the root), the allowed CPUs of each
    of its tasks that is not a kernel thread."""

    tasks: Mapping[str, tuple[frozenset[int], ...]]

    def sharing(self, pcpu: int) -> dict[str, int]:
        """How many tasks of each cpuset may run on ``pcpu``."""
        return {c: sum(pcpu in a for a in allowed) for c, allowed in self.tasks.items()}


def _read_proc(path: str) -> bytes:
    # os.open/os.read: a third of the cost of Path.read_text (no text layer), which counts
    # when every task of the host is read after each placement change.
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.read(fd, 4096)
    finally:
        os.close(fd)


def _kernel_thread(tid: str) -> bool:
    stat = _read_proc(f"/proc/{tid}/stat")
    return bool(int(stat.rsplit(b")", 1)[1].split()[6]) & _PF_KTHREAD)


class KernelThreads:
    """Which tasks are user tasks, remembered per task (not per number) between scans.

    A user task never becomes a kernel thread (the flag is set only when a kernel thread is
    created), but its tid can be given to another task once it exits. So each user task is
    remembered with the inode number of its ``/proc/<tid>`` directory, which procfs makes
    anew for a new task of the same tid (the old entry fails revalidation: its ``struct
    pid`` has no task), and the answer is reused only while ``/proc/<tid>`` still has that
    inode; a stat of that directory costs a fraction of reading ``/proc/<tid>/stat``. An
    entry merely evicted from the dentry cache gets a new inode too: a miss, never a stale
    hit. Kernel threads are read every time: nothing is assumed about what they may become.

    Only tasks seen in the latest scan are kept, so the memory is that of the host's tasks.
    """

    def __init__(self) -> None:
        self._users: dict[str, int] = {}
        self._seen: dict[str, int] = {}
        #: Tasks whose /proc/<tid>/stat was read (not answered from memory): for tests.
        self.reads = 0

    def __call__(self, tid: str) -> bool:
        """Whether task ``tid`` is a kernel thread; OSError when it is gone."""
        inode = os.stat(f"/proc/{tid}").st_ino
        if self._users.get(tid) == inode:
            self._seen[tid] = inode
            return False
        self.reads += 1
        if _kernel_thread(tid):
            return True
        # Read after the stat: a new task under this tid since then has another inode.
        self._seen[tid] = inode
        return False

    def scanned(self) -> None:
        """A scan is over: keep the user tasks it saw, forget the others."""
        self._users, self._seen = self._seen, {}


def sharing_tasks(
    hierarchy: Path,
    skip: Path,
    cpus: frozenset[int],
    kernel_threads: KernelThreads | None = None,
    ignore: frozenset[int] = frozenset(),
) -> TaskScan:
    """Read every cpuset of the v1 ``hierarchy`` but ``skip`` (extpv's own) whose effective
    CPUs meet ``cpus``: which of its tasks may run where (affinity, which the kernel keeps
    inside the cpuset). Tasks that exit meanwhile are left out, and so are the ``ignore``
    ones (pinned vCPU threads that live outside ``skip``: libvirt keeps them in its own).
    ``kernel_threads``: the answers of earlier scans (:class:`KernelThreads`), to read each
    task's flags only once."""
    is_kernel_thread = kernel_threads or _kernel_thread
    out: dict[str, tuple[frozenset[int], ...]] = {}
    for here, dirs, _files in os.walk(hierarchy):
        path = Path(here)
        if path == skip:
            dirs.clear()
            continue
        try:
            effective = parse_cpulist((path / "cpuset.effective_cpus").read_text())
            tids = (path / "tasks").read_text().split()
        except (OSError, CpuListError):
            continue  # removed by its owner meanwhile
        if not effective & cpus:
            continue
        allowed = []
        for tid in tids:
            if ignore and int(tid) in ignore:
                continue
            with contextlib.suppress(OSError, ValueError, IndexError):
                mask = frozenset(os.sched_getaffinity(int(tid)))
                # The affinity first (a syscall); /proc only for a task that may run there.
                if mask & cpus and not is_kernel_thread(tid):
                    allowed.append(mask)
        rel = "/" + str(path.relative_to(hierarchy)) if path != hierarchy else "/"
        out[rel] = tuple(allowed)
    if kernel_threads is not None:
        kernel_threads.scanned()
    return TaskScan(out)
