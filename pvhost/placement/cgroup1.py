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
kernels: see :func:`~pvhost.placement.base.restore_own_affinity`). The previous cpuset and
affinity are saved in the state file before anything changes (:class:`~pvhost.state.Cgroup1Pin`)
and cleared after the VM's cpuset has shrunk again. A thread found in one of these cpusets with
no record (the state file was lost) goes back to its process's cpuset.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from extpv.vcpus import process_of_thread
from pvhost.errors import BackendUnavailable, PlacementError
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
from pvhost.placement.isolation import (
    Isolation,
    KernelThreads,
    cgroup1_isolation,
    sharing_tasks,
)
from pvhost.state import Cgroup1Pin, PinRecord, StateFile, StateStore
from pvproto import format_cpulist, parse_cpulist

__all__ = ["Cgroup1Backend"]

_VCPU_DIR = re.compile(r"^vcpu(\d+)$")


class Cgroup1Backend(PlacementBackend):
    name = "cgroup1"
    state: StateStore[Cgroup1Pin]

    def __init__(
        self,
        hierarchy: Path,
        state: Path,
        group: str = "extpv",
        isolate_from: tuple[str, ...] = (),
    ) -> None:
        """``hierarchy``: the v1 cpuset mount; ``state``: this backend's state file;
        ``isolate_from``: cpusets (paths in the hierarchy) a pinned pCPU is taken from."""
        if not (hierarchy / "cpuset.cpus").exists():
            raise BackendUnavailable(
                f"{hierarchy} is not a cgroup v1 cpuset hierarchy (no cpuset.cpus there)"
            )
        super().__init__(hierarchy, group, StateStore[Cgroup1Pin](state, StateFile[Cgroup1Pin]))
        self.exclusive: dict[str, bool] = {}
        self.isolate_from = tuple(hierarchy / c.strip("/") for c in isolate_from)
        #: pCPUs pinned by someone else that ``isolate_from`` withholds too: libvirt domains'
        #: vCPUs (:mod:`pvhost.placement.libvirt`), read at every isolation step.
        self.also_held: Callable[[], frozenset[int]] = frozenset
        #: Which tasks are kernel threads, kept between the read-backs of isolation: one
        #: memory per read-back (this backend's pins, libvirt's, the summary's pCPU). Each
        #: scans other pCPUs, so asks about other tasks, and a memory keeps only the tasks its
        #: latest scan asked about: shared, each scan would forget what the others read.
        self.kernel_threads = KernelThreads()
        self.libvirt_kernel_threads = KernelThreads()
        self.summary_kernel_threads = KernelThreads()

    # -- helpers -------------------------------------------------------------------------
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
        self.exclusive[str(path.relative_to(self.root))] = ok

    def _thread_cgroup(self, tid: int) -> str:
        try:
            return Path(f"/proc/{tid}/cpuset").read_text().strip()
        except OSError as err:
            raise PlacementError(f"cannot read /proc/{tid}/cpuset: {err.strerror}") from err

    def _vm_cpus_set(self, vm: str, cpus: frozenset[int]) -> None:
        write_text(self._vm_dir(vm) / "cpuset.cpus", format_cpulist(cpus))

    def _hand_back(self, path: Path) -> None:
        """Move the tasks still in one of our cpusets out of extpv's: each to the cpuset of its
        process's main thread (this backend moves vCPU threads only, so that is where they came
        from unless the record says otherwise) or, where that is ours too, to the root."""
        if not (path / "tasks").exists():
            return
        for tid in read_text(path / "tasks").split():
            with contextlib.suppress(PlacementError):  # it may exit meanwhile
                write_text(self._home_of(int(tid)) / "tasks", tid)

    def _home_of(self, tid: int) -> Path:
        try:
            home = self.root / self._thread_cgroup(process_of_thread(tid)).lstrip("/")
        except (PlacementError, ProcessLookupError):
            return self.root
        if home == self.base or self.base in home.parents or not (home / "tasks").exists():
            return self.root
        return home

    # -- isolate_from -----------------------------------------------------------------------
    def _check_isolate_from(self) -> None:
        for path in self.isolate_from:
            rel = self._rel(path)
            if path == self.root:
                raise PlacementError(
                    "placement.isolate_from names the root cpuset: cgroup v1 cannot take CPUs "
                    "from it; name the cpusets where the other load runs (e.g. machine.slice)"
                )
            if not (path / "cpuset.cpus").exists():
                raise PlacementError(
                    f"placement.isolate_from: no cpuset {rel} in {self.root}",
                )
            if path == self.base or self.base in path.parents or path in self.base.parents:
                raise PlacementError(
                    f"placement.isolate_from: {rel} contains or is inside extpv's own cpuset "
                    f"{self._rel(self.base)}"
                )

    def _isolate_tree(self) -> list[Path]:
        """Every cpuset under the ``isolate_from`` ones, each parent before its children."""
        out: list[Path] = []
        for top in self.isolate_from:
            for here, dirs, _files in os.walk(top):
                dirs.sort()
                if (Path(here) / "cpuset.cpus").exists():
                    out.append(Path(here))
        return out

    def isolate_held(self) -> None:
        """Withhold exactly what is pinned now (after ``also_held`` changed); PlacementError,
        changing nothing, where a cpuset would be left without a CPU."""
        self._isolate(frozenset(self._held()))

    def _isolate(self, held: frozenset[int]) -> None:
        held |= self.also_held()
        withheld = self.state.withheld()
        if not self.isolate_from and not withheld:
            return
        # 1. Record what each cpuset had before it first loses a CPU (saved before changing).
        for path in self._isolate_tree():
            rel = self._rel(path)
            if rel not in withheld and read_cpus(path / "cpuset.cpus") & held:
                withheld[rel] = read_setting(path / "cpuset.cpus")
        targets: dict[str, frozenset[int]] = {}
        for rel, before in withheld.items():
            if not (self.root / rel.lstrip("/") / "cpuset.cpus").exists():
                continue  # removed by its owner meanwhile: nothing to give back
            had = parse_cpulist(before)
            if had and not had - held:
                raise PlacementError(
                    f"taking pCPU(s) {format_cpulist(had & held)} from cpuset {rel} "
                    f"(placement.isolate_from) would leave it no CPU; give it more CPUs than "
                    "the guests may pin, or leave it out of isolate_from"
                )
            targets[rel] = had - held
        self.state.set_withheld({r: withheld[r] for r in targets})
        # 2. Shrink children before parents (a child's CPUs must stay inside its parent's),
        #    then grow parents before children.
        by_depth = sorted(targets, key=lambda r: r.count("/"))
        for rel in reversed(by_depth):
            cpus = self.root / rel.lstrip("/") / "cpuset.cpus"
            now = read_cpus(cpus)
            if now - targets[rel]:
                write_text(cpus, format_cpulist(now & targets[rel]))
        for rel in by_depth:
            cpus = self.root / rel.lstrip("/") / "cpuset.cpus"
            if read_cpus(cpus) != targets[rel]:
                write_text(cpus, format_cpulist(targets[rel]))
        # 3. Forget cpusets that have everything back.
        self.state.set_withheld(
            {r: withheld[r] for r in targets if targets[r] != parse_cpulist(withheld[r])}
        )

    def isolation(self) -> dict[str, Any]:
        """What pinned pCPUs are isolated from, and what cgroup v1 leaves sharing them."""
        held = frozenset(self._held())
        root_tasks = read_text(self.root / "tasks").split()
        return {
            "mode": "isolate_from" if self.isolate_from else "restricted",
            "isolate_from": [self._rel(p) for p in self.isolate_from],
            "withheld": self.state.withheld(),
            "pinned_pcpus": sorted(held),
            # Tasks of the root cpuset keep every CPU on v1 (kernel threads among them).
            "root_cpuset_tasks": len(root_tasks),
        }

    def _achieved(
        self, records: Mapping[tuple[str, int], PinRecord]
    ) -> dict[tuple[str, int], Isolation]:
        if not records:
            return {}
        # One read of every other cpuset's tasks; isolate_from cpusets that gave the pCPU up
        # no longer show it in their effective CPUs, so they count only where that failed.
        pcpus = frozenset(r.pcpu for r in records.values())
        scan = sharing_tasks(self.root, self.base, pcpus, self.kernel_threads)
        names = [self._rel(p) for p in self.isolate_from]
        return {
            key: cgroup1_isolation(names, scan.sharing(record.pcpu))
            for key, record in records.items()
        }

    def threads_achieved(
        self, pins: Mapping[tuple[str, int], tuple[int, int]]
    ) -> dict[tuple[str, int], Isolation]:
        """What pins made outside extpv's cpusets achieved (``(vm, vcpu)`` → ``(pcpu, tid)``:
        libvirt's, in its own vcpuN cpusets), read back as for this backend's own: the tasks
        that may run on the pCPU, the pinned threads themselves not counted."""
        if not pins:
            return {}
        scan = sharing_tasks(
            self.root,
            self.base,
            frozenset(pcpu for pcpu, _ in pins.values()),
            self.libvirt_kernel_threads,
            ignore=frozenset(tid for _, tid in pins.values()),
        )
        names = [self._rel(p) for p in self.isolate_from]
        return {
            key: cgroup1_isolation(names, scan.sharing(pcpu)) for key, (pcpu, _) in pins.items()
        }

    def isolation_summary(self) -> str:
        """What a pin of the lowest eligible pCPU achieves now: the tasks that may run there
        but in extpv's and the ``isolate_from`` cpusets (which give the pCPU up on a pin)."""
        names = [self._rel(p) for p in self.isolate_from]
        try:
            eligible = read_cpus(self.base / "cpuset.cpus")
        except PlacementError:
            eligible = frozenset()
        if not eligible:
            return "restricted: extpv's cpuset is not set up (no eligible pCPU)"
        pcpu = min(eligible)
        scan = sharing_tasks(self.root, self.base, frozenset({pcpu}), self.summary_kernel_threads)
        sharing = {
            cpuset: n
            for cpuset, n in scan.sharing(pcpu).items()
            if not any(cpuset == c or cpuset.startswith(c + "/") for c in names)
        }
        isolation = cgroup1_isolation(names, sharing)
        if isolation.mode == "isolated":
            taken = ", ".join(names)
            return f"isolated: a pinned pCPU is taken from {taken}; no other task may run there"
        return f"restricted: {isolation.reason}"

    # -- the backend ------------------------------------------------------------------------
    def setup(self, eligible: frozenset[int]) -> None:
        if not eligible:
            raise PlacementError("no eligible CPU to pin: the pool minus housekeeping is empty")
        self._check_isolate_from()
        if self.base.is_dir():
            # Grow first (children must stay inside), never shrink below what is pinned.
            write_text(self.base / "cpuset.cpus", format_cpulist(eligible | self._held()))
        else:
            self._mkdir(self.base, eligible)
        self._try_exclusive(self.base)

    def _record(self, vm: str, vcpu: int, tid: int, pcpu: int) -> Cgroup1Pin:
        prev_cpuset = self._thread_cgroup(tid)
        effective = self.root / prev_cpuset.lstrip("/") / "cpuset.effective_cpus"
        return Cgroup1Pin(
            tid=tid,
            pcpu=pcpu,
            prev_cpuset=prev_cpuset,
            prev_affinity=tuple(sorted(os.sched_getaffinity(tid))),
            prev_effective=tuple(sorted(read_cpus(effective))),
        )

    def _apply(self, vm: str, vcpu: int, record: PinRecord) -> None:
        vm_dir = self._vm_dir(vm)
        held = self._others(vm, vcpu) | {record.pcpu}
        if not vm_dir.is_dir():
            self._mkdir(vm_dir, held)
            self._try_exclusive(vm_dir)
        else:
            self._vm_cpus_set(vm, held)
        path = self._vcpu_dir(vm, vcpu)
        self._mkdir(path, frozenset({record.pcpu}))
        self._try_exclusive(path)
        write_text(path / "tasks", str(record.tid))

    def _check_cgroup(self, vm: str, vcpu: int, record: PinRecord) -> list[tuple[Check, str, str]]:
        cpus = read_setting(self._vcpu_dir(vm, vcpu) / "cpuset.cpus")
        return [] if cpus == str(record.pcpu) else [("cpuset", str(record.pcpu), cpus)]

    def _undo(self, vm: str, vcpu: int) -> None:
        record = self.state.pin(vm, vcpu)
        path = self._vcpu_dir(vm, vcpu)
        if record is not None and thread_alive(record.tid):
            self._restore_thread(record)
        self._hand_back(path)
        remove_cgroup(path)
        vm_dir = self._vm_dir(vm)
        if vm_dir.is_dir():
            rest = self._others(vm, vcpu)
            if rest:
                self._vm_cpus_set(vm, rest)
            elif not any(p.is_dir() for p in vm_dir.iterdir()):
                # An exclusive cpuset left holding a pCPU would block other VMs from it.
                self._hand_back(vm_dir)
                remove_cgroup(vm_dir)

    def _restore_thread(self, record: Cgroup1Pin) -> None:
        prev = self.root / record.prev_cpuset.lstrip("/")
        if not (prev / "tasks").exists():
            prev = self.root  # its old cpuset is gone: the root is the only safe home
        with contextlib.suppress(PlacementError):  # the thread may exit meanwhile
            write_text(prev / "tasks", str(record.tid))
        # Moving it back made the kernel derive its affinity again (cpuset ∩ its own mask).
        restore_own_affinity(record)

    def _release(self, vm: str) -> None:
        if self._vm_dir(vm).is_dir():
            self._orphan(self._vm_dir(vm))

    def _orphan(self, vm_dir: Path) -> None:
        self._prune(vm_dir.name.removeprefix("vm-"), vm_dir)
        self._hand_back(vm_dir)
        remove_cgroup(vm_dir)

    def _prune(self, vm: str, vm_dir: Path) -> None:
        pinned = self.state.pin_records(vm)
        for child in vm_dir.iterdir():
            m = _VCPU_DIR.match(child.name)
            if child.is_dir() and m and int(m.group(1)) not in pinned:
                self._hand_back(child)
                remove_cgroup(child)

    def describe(self) -> dict[str, Any]:
        vms: dict[str, Any] = {}
        achieved = self.achieved()
        for vm in self.state.vms():
            out = {}
            for vcpu, record in sorted(self.state.pin_records(vm).items()):
                path = self._vcpu_dir(vm, vcpu)
                out[str(vcpu)] = {
                    "pcpu": record.pcpu,
                    "tid": record.tid,
                    "cgroup": str(path),
                    "cpus": read_text(path / "cpuset.cpus") if path.is_dir() else None,
                    "exclusive": self.exclusive.get(str(path.relative_to(self.root))),
                    "partition": "n/a (cgroup v1)",
                    **achieved[vm][vcpu].fields(),
                }
            vms[vm] = out
        return {"backend": self.name, "base": str(self.base), "isolation": self.isolation(),
                "vms": vms}  # fmt: skip

    def _remove_base(self) -> None:
        self._hand_back(self.base)
        remove_cgroup(self.base)
