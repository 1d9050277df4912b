"""cgroup v1 backend: the ``cpuset`` hierarchy, for hybrid hosts without cpuset in cgroup2.

Layout (under the v1 cpuset mount, default ``/sys/fs/cgroup/cpuset``)::

    extpv/                 cpus = every CPU that may be pinned (the eligible pool)
      vm-<name>/           cpus = the pCPUs this VM holds now (grown before a pin, shrunk after)
        vcpu<N>/           cpus = the one pCPU; holds vCPU thread N while pinned

``cpuset.cpu_exclusive`` is set on each level where the kernel accepts it (it requires an
exclusive parent and no overlapping sibling, so on a host whose other cpusets already cover
the pool it stays off; ``describe()`` says which). v1 cannot take CPUs away from tasks in the
root cpuset, and this backend never moves a task it did not place: pinning here restricts the
vCPU thread, it does not isolate the pCPU.

Pin moves the thread into ``vcpu<N>`` (the kernel then sets its affinity to the cpuset);
unpin moves it back into the cpuset it came from, where the kernel (≥ 6.2) derives its
affinity again from that cpuset and the mask the thread chose itself, so undo is exact (older
kernels: see :func:`~pvhost.placement.base.restore_own_affinity`). The previous cgroup and
affinity are saved in the state file before anything changes.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pvhost.errors import BackendUnavailable, PlacementError
from pvhost.placement.base import (
    read_cpus,
    read_text,
    remove_cgroup,
    restore_own_affinity,
    thread_alive,
    thread_allowed_cpus,
    write_text,
)
from pvhost.state import StateStore
from pvproto import format_cpulist

__all__ = ["Cgroup1Backend"]

_VCPU_DIR = re.compile(r"^vcpu(\d+)$")


class Cgroup1Backend:
    name = "cgroup1"

    def __init__(self, hierarchy: Path, state: StateStore, group: str = "extpv") -> None:
        if not (hierarchy / "cpuset.cpus").exists():
            raise BackendUnavailable(
                f"{hierarchy} is not a cgroup v1 cpuset hierarchy (no cpuset.cpus there)"
            )
        self.hierarchy = hierarchy
        self.base = hierarchy / group
        self.state = state
        self.exclusive: dict[str, bool] = {}

    # -- helpers -------------------------------------------------------------------------
    def _vm_dir(self, vm: str) -> Path:
        return self.base / f"vm-{vm}"

    def _vcpu_dir(self, vm: str, vcpu: int) -> Path:
        return self._vm_dir(vm) / f"vcpu{vcpu}"

    def _mkdir(self, path: Path, cpus: frozenset[int]) -> None:
        if not path.is_dir():
            try:
                path.mkdir()
            except OSError as err:
                raise PlacementError(f"cannot create cpuset {path}: {err.strerror}") from err
        # A v1 cpuset needs mems and cpus before it can hold a task; mems come from the parent.
        write_text(path / "cpuset.mems", read_text(path.parent / "cpuset.mems"))
        write_text(path / "cpuset.cpus", format_cpulist(cpus))

    def _try_exclusive(self, path: Path) -> None:
        parent_exclusive = read_text(path.parent / "cpuset.cpu_exclusive") == "1"
        ok = False
        if parent_exclusive:
            try:
                write_text(path / "cpuset.cpu_exclusive", "1")
                ok = True
            except PlacementError:
                ok = False
        self.exclusive[str(path.relative_to(self.hierarchy))] = ok

    def _rel(self, path: Path) -> str:
        return "/" + str(path.relative_to(self.hierarchy)) if path != self.hierarchy else "/"

    @staticmethod
    def _thread_cpuset(tid: int) -> str:
        try:
            return Path(f"/proc/{tid}/cpuset").read_text().strip()
        except OSError as err:
            raise PlacementError(f"cannot read /proc/{tid}/cpuset: {err.strerror}") from err

    def _vm_cpus_set(self, vm: str, cpus: frozenset[int]) -> None:
        write_text(self._vm_dir(vm) / "cpuset.cpus", format_cpulist(cpus))

    # -- protocol ----------------------------------------------------------------------------
    def setup(self, eligible: frozenset[int]) -> None:
        if not eligible:
            raise PlacementError("no eligible CPU to pin: the pool minus housekeeping is empty")
        if self.base.is_dir():
            # Grow first (children must stay inside), never shrink below what is pinned.
            held = {p for pins in self.pins().values() for p in pins.values()}
            write_text(self.base / "cpuset.cpus", format_cpulist(eligible | held))
        else:
            self._mkdir(self.base, eligible)
        self._try_exclusive(self.base)

    def attach(self, vm: str, qemu_pid: int, vcpu_tids: Mapping[int, int]) -> None:
        # v1 moves threads only when pinning them: nothing to prepare.
        return

    def pin(self, vm: str, vcpu: int, tid: int, pcpu: int) -> None:
        if self.state.vcpu(vm, vcpu) is not None:
            self.unpin(vm, vcpu)
        prev_cpuset = self._thread_cpuset(tid)
        record = {
            "tid": tid,
            "pcpu": pcpu,
            "prev_cpuset": prev_cpuset,
            "prev_affinity": sorted(os.sched_getaffinity(tid)),
            "prev_effective": sorted(
                read_cpus(self.hierarchy / prev_cpuset.lstrip("/") / "cpuset.effective_cpus")
            ),
        }
        # Saved before the first change: a crash from here on is undone by reconcile.
        self.state.set_vcpu(vm, vcpu, record)
        try:
            vm_dir = self._vm_dir(vm)
            held = set(self.pins().get(vm, {}).values()) | {pcpu}
            if not vm_dir.is_dir():
                self._mkdir(vm_dir, frozenset(held))
                self._try_exclusive(vm_dir)
            else:
                self._vm_cpus_set(vm, frozenset(held))
            path = self._vcpu_dir(vm, vcpu)
            self._mkdir(path, frozenset({pcpu}))
            self._try_exclusive(path)
            write_text(path / "tasks", str(tid))
            self._verify(vm, vcpu, tid, pcpu)
        except PlacementError:
            self.unpin(vm, vcpu)
            raise

    def _verify(self, vm: str, vcpu: int, tid: int, pcpu: int) -> None:
        allowed = thread_allowed_cpus(tid)
        where = self._thread_cpuset(tid)
        want = self._rel(self._vcpu_dir(vm, vcpu))
        if allowed != {pcpu} or where != want:
            raise PlacementError(
                f"verify failed for VM {vm} vCPU {vcpu} (thread {tid}): allowed "
                f"{format_cpulist(allowed)} in {where}, expected {pcpu} in {want}"
            )

    def unpin(self, vm: str, vcpu: int) -> None:
        record = self.state.vcpu(vm, vcpu)
        path = self._vcpu_dir(vm, vcpu)
        if record is not None and thread_alive(record["tid"]):
            self._restore_thread(record)
        self._evacuate(path)
        remove_cgroup(path)
        self.state.set_vcpu(vm, vcpu, None)
        vm_dir = self._vm_dir(vm)
        if vm_dir.is_dir():
            rest = set(self.pins().get(vm, {}).values())
            if rest:
                self._vm_cpus_set(vm, frozenset(rest))
            elif not any(p.is_dir() for p in vm_dir.iterdir()):
                # An exclusive cpuset left holding a pCPU would block other VMs from it.
                self._evacuate(vm_dir)
                remove_cgroup(vm_dir)

    def _restore_thread(self, record: Mapping[str, Any]) -> None:
        tid = int(record["tid"])
        prev = self.hierarchy / str(record["prev_cpuset"]).lstrip("/")
        if not (prev / "tasks").exists():
            prev = self.hierarchy  # its old cpuset is gone: the root is the only safe home
        with contextlib.suppress(PlacementError):  # the thread may exit meanwhile
            write_text(prev / "tasks", str(tid))
        # Moving it back made the kernel derive its affinity again (cpuset ∩ its own mask).
        prev_affinity = record["prev_affinity"]
        restore_own_affinity(
            tid, set(prev_affinity), frozenset(record.get("prev_effective", prev_affinity))
        )

    def _evacuate(self, path: Path) -> None:
        """Move tasks still in one of our cpusets (placed by us) up to the root."""
        if not (path / "tasks").exists():
            return
        for line in read_text(path / "tasks").split():
            with contextlib.suppress(PlacementError):
                write_text(self.hierarchy / "tasks", line)

    def detach(self, vm: str) -> None:
        for vcpu in sorted(self.pins().get(vm, {})):
            self.unpin(vm, vcpu)
        vm_dir = self._vm_dir(vm)
        if vm_dir.is_dir():
            for child in vm_dir.iterdir():
                if child.is_dir() and _VCPU_DIR.match(child.name):
                    self._evacuate(child)
                    remove_cgroup(child)
            self._evacuate(vm_dir)
            remove_cgroup(vm_dir)
        self.state.drop_vm(vm)

    def pins(self) -> dict[str, dict[int, int]]:
        return self.state.pins()

    def reconcile(self, live: Mapping[str, Mapping[int, int]]) -> dict[str, dict[int, int]]:
        adopted: dict[str, dict[int, int]] = {}
        for vm, entry in list(self.state.vms().items()):
            for vcpu_text, record in list(entry.get("vcpus", {}).items()):
                vcpu = int(vcpu_text)
                tid = int(record["tid"])
                path = self._vcpu_dir(vm, vcpu)
                intact = (
                    live.get(vm, {}).get(vcpu) == tid
                    and thread_alive(tid)
                    and path.is_dir()
                    and self._thread_cpuset(tid) == self._rel(path)
                    and thread_allowed_cpus(tid) == {int(record["pcpu"])}
                )
                if intact:
                    adopted.setdefault(vm, {})[vcpu] = int(record["pcpu"])
                else:
                    self.unpin(vm, vcpu)
            if vm not in adopted:
                self.detach(vm)
        # Cgroups with no record (state lost): undo them too.
        if self.base.is_dir():
            for vm_dir in self.base.iterdir():
                if not (vm_dir.is_dir() and vm_dir.name.startswith("vm-")):
                    continue
                vm = vm_dir.name[3:]
                for child in vm_dir.iterdir():
                    m = _VCPU_DIR.match(child.name)
                    if child.is_dir() and m and int(m.group(1)) not in adopted.get(vm, {}):
                        self._evacuate(child)
                        remove_cgroup(child)
                if vm not in adopted:
                    self._evacuate(vm_dir)
                    remove_cgroup(vm_dir)
        return adopted

    def describe(self) -> dict[str, Any]:
        vms: dict[str, Any] = {}
        for vm, pins in self.pins().items():
            out = {}
            for vcpu, pcpu in sorted(pins.items()):
                path = self._vcpu_dir(vm, vcpu)
                record = self.state.vcpu(vm, vcpu) or {}
                out[str(vcpu)] = {
                    "pcpu": pcpu,
                    "tid": record.get("tid"),
                    "cgroup": str(path),
                    "cpus": read_text(path / "cpuset.cpus") if path.is_dir() else None,
                    "exclusive": self.exclusive.get(str(path.relative_to(self.hierarchy))),
                    "partition": "n/a (cgroup v1)",
                }
            vms[vm] = out
        return {"backend": self.name, "base": str(self.base), "vms": vms}

    def teardown(self) -> None:
        if self.base.is_dir() and not any(p.is_dir() for p in self.base.iterdir()):
            self._evacuate(self.base)
            remove_cgroup(self.base)
