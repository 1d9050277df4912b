"""The local-partition chain: isolation on cgroup v2 kernels without remote partitions.

Kernels older than 6.7 (Debian 12's 6.1) have the ``isolated`` partition type but no
``cpuset.cpus.exclusive``: a partition's parent must itself be a valid partition root, up to the
root cgroup. So while a VM holds a pin, the chain is::

    extpv.slice     partition root, cpuset.cpus = all CPUs of the VM partitions below
      vm-<name>     partition root, cpuset.cpus = its pinned pCPUs + one extra CPU
        vcpu<N>     partition isolated, cpuset.cpus = its pCPU

and everything is ``member`` with empty ``cpuset.cpus`` again once nothing is pinned, so CPUs
are taken from the rest of the host only while a guest wants them.

The extra CPU is forced by the kernel (measured on 6.1, docs/cgroup2-local-partitions.md): the
VM's cgroup is an ancestor of all of QEMU's threads, and a partition whose non-partition
children hold tasks may not hand out its last CPU ("Parent unable to distribute cpu
downstream"). The emulator and the unpinned vCPUs of a VM with pins run on that one CPU. The
kernel also refuses to enable a VM partition that takes *all* of the slice's CPUs, so the slice
first grows by one spare CPU (taken from the host for the duration of the step, when the host
has one to spare), the VM partition is set, and the slice shrinks to the exact sum.

Every partition write is read back (the kernel accepts the write and only the read-back shows
``root invalid (<reason>)``): an invalid state raises :class:`PartitionInvalid` with the
kernel's reason, and the caller undoes the pin. All kernel writes of local mode go through this
module's :func:`write_text` (the crash tests stop a process at one of them).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

from pvhost.errors import PartitionInvalid, PlacementError
from pvhost.placement.base import read_cpus, read_text, write_text
from pvproto import format_cpulist

__all__ = [
    "clear_cpus",
    "expect_valid",
    "partition_reason",
    "plan",
    "populated",
    "set_cpus",
    "set_partition",
    "sync",
    "vm_dirs",
]

_INVALID = re.compile(r"^(\w+) invalid(?: \((.*)\))?$")


def partition_reason(state: str) -> str | None:
    """The kernel's reason from ``isolated invalid (<reason>)``, or None for a valid state."""
    m = _INVALID.match(state.strip())
    if m is None:
        return None
    return m.group(2) or "invalid (no reason given)"


def vm_dirs(base: Path) -> dict[str, Path]:
    """The VM cgroups under extpv's top cgroup: VM name → path."""
    if not base.is_dir():
        return {}
    return {
        p.name.removeprefix("vm-"): p
        for p in sorted(base.iterdir())
        if p.is_dir() and p.name.startswith("vm-")
    }


def populated(path: Path) -> bool:
    """The cgroup or a descendant holds a task (``populated 1`` in cgroup.events)."""
    return "populated 1" in read_text(path / "cgroup.events").splitlines()


def plan(
    pins: Mapping[str, Mapping[int, int]],
    eligible: frozenset[int],
    current: Mapping[str, frozenset[int]],
) -> dict[str, frozenset[int]]:
    """VM → the CPUs its partition holds: its pinned pCPUs plus one extra CPU from
    ``eligible`` that nobody pins. A VM keeps the extra it has (``current``: its partition's
    CPUs now) while that stays free, so pinning a second vCPU does not move its other
    threads. PlacementError, naming the VM, when no eligible CPU is left for an extra."""
    taken = {p for vcpus in pins.values() for p in vcpus.values()}
    out: dict[str, frozenset[int]] = {}
    for vm in sorted(vm for vm, vcpus in pins.items() if vcpus):
        own = frozenset(pins[vm].values())
        mine = sorted((current.get(vm, frozenset()) - own) & eligible - taken)
        free = mine or sorted(eligible - taken)
        if not free:
            raise PlacementError(
                f"VM {vm}: no CPU left for the local-partition chain's extra CPU (this kernel "
                "has no remote partitions: a VM holding pins needs one more CPU of the pool, "
                f"where its other threads run; pool {format_cpulist(eligible)}, pinned "
                f"{format_cpulist(frozenset(taken))})"
            )
        out[vm] = own | {free[0]}
        taken.add(free[0])
    return out


def expect_valid(path: Path, want: str) -> None:
    """Read the partition state back: anything but ``want`` raises PartitionInvalid."""
    state = read_text(path / "cpuset.cpus.partition")
    if state != want:
        reason = partition_reason(state) or state
        raise PartitionInvalid(f"{path}: partition is {state!r}, expected {want!r}", reason)


def set_partition(path: Path, state: str) -> None:
    if read_text(path / "cpuset.cpus.partition") != state:
        write_text(path / "cpuset.cpus.partition", state)


def clear_cpus(path: Path) -> None:
    """Back to inheriting the parent's CPUs (empty ``cpuset.cpus``)."""
    if read_text(path / "cpuset.cpus") != "":
        write_text(path / "cpuset.cpus", "")


def set_cpus(path: Path, cpus: frozenset[int]) -> None:
    if read_text(path / "cpuset.cpus") == "" or read_cpus(path / "cpuset.cpus") != cpus:
        write_text(path / "cpuset.cpus", format_cpulist(cpus))


def _leave(path: Path) -> None:
    set_partition(path, "member")
    clear_cpus(path)


def sync(
    root: Path, base: Path, target: Mapping[str, frozenset[int]], eligible: frozenset[int]
) -> None:
    """Make the chain above the vCPU cgroups exactly ``target`` (VM → partition CPUs; see
    :func:`plan`); nothing pinned (empty target): every cgroup of ours ``member`` with empty
    ``cpuset.cpus``. Idempotent, so it also repairs what a crash left half done. Each VM named
    in ``target`` must exist. PlacementError (nothing more changed) when the slice would
    confine a VM that holds no pin; PartitionInvalid with the kernel's reason when a
    partition reads back invalid (the caller undoes)."""
    vms = vm_dirs(base)
    total = frozenset().union(*target.values())
    # VMs that hold no pin leave the chain first, so their CPUs go back to the slice.
    for vm, path in vms.items():
        if vm not in target:
            _leave(path)
    if not total:
        if base.is_dir():
            _leave(base)
        return
    for vm, path in vms.items():
        if vm not in target and populated(path):
            raise PlacementError(
                f"VM {vm} holds no pin: making {base.name} a local partition would confine its "
                "threads to the pinned VMs' CPUs (this kernel has no remote partitions; see "
                "docs/cgroup2-local-partitions.md)"
            )
    slice_now = (
        read_cpus(base / "cpuset.cpus")
        if read_text(base / "cpuset.cpus.partition") == "root" and read_text(base / "cpuset.cpus")
        else frozenset()
    )
    # One spare CPU for the enable step, if the host keeps at least one CPU without it.
    free = read_cpus(root / "cpuset.cpus.effective") - total - slice_now
    spare = frozenset(sorted(free & eligible)[-1:]) if len(free) >= 2 else frozenset()
    set_cpus(base, slice_now | total | spare)
    set_partition(base, "root")
    expect_valid(base, "root")
    for vm, cpus in sorted(target.items()):
        set_cpus(vms[vm], cpus)
        set_partition(vms[vm], "root")
        expect_valid(vms[vm], "root")
    set_cpus(base, total)
    expect_valid(base, "root")
    for vm in sorted(target):
        expect_valid(vms[vm], "root")
