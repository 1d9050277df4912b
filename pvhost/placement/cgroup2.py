"""cgroup v2 backend: per-vCPU threaded cgroups that become isolated partitions while pinned.

Layout (under the unified hierarchy, default ``/sys/fs/cgroup``)::

    extpv.slice/              cpuset.cpus.exclusive = every CPU that may be pinned
      vm-<name>/              QEMU process moved here once at attach (becomes a threaded domain)
                              cpuset.cpus.exclusive = the pCPUs this VM holds now
        emulator/  threaded   QEMU's other threads; never holds pinned CPUs (an isolated
                              sibling's CPUs leave its effective set automatically)
        vcpu<N>/   threaded   vCPU thread N, moved once at attach
                              pin:   cpuset.cpus.exclusive = <p>, partition isolated
                              unpin: partition member, cpuset.cpus.exclusive cleared
                              (cpuset.cpus is never written: see _apply_pin)

Thread migration takes a global rwsem (tens of ms), so threads move only at attach; the
pin/unpin path only rewrites cpuset files. The mode is what the kernel accepts in a scratch
cgroup at setup: ``remote`` (``cpuset.cpus.exclusive``, kernel ≥ 6.7) is the layout above;
``local`` (the ``isolated`` partition type only, e.g. Debian 12's 6.1) makes extpv.slice and
the VM's cgroup partition roots too, grown and shrunk per pin (:mod:`pvhost.placement.chain`);
``restricted`` (no partitions) pins with ``cpuset.cpus`` alone (the thread is restricted, the
pCPU is not isolated; unpin writes the parent's CPUs back, since a populated cgroup's
``cpuset.cpus`` cannot be emptied) and ``describe()`` says so. After every partition write
the state is read back: ``isolated invalid (<reason>)`` is undone at once and raised as
:class:`PartitionInvalid` carrying the kernel's reason. The state record of a pin
(:class:`~pvhost.state.Cgroup2Pin`) is cleared only once the VM's exclusive CPUs have shrunk
again, and that of a VM (:class:`~pvhost.state.AttachRecord`) once QEMU is back where it was.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

from pvhost.errors import BackendUnavailable, PartitionInvalid, PlacementError
from pvhost.placement import chain
from pvhost.placement.base import (
    Check,
    PlacementBackend,
    read_cpus,
    read_setting,
    read_text,
    remove_cgroup,
    restore_own_affinity,
    thread_alive,
    write_text,
)
from pvhost.placement.chain import partition_reason
from pvhost.placement.isolation import Isolation, cgroup2_isolation
from pvhost.state import AttachRecord, Cgroup2Pin, PinRecord, StateFile, StateStore
from pvproto import format_cpulist

__all__ = ["MODES", "Cgroup2Backend", "Mode", "partition_reason", "probe_mode", "thread_cgroup2"]

#: How a pin is made, chosen by :meth:`Cgroup2Backend.setup` from what the kernel accepts:
#: ``remote``: the vCPU cgroup is a remote isolated partition made of ``cpuset.cpus.exclusive``;
#: ``local``: the kernel has the ``isolated`` partition type but no remote partitions (older
#: than 6.7, e.g. Debian 12's 6.1): a chain of local partitions; ``restricted``: no partitions,
#: ``cpuset.cpus`` restricts the vCPU thread only.
Mode = Literal["remote", "local", "restricted"]
MODES: tuple[Mode, ...] = ("remote", "local", "restricted")


def thread_cgroup2(tid: int) -> str:
    """The unified-hierarchy cgroup of ``tid`` (the ``0::`` line of /proc/<tid>/cgroup)."""
    try:
        for line in Path(f"/proc/{tid}/cgroup").read_text().splitlines():
            if line.startswith("0::"):
                return line[3:]
    except OSError as err:
        raise PlacementError(f"cannot read /proc/{tid}/cgroup: {err.strerror}") from err
    raise PlacementError(f"thread {tid} is in no cgroup v2 hierarchy")


def probe_mode(parent: Path) -> Mode:
    """What the kernel accepts, tried in a scratch cgroup under ``parent`` (which has
    ``+cpuset`` in its subtree_control), never inferred from a version string.

    ``cpuset.cpus.exclusive`` present: ``remote``. Otherwise, a write of ``isolated`` to
    ``cpuset.cpus.partition`` that the kernel keeps (valid or ``isolated invalid (…)``: the
    scratch cgroup has no CPUs, so invalid is the expected answer) shows the partition type
    exists: ``local``. A refused write (EINVAL: no such type) or no partition file:
    ``restricted``. The scratch cgroup is removed again in every case."""
    scratch = parent / "extpv-probe"
    try:
        scratch.mkdir(exist_ok=True)
    except OSError as err:
        raise PlacementError(f"cannot create scratch cgroup {scratch}: {err.strerror}") from err
    try:
        if (scratch / "cpuset.cpus.exclusive").exists():
            return "remote"
        part = scratch / "cpuset.cpus.partition"
        if not part.exists():
            return "restricted"
        try:
            write_text(part, "isolated")
        except PlacementError:
            return "restricted"
        kept = read_text(part).startswith("isolated")
        write_text(part, "member")
        return "local" if kept else "restricted"
    finally:
        remove_cgroup(scratch)


class Cgroup2Backend(PlacementBackend):
    name = "cgroup2"
    attaches_for_life = True
    state: StateStore[Cgroup2Pin]

    def __init__(self, root: Path, state: Path, group: str = "extpv.slice") -> None:
        """``root``: the unified hierarchy; ``state``: this backend's state file."""
        controllers = root / "cgroup.controllers"
        if not controllers.exists() or "cpuset" not in read_text(controllers).split():
            raise BackendUnavailable(
                f"{root} is not a cgroup v2 hierarchy with the cpuset controller "
                "(on hybrid hosts cpuset lives in v1: use the cgroup1 backend)"
            )
        super().__init__(root, group, StateStore[Cgroup2Pin](state, StateFile[Cgroup2Pin]))
        #: What the kernel accepted in a scratch cgroup at :meth:`setup` (see :data:`MODES`).
        self.mode: Mode = "restricted"
        #: The CPUs that may be pinned (the pool minus housekeeping), from :meth:`setup`; the
        #: local chain takes its extra CPUs from them too.
        self.eligible: frozenset[int] = frozenset()
        #: The pCPUs held beside extpv.slice (libvirt domains' remote partitions, whose
        #: ancestors hold them in their cpuset.cpus.exclusive): kept out of extpv.slice's,
        #: since sibling exclusive CPUs may not overlap. See :meth:`lend_exclusive`.
        self.lent: Callable[[], frozenset[int]] = frozenset

    def lend_exclusive(self, lent: frozenset[int]) -> None:
        """Keep ``lent`` out of extpv.slice's exclusive CPUs (remote mode), or give back what
        is no longer lent: called between the shrinking and the growing of the other chain."""
        if self.remote and self.base.is_dir():
            want = format_cpulist((self.eligible | self._held()) - lent)
            if read_text(self.base / "cpuset.cpus.exclusive") != want:
                write_text(self.base / "cpuset.cpus.exclusive", want)

    @property
    def remote(self) -> bool:
        """Pins are remote isolated partitions (``cpuset.cpus.exclusive``, Linux >= 6.7)."""
        return self.mode == "remote"

    # -- helpers -----------------------------------------------------------------------------
    def _thread_cgroup(self, tid: int) -> str:
        return thread_cgroup2(tid)

    @staticmethod
    def _enable_cpuset(path: Path) -> None:
        if "cpuset" not in read_text(path / "cgroup.subtree_control").split():
            write_text(path / "cgroup.subtree_control", "+cpuset")

    @staticmethod
    def _mkdir(path: Path) -> None:
        try:
            path.mkdir(exist_ok=True)
        except OSError as err:
            raise PlacementError(f"cannot create cgroup {path}: {err.strerror}") from err

    def _threaded_child(self, path: Path) -> None:
        self._mkdir(path)
        if read_text(path / "cgroup.type") != "threaded":
            write_text(path / "cgroup.type", "threaded")

    # -- the backend ---------------------------------------------------------------------------
    def setup(self, eligible: frozenset[int]) -> None:
        if not eligible:
            raise PlacementError("no eligible CPU to pin: the pool minus housekeeping is empty")
        self._enable_cpuset(self.root)
        self._mkdir(self.base)
        self._enable_cpuset(self.base)
        self.mode = probe_mode(self.base)
        self.eligible = eligible
        if self.remote:
            # Less what libvirt domains' partitions hold (a restart after a kill -9 finds them).
            cpus = (eligible | self._held()) - self.lent()
            write_text(self.base / "cpuset.cpus.exclusive", format_cpulist(cpus))

    def attach(self, vm: str, qemu_pid: int, vcpu_tids: Mapping[int, int]) -> None:
        attach = self.state.attach(vm)
        if attach is not None and attach.pid == qemu_pid and self._attached(vm, vcpu_tids):
            return  # adopted after a restart: the threads are where we put them
        if attach is not None and attach.pid != qemu_pid:
            self.detach(vm)
        record = AttachRecord(pid=qemu_pid, prev_cgroup=thread_cgroup2(qemu_pid))
        self.state.set_attach(vm, record)
        try:
            vm_dir = self._vm_dir(vm)
            self._mkdir(vm_dir)
            self._enable_cpuset(vm_dir)
            self._threaded_child(vm_dir / "emulator")
            for vcpu in vcpu_tids:
                self._threaded_child(self._vcpu_dir(vm, vcpu))
            # The one migration of this VM's life: process in, then each thread to its place.
            write_text(vm_dir / "cgroup.procs", str(qemu_pid))
            vcpu_set = set(vcpu_tids.values())
            for task in sorted(Path(f"/proc/{qemu_pid}/task").iterdir()):
                tid = int(task.name)
                if tid not in vcpu_set:
                    with contextlib.suppress(PlacementError):  # threads come and go
                        write_text(vm_dir / "emulator" / "cgroup.threads", str(tid))
            for vcpu, tid in vcpu_tids.items():
                write_text(self._vcpu_dir(vm, vcpu) / "cgroup.threads", str(tid))
        except (PlacementError, OSError) as err:
            self.detach(vm)
            raise PlacementError(f"attaching VM {vm} (QEMU pid {qemu_pid}) failed: {err}") from err

    def _attached(self, vm: str, vcpu_tids: Mapping[int, int]) -> bool:
        return all(
            thread_alive(tid) and thread_cgroup2(tid) == self._rel(self._vcpu_dir(vm, vcpu))
            for vcpu, tid in vcpu_tids.items()
        )

    def _record(self, vm: str, vcpu: int, tid: int, pcpu: int) -> Cgroup2Pin:
        path = self._vcpu_dir(vm, vcpu)
        if not path.is_dir() or thread_cgroup2(tid) != self._rel(path):
            raise PlacementError(f"VM {vm} vCPU {vcpu} (thread {tid}) is not attached in {path}")
        return Cgroup2Pin(
            tid=tid,
            pcpu=pcpu,
            prev_cpus=read_text(path / "cpuset.cpus"),
            prev_affinity=tuple(sorted(os.sched_getaffinity(tid))),
            prev_effective=tuple(sorted(read_cpus(path / "cpuset.cpus.effective"))),
        )

    # -- local mode: the chain of local partitions (pvhost.placement.chain) ---------------------
    def _chain_target(self, without: tuple[str, int] | None = None) -> dict[str, frozenset[int]]:
        """VM → CPUs of its partition for the recorded pins (less ``without``, being undone)."""
        pins = {
            vm: {v: p for v, p in vcpus.items() if (vm, v) != without}
            for vm, vcpus in self.pins().items()
        }
        current, resident = {}, set()
        for vm, path in chain.vm_dirs(self.base).items():
            if read_text(path / "cpuset.cpus.partition") == "root" and read_text(
                path / "cpuset.cpus"
            ):
                current[vm] = read_cpus(path / "cpuset.cpus")
            if chain.populated(path):
                resident.add(vm)
        return chain.plan(pins, self.eligible, current, frozenset(resident))

    def _sync_chain(self, without: tuple[str, int] | None = None) -> None:
        chain.sync(self.root, self.base, self._chain_target(without), self.eligible)
        # A VM partition that was invalid for a moment (a refused growth, undone) leaves its
        # vCPU partitions invalid ("Parent is an invalid partition root"): enable them again.
        for vm, vcpus in self.pins().items():
            for vcpu in vcpus:
                path = self._vcpu_dir(vm, vcpu)
                part = path / "cpuset.cpus.partition"
                stale = part.exists() and read_text(part).startswith("isolated invalid")
                if (vm, vcpu) != without and stale:
                    chain.set_partition(path, "isolated")

    def _apply_local(self, vm: str, vcpu: int, pcpu: int) -> None:
        chain.refuse_confining(self.base, vm, {v for v, pins in self.pins().items() if pins})
        self._sync_chain()
        path = self._vcpu_dir(vm, vcpu)
        chain.make_room(path, frozenset({pcpu}))
        chain.set_cpus(path, frozenset({pcpu}))
        chain.set_partition(path, "isolated")
        try:
            chain.expect_valid(path, "isolated")
        except PartitionInvalid as err:
            raise PartitionInvalid(f"VM {vm} vCPU {vcpu} → pCPU {pcpu}: {err}", err.reason) from err

    def _undo_local(self, vm: str, vcpu: int) -> None:
        path = self._vcpu_dir(vm, vcpu)
        if path.is_dir():
            chain.set_partition(path, "member")
            chain.release_cpus(path)
        self._sync_chain(without=(vm, vcpu))

    def _apply(self, vm: str, vcpu: int, record: PinRecord) -> None:
        path, pcpu = self._vcpu_dir(vm, vcpu), record.pcpu
        if self.mode == "local":
            self._apply_local(vm, vcpu, pcpu)
            return
        if not self.remote:
            write_text(path / "cpuset.cpus", str(pcpu))
            return
        # Only the exclusive CPUs and the partition change: cpuset.cpus stays empty. A
        # populated cgroup's cpuset.cpus can never be emptied again (ENOSPC), and an
        # explicit cpuset.cpus overlapping a sibling partition invalidates that partition
        # (both measured on 6.12), so a remote partition is made from cpus.exclusive alone.
        held = self._others(vm, vcpu) | {pcpu}
        write_text(self._vm_dir(vm) / "cpuset.cpus.exclusive", format_cpulist(held))
        write_text(path / "cpuset.cpus.exclusive", str(pcpu))
        write_text(path / "cpuset.cpus.partition", "isolated")
        # Read back: the kernel may accept the write yet leave the partition invalid.
        state = read_text(path / "cpuset.cpus.partition")
        reason = partition_reason(state)
        if reason is not None or state != "isolated":
            raise PartitionInvalid(
                f"VM {vm} vCPU {vcpu} → pCPU {pcpu}: partition is {state!r}", reason or state
            )

    def _check_cgroup(self, vm: str, vcpu: int, record: PinRecord) -> list[tuple[Check, str, str]]:
        path = self._vcpu_dir(vm, vcpu)
        if self.mode == "local":
            # The whole chain: the vCPU's isolated partition is only valid under valid roots.
            want = [(path, "isolated"), (path.parent, "root"), (self.base, "root")]
            out: list[tuple[Check, str, str]] = []
            for where, state in want:
                found = read_setting(where / "cpuset.cpus.partition")
                if found != state:
                    out.append(("partition", f"{self._rel(where)} {state}", found))
            cpus = read_setting(path / "cpuset.cpus")
            if cpus != str(record.pcpu):
                out.append(("cpuset", str(record.pcpu), cpus))
            return out
        if self.remote:
            state = read_setting(path / "cpuset.cpus.partition")
            return [] if state == "isolated" else [("partition", "isolated", state)]
        cpus = read_setting(path / "cpuset.cpus")
        return [] if cpus == str(record.pcpu) else [("cpuset", str(record.pcpu), cpus)]

    def _undo(self, vm: str, vcpu: int) -> None:
        # Every step here comes before the record is cleared (D11): a kill -9 between the
        # vCPU's and the VM's exclusive CPUs used to leave the VM holding the pCPU for good.
        record = self.state.pin(vm, vcpu)
        path = self._vcpu_dir(vm, vcpu)
        if self.mode == "local":
            self._undo_local(vm, vcpu)
        elif path.is_dir():
            if self.remote:
                write_text(path / "cpuset.cpus.partition", "member")
                write_text(path / "cpuset.cpus.exclusive", "")
            elif record is not None and read_text(path / "cpuset.cpus") != record.prev_cpus:
                # No partitions (kernel < 6.7): cpuset.cpus was the pin. It cannot be emptied
                # while the thread is inside, so it goes back to the parent's whole set.
                prev = record.prev_cpus or read_text(path.parent / "cpuset.cpus.effective")
                write_text(path / "cpuset.cpus", prev)
        vm_dir = self._vm_dir(vm)
        if self.remote and (vm_dir / "cpuset.cpus.exclusive").exists():
            write_text(vm_dir / "cpuset.cpus.exclusive", format_cpulist(self._others(vm, vcpu)))
        if record is not None:
            # The partition (or cpuset.cpus) change made the kernel derive the thread's
            # affinity again; on kernels ≥ 6.2 that is already the exact undo.
            restore_own_affinity(record)

    def _release(self, vm: str) -> None:
        attach = self.state.attach(vm)
        vm_dir = self._vm_dir(vm)
        if attach is not None and thread_alive(attach.pid) and vm_dir.is_dir():
            prev = self.root / attach.prev_cgroup.lstrip("/")
            if not (prev / "cgroup.procs").exists():
                prev = self.root
            with contextlib.suppress(PlacementError):
                write_text(prev / "cgroup.procs", str(attach.pid))
        if vm_dir.is_dir():
            if self.mode == "local":  # a VM parked in the chain: its partition goes first
                with contextlib.suppress(PlacementError):
                    chain.set_partition(vm_dir, "member")
            self._remove_tree(vm_dir)
        if self.mode == "local":
            self._sync_chain()  # its CPUs leave the slice

    def _orphan(self, vm_dir: Path) -> None:
        # Its QEMU's cgroup before attach is unknown: the root is the only safe home.
        for child in sorted(p for p in vm_dir.iterdir() if p.is_dir()):
            if (child / "cpuset.cpus.partition").exists():
                with contextlib.suppress(PlacementError):
                    write_text(child / "cpuset.cpus.partition", "member")
        if self.mode == "local":  # a VM partition of the chain: back to a plain member first
            with contextlib.suppress(PlacementError):
                chain.set_partition(vm_dir, "member")
        for pid in read_text(vm_dir / "cgroup.procs").split():
            with contextlib.suppress(PlacementError):
                write_text(self.root / "cgroup.procs", pid)
        self._remove_tree(vm_dir)

    @staticmethod
    def _remove_tree(vm_dir: Path) -> None:
        for child in sorted(p for p in vm_dir.iterdir() if p.is_dir()):
            remove_cgroup(child)
        remove_cgroup(vm_dir)

    def _achieved(
        self, records: Mapping[tuple[str, int], PinRecord]
    ) -> dict[tuple[str, int], Isolation]:
        out = {}
        for vm, vcpu in records:
            # Read back whatever made the pin: a partition (remote, or the local chain) reads
            # "isolated"; a pin without partitions leaves the vCPU cgroup a "member".
            part = self._vcpu_dir(vm, vcpu) / "cpuset.cpus.partition"
            state = read_setting(part) if part.exists() else None
            if self.mode == "restricted":
                state = None
            out[vm, vcpu] = cgroup2_isolation(state)
        return out

    def isolation_summary(self) -> str:
        if self.mode == "remote":
            return "isolated: each pinned pCPU becomes an isolated remote partition"
        if self.mode == "local":
            return (
                "isolated: each pinned pCPU becomes an isolated partition in a chain of local "
                "partitions (this kernel has no remote partitions, Linux < 6.7): a VM holding "
                "pins also takes one extra CPU of the pool from the host, where its other "
                "threads run; a pin is refused while another VM under extpv.slice holds none"
            )
        return (
            "restricted: this kernel has no cpuset partitions extpv can use (no "
            "cpuset.cpus.exclusive, no isolated partition type), so a pin restricts the "
            "vCPU thread only"
        )

    def describe(self) -> dict[str, Any]:
        vms: dict[str, Any] = {}
        achieved = self.achieved()
        for vm in self.state.vms():
            out: dict[str, Any] = {}
            for vcpu, record in sorted(self.state.pin_records(vm).items()):
                path = self._vcpu_dir(vm, vcpu)
                part = path / "cpuset.cpus.partition"
                out[str(vcpu)] = {
                    "pcpu": record.pcpu,
                    "tid": record.tid,
                    "cgroup": str(path),
                    "cpus": read_text(path / "cpuset.cpus") if path.is_dir() else None,
                    "partition": read_text(part)
                    if part.exists()
                    else "member (kernel has no cpuset partitions)",
                    "isolated": self.mode != "restricted" and read_setting(part) == "isolated",
                    **achieved[vm][vcpu].fields(),
                }
            vms[vm] = out
        chain_top = None
        if self.mode == "local" and self.base.is_dir():
            # The chain above the vCPU partitions: the CPUs each holds, taken from the host.
            chain_top = {
                name: {
                    "cpus": read_setting(path / "cpuset.cpus"),
                    "partition": read_setting(path / "cpuset.cpus.partition"),
                }
                for name, path in [(self.base.name, self.base)]
                + [(p.name, p) for p in chain.vm_dirs(self.base).values()]
            }
        return {
            "backend": self.name,
            "base": str(self.base),
            "remote_partitions": self.remote,
            "partition_mode": self.mode,
            "local_chain": chain_top,
            "vms": vms,
        }

    def reconcile(self, live: Mapping[str, Mapping[int, int]]) -> dict[str, dict[int, int]]:
        adopted = super().reconcile(live)
        if self.mode == "local":
            # A crash between two steps of the chain (slice grown by its spare CPU, a VM
            # partition not yet shrunk) is not visible to the per-pin check: rebuild the chain
            # exactly for the pins that were adopted.
            self._sync_chain()
        return adopted

    def _remove_base(self) -> None:
        if self.mode == "local" and self.base.is_dir():
            with contextlib.suppress(PlacementError):
                chain.sync(self.root, self.base, {}, self.eligible)
        if (self.base / "cpuset.cpus.exclusive").exists():
            with contextlib.suppress(PlacementError):
                write_text(self.base / "cpuset.cpus.exclusive", "")
        remove_cgroup(self.base)
