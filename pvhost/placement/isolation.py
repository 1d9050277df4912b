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
    return Isolation(
        "restricted",
        "libvirt",
        "pinned through libvirt (vcpupin): the vCPU thread is confined, other tasks may still "
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


def _kernel_thread(tid: str) -> bool:
    stat = Path(f"/proc/{tid}/stat").read_text()
    return bool(int(stat.rsplit(")", 1)[1].split()[6]) & _PF_KTHREAD)


def sharing_tasks(hierarchy: Path, skip: Path, cpus: frozenset[int]) -> TaskScan:
    """Read every cpuset of the v1 ``hierarchy`` but ``skip`` (extpv's own) whose effective
    CPUs meet ``cpus``: which of its tasks may run where (affinity, which the kernel keeps
    inside the cpuset). Tasks that exit meanwhile are left out."""
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
            with contextlib.suppress(OSError, ValueError, IndexError):
                mask = frozenset(os.sched_getaffinity(int(tid)))
                # The affinity first (a syscall); /proc only for a task that may run there.
                if mask & cpus and not _kernel_thread(tid):
                    allowed.append(mask)
        rel = "/" + str(path.relative_to(hierarchy)) if path != hierarchy else "/"
        out[rel] = tuple(allowed)
    return TaskScan(out)
