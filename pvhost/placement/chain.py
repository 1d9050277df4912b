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
    "expect_valid",
    "growth_spare",
    "make_room",
    "partition_reason",
    "plan",
    "populated",
    "refuse_confining",
    "release_cpus",
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
    resident: frozenset[str] = frozenset(),
) -> dict[str, frozenset[int]]:
    """VM → the CPUs its partition holds: its pinned pCPUs plus one extra CPU from
    ``eligible`` that nobody pins. A VM keeps the extra it has (``current``: its partition's
    CPUs now) while that stays free, so pinning a second vCPU does not move its other
    threads. While any VM holds a pin, a VM with threads (``resident``) that holds none keeps
    a partition of its extra CPU alone (it dropped its last pin while others hold theirs: the
    slice is a partition, and a member inside it would have no CPU). PlacementError, naming
    the VM, when no eligible CPU is left for an extra."""
    taken = {p for vcpus in pins.values() for p in vcpus.values()}
    out: dict[str, frozenset[int]] = {}
    holders = {vm for vm, vcpus in pins.items() if vcpus}
    parked = set(resident) - holders if holders else set()
    for vm in sorted(holders | parked):
        own = frozenset(pins.get(vm, {}).values())
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


def refuse_confining(base: Path, vm: str, holders: set[str]) -> None:
    """PlacementError when a pin of ``vm`` would confine another VM: one with threads, no pin
    (not in ``holders``) and no partition of its own, whose threads the slice's partition
    would leave on the pinned VMs' CPUs."""
    for other, path in vm_dirs(base).items():
        if other == vm or other in holders or not populated(path):
            continue
        if read_text(path / "cpuset.cpus.partition") != "root":
            raise PlacementError(
                f"VM {other} holds no pin: isolating on this kernel makes {base.name} a local "
                f"partition, which would confine VM {other}'s threads to CPUs taken from the "
                "host (no remote partitions: Linux < 6.7; see docs/cgroup2-local-partitions.md)"
            )


def expect_valid(path: Path, want: str) -> None:
    """Read the partition state back: anything but ``want`` raises PartitionInvalid."""
    state = read_text(path / "cpuset.cpus.partition")
    if state != want:
        reason = partition_reason(state) or state
        raise PartitionInvalid(f"{path}: partition is {state!r}, expected {want!r}", reason)


def set_partition(path: Path, state: str) -> None:
    if read_text(path / "cpuset.cpus.partition") != state:
        write_text(path / "cpuset.cpus.partition", state)


def online_cpus() -> frozenset[int]:
    return read_cpus(Path("/sys/devices/system/cpu/online"))


def _partitions_beside(path: Path) -> frozenset[int]:
    """The CPUs of ``path``'s siblings that are partitions (exclusive: nobody may overlap)."""
    out: set[int] = set()
    for sib in path.parent.iterdir():
        if sib == path or not (sib / "cpuset.cpus.partition").exists():
            continue
        if read_text(sib / "cpuset.cpus.partition") != "member" and read_text(sib / "cpuset.cpus"):
            out |= read_cpus(sib / "cpuset.cpus")
    return frozenset(out)


def release_cpus(path: Path) -> None:
    """A member cgroup back to what inheriting its parent's CPUs gives. Empty ``cpuset.cpus``
    where the kernel allows it; a populated cgroup's can never be emptied again (ENOSPC, also
    on 6.1), so there every online CPU but those of its partition siblings (an explicit set may
    not overlap an exclusive sibling): its effective CPUs are then the parent's, as inherited."""
    now = read_text(path / "cpuset.cpus")
    if now == "":
        return
    if not populated(path):
        write_text(path / "cpuset.cpus", "")
        return
    wide = online_cpus() - _partitions_beside(path)
    if wide and read_cpus(path / "cpuset.cpus") != wide:
        write_text(path / "cpuset.cpus", format_cpulist(wide))


def release_members(parent: Path) -> None:
    """:func:`release_cpus` for every member child of ``parent`` with explicit CPUs: after a
    partition among them is gone, the CPUs they gave up for it come back."""
    for child in sorted(p for p in parent.iterdir() if p.is_dir()):
        part = child / "cpuset.cpus.partition"
        if part.exists() and read_text(part) == "member":
            release_cpus(child)


def make_room(path: Path, cpus: frozenset[int]) -> None:
    """Before ``path`` becomes a partition on ``cpus``: member siblings with explicit CPUs
    (left by :func:`release_cpus`) give those up, or the partition would be invalid."""
    for sib in sorted(p for p in path.parent.iterdir() if p.is_dir() and p != path):
        part = sib / "cpuset.cpus.partition"
        if not part.exists() or read_text(part) != "member" or not read_text(sib / "cpuset.cpus"):
            continue
        mine = read_cpus(sib / "cpuset.cpus")
        if mine & cpus:
            write_text(sib / "cpuset.cpus", format_cpulist(mine - cpus))


def set_cpus(path: Path, cpus: frozenset[int]) -> None:
    if read_text(path / "cpuset.cpus") == "" or read_cpus(path / "cpuset.cpus") != cpus:
        write_text(path / "cpuset.cpus", format_cpulist(cpus))


def _leave(path: Path) -> None:
    set_partition(path, "member")
    release_cpus(path)


def sync(
    root: Path, base: Path, target: Mapping[str, frozenset[int]], eligible: frozenset[int]
) -> None:
    """Make the chain above the vCPU cgroups exactly ``target`` (VM → partition CPUs; see
    :func:`plan`); nothing pinned (empty target): every cgroup of ours ``member`` with empty
    ``cpuset.cpus``. Idempotent, so it also repairs what a crash left half done. Each VM named
    in ``target`` must exist. PlacementError before the first write when a step needs a spare
    CPU the host cannot give (:func:`growth_spare`); PartitionInvalid with the kernel's reason
    when a partition reads back invalid (the caller undoes)."""
    vms = vm_dirs(base)
    total = frozenset().union(*target.values())
    spare: frozenset[int] = frozenset()
    slice_now: frozenset[int] = frozenset()
    if total:
        slice_now = _partition_cpus(base)
        valid_now = {vm: _partition_cpus(path) for vm, path in vms.items()}
        free = read_cpus(root / "cpuset.cpus.effective") - total - slice_now
        # Refused here, before the first write, when the kernel would refuse the step anyway.
        spare = growth_spare(target, valid_now, slice_now, free, eligible, slice_name=base.name)
    # VMs that hold no pin leave the chain first, so their CPUs go back to the slice.
    for vm, path in vms.items():
        if vm not in target:
            _leave(path)
    if not total:
        if base.is_dir():
            _leave(base)
        _release_all(base, vms)
        return
    set_cpus(base, slice_now | total | spare)
    set_partition(base, "root")
    expect_valid(base, "root")
    for vm, cpus in sorted(target.items()):
        make_room(vms[vm], cpus)
        set_cpus(vms[vm], cpus)
        set_partition(vms[vm], "root")
        expect_valid(vms[vm], "root")
    set_cpus(base, total)
    expect_valid(base, "root")
    for vm in sorted(target):
        expect_valid(vms[vm], "root")
    _release_all(base, vms)


def growth_spare(
    target: Mapping[str, frozenset[int]],
    valid_now: Mapping[str, frozenset[int]],
    slice_now: frozenset[int],
    free: frozenset[int],
    eligible: frozenset[int],
    *,
    slice_name: str = "extpv.slice",
) -> frozenset[int]:
    """The spare CPU the slice borrows for the step to ``target`` (VM → partition CPUs), or
    none. ``valid_now``: the CPUs of each VM's valid partition now; ``slice_now``: the slice's
    partition CPUs now; ``free``: the CPUs the host keeps beside the chain.

    The spare is the highest pool CPU of ``free``, taken only when the host keeps another one,
    and only for a step that enables or grows a VM partition (a refused pin's undo, an unpin
    and a restart that finds the chain whole write nothing for it).
    A kernel without remote partitions refuses to enable or grow a VM partition that would
    take *all* of the slice's CPUs (its subtree holds QEMU's threads: "Parent unable to
    distribute cpu downstream"), so when such a step has no spare it is refused here, with
    the reason, before anything is written."""
    growing = {vm for vm, cpus in target.items() if not cpus <= valid_now.get(vm, frozenset())}
    if not growing:
        return frozenset()  # partitions that keep or shrink their CPUs need no room
    spare = frozenset(sorted(free & eligible)[-1:]) if len(free) >= 2 else frozenset()
    if spare:
        return spare
    whole = slice_now | frozenset().union(*target.values())
    for vm, cpus in sorted(target.items()):
        if vm in growing and cpus >= whole:
            raise PlacementError(
                f"VM {vm}: no spare CPU for the local-partition chain's growth step (this "
                f"kernel has no remote partitions): {slice_name} must borrow one more CPU of "
                f"the pool for a moment while VM {vm}'s partition grows to "
                f"{format_cpulist(cpus)}, and the host would keep only "
                f"{format_cpulist(free) or 'no CPU'} (pool {format_cpulist(eligible)}; the "
                "kernel would answer: Parent unable to distribute cpu downstream). Each VM "
                "holding pins needs its pCPUs, one extra CPU, and one more pool CPU free"
            )
    return spare


def _partition_cpus(path: Path) -> frozenset[int]:
    """The CPUs of ``path``'s partition now, empty when it is no valid partition root."""
    if read_text(path / "cpuset.cpus.partition") == "root" and read_text(path / "cpuset.cpus"):
        return read_cpus(path / "cpuset.cpus")
    return frozenset()


def _release_all(base: Path, vms: Mapping[str, Path]) -> None:
    """Give every member cgroup of ours back what a gone partition beside it took."""
    if base.is_dir():
        release_members(base)
    for path in vms.values():
        release_members(path)
