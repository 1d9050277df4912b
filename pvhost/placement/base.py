"""What every placement backend offers: apply (pin) / verify / undo (unpin) with saved state.

A backend is driven by one daemon and is not thread-safe; calls are synchronous and short
(cgroupfs writes). Every ``pin`` either leaves the vCPU thread restricted to the planned pCPU
and verified, or undoes what it changed and raises :class:`PlacementError`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from pvhost.errors import PlacementError
from pvproto import CpuListError, parse_cpulist

__all__ = [
    "PlacementBackend",
    "read_cpus",
    "read_text",
    "remove_cgroup",
    "restore_own_affinity",
    "thread_alive",
    "thread_allowed_cpus",
    "write_text",
]


class PlacementBackend(Protocol):
    #: ``cgroup2`` or ``cgroup1``: shown in ``pvctl status`` and AffinityResult.
    name: str

    def setup(self, eligible: frozenset[int]) -> None:
        """Create extpv's own cgroup holding the CPUs that may ever be pinned."""

    def attach(self, vm: str, qemu_pid: int, vcpu_tids: Mapping[int, int]) -> None:
        """Prepare a VM once (v2: move its threads into their cgroups)."""

    def pin(self, vm: str, vcpu: int, tid: int, pcpu: int) -> None:
        """Restrict vCPU thread ``tid`` to ``pcpu``; verified, or undone and raised."""

    def unpin(self, vm: str, vcpu: int) -> None:
        """Undo ``pin`` exactly."""

    def detach(self, vm: str) -> None:
        """Undo everything done for ``vm`` and remove its cgroups."""

    def pins(self) -> dict[str, dict[int, int]]:
        """Current pins: VM → vCPU → pCPU."""

    def reconcile(self, live: Mapping[str, Mapping[int, int]]) -> dict[str, dict[int, int]]:
        """After a restart: adopt pins of live VMs (VM → vCPU → tid) whose thread is still
        the same vCPU thread; undo everything else. Returns the adopted pins."""

    def describe(self) -> dict[str, Any]:
        """Status for operators: per VM and vCPU, cgroup, cpus and partition state."""

    def teardown(self) -> None:
        """Remove extpv's own cgroup if nothing is left in it."""


def read_text(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError as err:
        raise PlacementError(f"cannot read {path}: {err.strerror}") from err


def write_text(path: Path, value: str) -> None:
    """Write one cgroupfs value; the kernel's errno becomes a message naming file and value."""
    try:
        fd = os.open(path, os.O_WRONLY)
    except OSError as err:
        raise PlacementError(f"cannot open {path}: {err.strerror}") from err
    try:
        os.write(fd, value.encode() if value else b"\n")
    except OSError as err:
        code = errno.errorcode.get(err.errno or 0, "?")
        raise PlacementError(
            f"writing {value!r} to {path} failed: {err.strerror} ({code})"
        ) from err
    finally:
        os.close(fd)


def read_cpus(path: Path) -> frozenset[int]:
    text = read_text(path)
    try:
        return parse_cpulist(text)
    except CpuListError as err:
        raise PlacementError(f"{path}: {err}") from err


def thread_alive(tid: int) -> bool:
    return Path(f"/proc/{tid}").exists()


def thread_allowed_cpus(tid: int) -> frozenset[int]:
    """``Cpus_allowed_list`` of ``/proc/<tid>/status``: what the scheduler really allows."""
    try:
        for line in Path(f"/proc/{tid}/status").read_text().splitlines():
            if line.startswith("Cpus_allowed_list:"):
                return parse_cpulist(line.split(":", 1)[1])
    except (OSError, CpuListError) as err:
        raise PlacementError(f"cannot read the affinity of thread {tid}: {err}") from err
    raise PlacementError(f"/proc/{tid}/status has no Cpus_allowed_list")


def _kernel_keeps_user_mask(release: str) -> bool:
    m = re.match(r"(\d+)\.(\d+)", release)
    return m is not None and (int(m.group(1)), int(m.group(2))) >= (6, 2)


#: Since Linux 6.2 the kernel remembers the mask a thread asked for with sched_setaffinity
#: (its user mask) and derives its affinity on every cpuset change as cpuset ∩ user mask.
KERNEL_KEEPS_USER_MASK = _kernel_keeps_user_mask(os.uname().release)


def possible_cpus() -> frozenset[int]:
    try:
        return parse_cpulist(Path("/sys/devices/system/cpu/possible").read_text())
    except (OSError, CpuListError):
        return frozenset(range(os.cpu_count() or 1))


def restore_own_affinity(tid: int, prev_affinity: set[int], prev_cpuset: frozenset[int]) -> None:
    """Give ``tid`` back the affinity it chose itself, after the cgroup side of an undo.

    ``prev_affinity`` and ``prev_cpuset`` (its cpuset's effective CPUs) are from before the pin.
    On kernels that keep the user mask the cgroup undo is already exact, and calling
    sched_setaffinity would be wrong: the mask passed becomes the new user mask, so a mask
    narrowed by the cpusets of the moment (other vCPUs isolated) would stay narrowed when
    those CPUs come back (measured on 6.12: vCPU threads left on ``0-1``, ``0,2`` … after a full
    undo). Older kernels reset the affinity to the cpuset on every change: there the thread's own
    choice is put back, counting the CPUs its cpuset hid at pin time as allowed (unknowable).
    """
    if KERNEL_KEEPS_USER_MASK:
        return
    own = set(prev_affinity) | (possible_cpus() - prev_cpuset)
    # EINVAL: none of its CPUs is in its cpuset now (the kernel keeps the cpuset's); ESRCH: gone.
    with contextlib.suppress(OSError):
        os.sched_setaffinity(tid, own)


def remove_cgroup(path: Path) -> None:
    """rmdir a cgroup of ours; one already gone is fine, any other failure is reported."""
    try:
        path.rmdir()
    except FileNotFoundError:
        pass
    except OSError as err:
        raise PlacementError(f"cannot remove cgroup {path}: {err.strerror}") from err
