"""cgroup v1 backend: the ``cpuset`` hierarchy, for hybrid hosts without cpuset in cgroup2.

Two modes (``[placement] cgroup1_mode``, docs/cgroup1-resident.md): ``resident``, the default,
moves each vCPU thread once per VM and makes a pin a write of its cpuset's CPUs (below);
``move``, the opt-out, moves the thread at each pin and unpin. **Move mode** layout (under the
v1 cpuset mount, default ``/sys/fs/cgroup/cpuset``)::

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

**Resident mode** (``[placement] cgroup1_mode = "resident"``, the default). Moving a thread
into a v1 cpuset takes ``cgroup_threadgroup_rwsem`` for writing, which waits for an RCU grace
period unless a hierarchy is mounted with ``favordynmods``: ~7 ms when moves come hundreds of
ms apart, as a guest's pins do (bench/cgroup1_attach.py). In resident mode each vCPU thread is
moved once, when pvhost finds the VM's vCPU threads (else at its first placement change), into
``vcpu<N>`` whose CPUs mirror the cpuset it came from (its *home*,
:class:`~pvhost.state.Cgroup1Home`, saved before the move); a pin then writes only
``vcpu<N>/cpuset.cpus`` = the pCPU, an unpin writes the home's CPUs back, and the thread goes
home when the VM is detached (VM exit, ``pvctl release``, pvhost stop). libvirt domains are
not attached: libvirt keeps their threads in its own ``vcpuN`` cpusets and pins them
(:mod:`pvhost.placement.libvirt`), in either mode. So::

    extpv/                 cpus = every CPU of the root cpuset (unpinned threads keep their home's)
      vm-<name>/           cpus = the same
        vcpu<N>/           vCPU thread N for the VM's life: cpus = the pCPU while pinned, else
                           its home's cpus as they are now (isolate_from applied)

What the operator sees change: from pvhost finding the VM to the VM's end its vCPU threads
are in extpv's cpusets, not the one QEMU was started in. Their home bounds them all the same:
while unpinned they get the home's CPUs, re-read at every pin and unpin (so an ``isolate_from``
home that gives a pinned pCPU up takes it from them too, and an operator's change of the
home's CPUs reaches them at the next change, not at once). A pin may take a pCPU outside the
home, as in ``move`` mode. A thread the operator moved elsewhere meanwhile gets that cpuset as
its new home. ``cpuset.cpu_exclusive`` is not used (extpv's cpuset spans the host). The
read-back counts unpinned resident threads that may run on a pinned pCPU under their home's
name. Switching modes between runs: the records of the other mode are undone at start.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

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
from pvhost.state import Cgroup1Home, Cgroup1Pin, PinRecord, StateFile, StateStore
from pvproto import format_cpulist, parse_cpulist

__all__ = ["CGROUP1_MODES", "Cgroup1Backend", "Cgroup1Mode"]

_VCPU_DIR = re.compile(r"^vcpu(\d+)$")

#: ``move``: a pin moves the vCPU thread into its cpuset and an unpin moves it back;
#: ``resident``: the thread is moved once per VM, pins and unpins rewrite its cpuset's CPUs.
Cgroup1Mode = Literal["move", "resident"]
CGROUP1_MODES: tuple[Cgroup1Mode, ...] = ("move", "resident")


class Cgroup1Backend(PlacementBackend):
    name = "cgroup1"
    state: StateStore[Cgroup1Pin]

    def __init__(
        self,
        hierarchy: Path,
        state: Path,
        group: str = "extpv",
        isolate_from: tuple[str, ...] = (),
        mode: Cgroup1Mode = "resident",
    ) -> None:
        """``hierarchy``: the v1 cpuset mount; ``state``: this backend's state file;
        ``isolate_from``: cpusets (paths in the hierarchy) a pinned pCPU is taken from;
        ``mode``: how a pin is made (:data:`CGROUP1_MODES`)."""
        if not (hierarchy / "cpuset.cpus").exists():
            raise BackendUnavailable(
                f"{hierarchy} is not a cgroup v1 cpuset hierarchy (no cpuset.cpus there)"
            )
        super().__init__(hierarchy, group, StateStore[Cgroup1Pin](state, StateFile[Cgroup1Pin]))
        self.mode: Cgroup1Mode = mode
        self.attaches_for_life = mode == "resident"
        self.attaches_at_discovery = mode == "resident"
        #: The CPUs that may be pinned, from :meth:`setup`.
        self.eligible: frozenset[int] = frozenset()
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

    def _isolate(self, held: frozenset[int], checked: Any = None) -> None:
        self._withhold(held, checked)
        if self.mode == "resident" or any(self.state.homes(vm) for vm in self.state.vms()):
            self._mirror(held)

    def _isolate_check(self, held: frozenset[int]) -> Any:
        return self._withhold_plan(held | self.also_held())

    def _withhold_plan(
        self, held: frozenset[int]
    ) -> tuple[dict[str, str], dict[str, frozenset[int]]]:
        """What withholding ``held`` writes, read from the kernel and changing nothing: each
        cpuset's CPUs before it first lost one (the saved ones and the new), and each one's
        target; PlacementError where a cpuset would be left without a CPU."""
        withheld = self.state.withheld()
        if not self.isolate_from and not withheld:
            return withheld, {}
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
        return withheld, targets

    def _withhold(self, held: frozenset[int], checked: Any = None) -> None:
        withheld, targets = checked or self._withhold_plan(held | self.also_held())
        if not targets and not withheld:
            return
        # 1. Record what each cpuset had before it first loses a CPU (saved before changing).
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
        resident = self._resident_sharing(pcpus)
        names = [self._rel(p) for p in self.isolate_from]
        return {
            key: cgroup1_isolation(names, _merged(scan.sharing(record.pcpu), resident, record.pcpu))
            for key, record in records.items()
        }

    def _resident_sharing(self, pcpus: frozenset[int]) -> dict[int, dict[str, int]]:
        """pCPU → home cpuset → how many unpinned resident threads (in extpv's cpusets, which
        the scan skips) may run there: counted as their home's tasks, as in move mode."""
        out: dict[int, dict[str, int]] = {}
        for vm in self.state.vms():
            pinned = self.state.pin_records(vm)
            for vcpu, home in self.state.homes(vm).items():
                if vcpu in pinned:
                    continue
                try:
                    mask = frozenset(os.sched_getaffinity(home.tid))
                except OSError:
                    continue  # exited
                for pcpu in mask & pcpus:
                    where = out.setdefault(pcpu, {})
                    where[home.prev_cpuset] = where.get(home.prev_cpuset, 0) + 1
        return out

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
        resident = self._resident_sharing(frozenset(pcpu for pcpu, _ in pins.values()))
        names = [self._rel(p) for p in self.isolate_from]
        return {
            key: cgroup1_isolation(names, _merged(scan.sharing(pcpu), resident, pcpu))
            for key, (pcpu, _) in pins.items()
        }

    def isolation_summary(self) -> str:
        """What a pin of the lowest eligible pCPU achieves now: the tasks that may run there
        but in extpv's and the ``isolate_from`` cpusets (which give the pCPU up on a pin)."""
        names = [self._rel(p) for p in self.isolate_from]
        eligible = self.eligible
        if not eligible and self.mode == "move":  # not set up by this process: extpv's cpuset
            with contextlib.suppress(PlacementError):
                eligible = read_cpus(self.base / "cpuset.cpus")
        if not eligible:
            return "restricted: extpv's cpuset is not set up (no eligible pCPU)"
        pcpu = min(eligible)
        scan = sharing_tasks(self.root, self.base, frozenset({pcpu}), self.summary_kernel_threads)
        resident = self._resident_sharing(frozenset({pcpu}))
        sharing = {
            cpuset: n
            for cpuset, n in _merged(scan.sharing(pcpu), resident, pcpu).items()
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
        self.eligible = eligible
        if self.mode == "resident":
            for vm in self.state.vms():
                homes = self.state.homes(vm)
                for vcpu in sorted(set(self.state.pin_records(vm)) - set(homes)):
                    # A pin of a run in move mode: undone (the VM's next request pins again).
                    self.unpin(vm, vcpu)
            # Unpinned resident threads keep their home's CPUs: any CPU of the host.
            self._grow(self.base, read_cpus(self.root / "cpuset.cpus"))
            self.exclusive[self._rel(self.base).lstrip("/")] = False
            return
        for vm in self.state.vms():
            if self.state.homes(vm):
                # Left by a run in resident mode: its VM dirs span the host, so give its
                # threads back before extpv's cpuset shrinks to the pool.
                self.detach(vm)
        if self.base.is_dir():
            # Grow first (children must stay inside), never shrink below what is pinned.
            write_text(self.base / "cpuset.cpus", format_cpulist(eligible | self._held()))
        else:
            self._mkdir(self.base, eligible)
        self._try_exclusive(self.base)

    def _grow(self, path: Path, cpus: frozenset[int]) -> None:
        """Our cpuset ``path`` exists, can hold tasks and holds at least ``cpus`` (created, or
        widened: never narrowed), without ``cpu_exclusive`` (it would forbid overlapping the
        host's other cpusets; a move-mode run may have set it)."""
        if not path.is_dir():
            self._mkdir(path, cpus)
            return
        if read_text(path / "cpuset.mems") == "":  # created by a run killed before its mems
            write_text(path / "cpuset.mems", read_text(path.parent / "cpuset.mems"))
        if read_text(path / "cpuset.cpu_exclusive") == "1":
            write_text(path / "cpuset.cpu_exclusive", "0")
        now = read_cpus(path / "cpuset.cpus")
        if cpus - now:
            write_text(path / "cpuset.cpus", format_cpulist(cpus | now))

    def _ours(self, cpuset: str) -> bool:
        """Whether ``cpuset`` (as /proc shows it) is extpv's or inside it."""
        path = self.root / cpuset.lstrip("/")
        return path == self.base or self.base in path.parents

    # -- resident mode: each vCPU thread moved once per VM ---------------------------------
    def attach(self, vm: str, qemu_pid: int, vcpu_tids: Mapping[int, int]) -> None:
        """Resident mode: move each vCPU thread into its own cpuset, once (a no-op for those
        already there); vCPUs gone from the VM go home. Move mode: nothing."""
        if self.mode != "resident":
            return
        # Best effort per vCPU: what fails here stays recorded and is tried again (a pin
        # settles its thread first and is refused with the reason; detach sends it home).
        for vcpu in sorted(set(self.state.homes(vm)) - set(vcpu_tids)):
            with contextlib.suppress(PlacementError):
                self._go_home(vm, vcpu)
        for vcpu, tid in sorted(vcpu_tids.items()):
            with contextlib.suppress(PlacementError):
                self._settle(vm, vcpu, tid)

    def _home_record(self, tid: int) -> Cgroup1Home:
        prev = self._thread_cgroup(tid)
        if self._ours(prev):
            # In one of ours with no record (the state file was lost): its process's cpuset.
            prev = self._rel(self._home_of(tid))
        effective = self.root / prev.lstrip("/") / "cpuset.effective_cpus"
        try:
            affinity = os.sched_getaffinity(tid)
        except OSError as err:
            raise PlacementError(f"cannot read the affinity of thread {tid}: {err}") from err
        return Cgroup1Home(
            tid=tid,
            prev_cpuset=prev,
            prev_affinity=tuple(sorted(affinity)),
            prev_effective=tuple(sorted(read_cpus(effective))),
        )

    def _settle(self, vm: str, vcpu: int, tid: int) -> None:
        """Thread ``tid`` is vCPU ``vcpu``'s resident: recorded, then moved in (once)."""
        path = self._vcpu_dir(vm, vcpu)
        home = self.state.homes(vm).get(vcpu)
        if home is not None and home.tid != tid:
            self._go_home(vm, vcpu)  # another thread now (QEMU restarted, vCPU re-plugged)
            home = None
        try:
            where = self._thread_cgroup(tid)
        except PlacementError as err:
            raise PlacementError(f"vCPU {vcpu} thread {tid} of VM {vm}: {err}") from err
        if where == self._rel(path):
            if home is None:  # moved in, then the state file was lost
                self.state.set_home(vm, vcpu, self._home_record(tid))
            return
        if self.state.pin(vm, vcpu) is not None:
            self.unpin(vm, vcpu)  # a pin whose thread is not in its cpuset holds nothing
        if home is None or (not self._ours(where) and where != home.prev_cpuset):
            # Saved before the move. A thread the operator moved since gets its new home.
            home = self._home_record(tid)
            self.state.set_home(vm, vcpu, home)
        host = read_cpus(self.root / "cpuset.cpus")
        self._grow(self.base, host)
        self._grow(self._vm_dir(vm), host)
        self._mkdir(path, self._home_cpus(home))  # (again after a crash: mems, cpus)
        write_text(path / "tasks", str(tid))  # the one move of this thread's VM life
        restore_own_affinity(home)  # kernels < 6.2 reset it to the cpuset on a move

    def _home_cpus(self, home: Cgroup1Home) -> frozenset[int]:
        """What an unpinned resident thread may use: its home's CPUs now (the root's when its
        home is gone or has none)."""
        with contextlib.suppress(PlacementError):
            cpus = read_cpus(self.root / home.prev_cpuset.lstrip("/") / "cpuset.cpus")
            if cpus:
                return cpus
        return read_cpus(self.root / "cpuset.cpus")

    def _go_home(self, vm: str, vcpu: int) -> None:
        """Undo :meth:`_settle`: unpin, move the thread back (if it is still in our cpuset),
        remove its cpuset; the record is cleared last."""
        if self.state.pin(vm, vcpu) is not None:
            self.unpin(vm, vcpu)
        home = self.state.homes(vm).get(vcpu)
        path = self._vcpu_dir(vm, vcpu)
        if home is not None and thread_alive(home.tid):
            with contextlib.suppress(PlacementError):  # it may exit meanwhile
                if self._thread_cgroup(home.tid) == self._rel(path):
                    prev = self.root / home.prev_cpuset.lstrip("/")
                    if not (prev / "tasks").exists():
                        prev = self.root  # its home is gone: the root is the only safe one
                    write_text(prev / "tasks", str(home.tid))
                    restore_own_affinity(home)
        self._hand_back(path)
        remove_cgroup(path)
        self.state.set_home(vm, vcpu, None)

    def _mirror(self, held: frozenset[int]) -> None:
        """Every unpinned resident thread's cpuset gets its home's CPUs as they are now (after
        ``isolate_from`` took or gave back pCPUs); a pinned one (its pCPU in ``held``) keeps
        its pCPU."""
        for vm in self.state.vms():
            pins = self.state.pin_records(vm)
            for vcpu, home in sorted(self.state.homes(vm).items()):
                pin = pins.get(vcpu)
                path = self._vcpu_dir(vm, vcpu) / "cpuset.cpus"
                if (pin is not None and pin.pcpu in held) or not path.exists():
                    continue
                want = self._home_cpus(home)
                if read_cpus(path) != want:
                    write_text(path, format_cpulist(want))

    def reconcile(self, live: Mapping[str, Mapping[int, int]]) -> dict[str, dict[int, int]]:
        # Resident threads that are no longer their VM's vCPU go home first.
        for vm in self.state.vms():
            for vcpu, home in sorted(self.state.homes(vm).items()):
                if live.get(vm, {}).get(vcpu) != home.tid:
                    self._go_home(vm, vcpu)
        return super().reconcile(live)

    def _record(self, vm: str, vcpu: int, tid: int, pcpu: int) -> Cgroup1Pin:
        if self.mode == "resident":
            self._settle(vm, vcpu, tid)  # once per VM (attach did it, unless pinned directly)
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
        if self.mode == "resident":
            # The whole pin: no move, so no wait for the threadgroup rwsem.
            write_text(self._vcpu_dir(vm, vcpu) / "cpuset.cpus", str(record.pcpu))
            return
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
        home = self.state.homes(vm).get(vcpu)
        if home is not None:
            # Resident: the thread stays; its cpuset gets its home's CPUs back (isolate_from
            # gives the pCPU back to the home afterwards, and _mirror passes it on).
            if path.is_dir():
                want = self._home_cpus(home)
                if read_cpus(path / "cpuset.cpus") != want:
                    write_text(path / "cpuset.cpus", format_cpulist(want))
            if record is not None:
                restore_own_affinity(record)
            return
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
        for vcpu in sorted(self.state.homes(vm)):
            self._go_home(vm, vcpu)
        if self._vm_dir(vm).is_dir():
            self._orphan(self._vm_dir(vm))

    def _orphan(self, vm_dir: Path) -> None:
        self._prune(vm_dir.name.removeprefix("vm-"), vm_dir)
        self._hand_back(vm_dir)
        remove_cgroup(vm_dir)

    def _prune(self, vm: str, vm_dir: Path) -> None:
        kept = set(self.state.pin_records(vm)) | set(self.state.homes(vm))
        for child in vm_dir.iterdir():
            m = _VCPU_DIR.match(child.name)
            if child.is_dir() and m and int(m.group(1)) not in kept:
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
        resident = {
            vm: {str(v): {"tid": h.tid, "home": h.prev_cpuset} for v, h in sorted(homes.items())}
            for vm in self.state.vms()
            if (homes := self.state.homes(vm))
        }
        return {"backend": self.name, "mode": self.mode, "base": str(self.base),
                "isolation": self.isolation(), "vms": vms, "resident": resident}  # fmt: skip

    def _remove_base(self) -> None:
        self._hand_back(self.base)
        remove_cgroup(self.base)


def _merged(
    sharing: Mapping[str, int], resident: Mapping[int, Mapping[str, int]], pcpu: int
) -> dict[str, int]:
    """A scan's counts for ``pcpu`` plus the resident threads counted under their homes."""
    out = dict(sharing)
    for cpuset, n in resident.get(pcpu, {}).items():
        out[cpuset] = out.get(cpuset, 0) + n
    return out
