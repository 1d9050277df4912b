"""The placement backend: apply (pin) / verify / undo (unpin) with saved state.

:class:`PlacementBackend` holds what both cgroup backends share — the layout of extpv's cgroups,
the order of a pin and of an undo around the state record, the check that a recorded pin still
holds (used by reconcile to adopt it and by :meth:`~PlacementBackend.verify`), and the reconcile
loop — and each backend implements only the kernel writes that differ (v1 cpusets, v2 partitions).

A backend is driven by one daemon and is not thread-safe; calls are synchronous and short
(cgroupfs writes). Every ``pin`` either leaves the vCPU thread restricted to the planned pCPU
and verified, or undoes what it changed and raises :class:`PlacementError`. The state record of
a pin is written before its first kernel change and cleared only after its last undo, so a
kill -9 at any point leaves a record that reconcile can undo from.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict

from pvhost.errors import PlacementError
from pvhost.placement.isolation import Isolation
from pvhost.placement.stages import StageClock
from pvhost.state import Cgroup1Home, PinRecord, StateStore
from pvproto import CpuListError, format_cpulist, parse_cpulist

__all__ = [
    "Check",
    "Finding",
    "PlacementBackend",
    "read_cpus",
    "read_setting",
    "read_text",
    "remove_cgroup",
    "restore_own_affinity",
    "thread_alive",
    "thread_allowed_cpus",
    "write_text",
]

_log = logging.getLogger(__name__)

#: What a finding is about: the thread itself, the cgroup it is in, its affinity, or the
#: cgroup's own setting (v1 ``cpuset.cpus``, v2 ``cpuset.cpus.partition``).
Check = Literal["thread", "cgroup", "affinity", "cpuset", "partition"]


class Finding(BaseModel):
    """One recorded placement the kernel no longer agrees with (``pvctl verify``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    vm: str
    vcpu: int
    tid: int
    pcpu: int
    check: Check
    expected: str
    found: str

    def __str__(self) -> str:
        return (
            f"VM {self.vm} vCPU {self.vcpu} (thread {self.tid}, pCPU {self.pcpu}): "
            f"{self.check} should be {self.expected}, the kernel says {self.found}"
        )


class PlacementBackend(ABC):
    """extpv's cgroups under ``base`` (in the hierarchy mounted at ``root``)::

    <base>/vm-<name>/vcpu<N>     vCPU thread N of VM <name>, restricted to its pCPU
    """

    #: ``cgroup2`` or ``cgroup1``: shown in ``pvctl status`` and AffinityResult.
    name: ClassVar[str]
    #: True when ``attach`` moves a VM's threads for its whole life (v2, v1 ``resident``): a
    #: live VM then stays attached through a restart even with no pin; otherwise a VM with no
    #: pin is detached.
    attaches_for_life: bool = False
    #: True when :meth:`attach` should run as soon as a VM's vCPU threads are found (v1
    #: ``resident``: its one move of each thread then stays off the guest's first pin).
    attaches_at_discovery: bool = False

    def __init__(self, root: Path, group: str, state: StateStore[PinRecord]) -> None:
        self.root = root
        self.base = root / group
        self.state = state
        #: Time per stage of the change under way (reset and read by the service).
        self.stages = StageClock()

    # -- what each backend implements ---------------------------------------------------------
    @abstractmethod
    def setup(self, eligible: frozenset[int]) -> None:
        """Create extpv's own cgroup holding the CPUs that may ever be pinned."""

    def attach(self, vm: str, qemu_pid: int, vcpu_tids: Mapping[int, int]) -> None:
        """Prepare a VM once (v2: move its threads into their cgroups; v1: nothing)."""
        return

    @abstractmethod
    def _record(self, vm: str, vcpu: int, tid: int, pcpu: int) -> PinRecord:
        """What a pin of ``tid`` will change, read before it changes (saved, then applied)."""

    @abstractmethod
    def _apply(self, vm: str, vcpu: int, record: PinRecord) -> None:
        """The kernel writes of a pin (checked afterwards by the shared verify)."""

    @abstractmethod
    def _undo(self, vm: str, vcpu: int) -> None:
        """Undo every kernel change of a pin, also a partial one (its record, if any, is still
        saved: ``self.state.pin(vm, vcpu)``), and shrink the VM to its other pins."""

    @abstractmethod
    def _release(self, vm: str) -> None:
        """After its pins are undone: give back what ``attach`` moved, remove the VM's cgroups."""

    @abstractmethod
    def _orphan(self, vm_dir: Path) -> None:
        """A VM cgroup with no record at all (state lost): hand its threads back, remove it."""

    def _prune(self, vm: str, vm_dir: Path) -> None:
        """Inside a recorded VM's cgroup, remove what no record accounts for (v1: vcpu dirs)."""
        return

    def _isolate(self, held: frozenset[int], checked: Any = None) -> None:
        """Take exactly the ``held`` pCPUs from the other cgroups the operator named, giving
        back what is no longer held (v1 ``isolate_from``); raise PlacementError, changing
        nothing, where that would leave one of them without a CPU. v2: partitions do it.
        ``checked``: what :meth:`_isolate_check` returned for the same ``held`` (not read
        again)."""
        return

    def _isolate_check(self, held: frozenset[int]) -> Any:
        """Raise the PlacementError ``_isolate(held)`` would, reading only: a pin is refused
        before it changes anything, then placed, then isolated. Returns what it read, for
        ``_isolate``."""
        return None

    @abstractmethod
    def _thread_cgroup(self, tid: int) -> str:
        """The cgroup of ``tid`` in this hierarchy, as /proc shows it (``/…``)."""

    @abstractmethod
    def _check_cgroup(self, vm: str, vcpu: int, record: PinRecord) -> list[tuple[Check, str, str]]:
        """The vCPU cgroup's own setting: (what, expected, what the kernel says) per mismatch."""

    @abstractmethod
    def _achieved(
        self, records: Mapping[tuple[str, int], PinRecord]
    ) -> dict[tuple[str, int], Isolation]:
        """What each pin achieved for its pCPU, read back from the kernel now."""

    @abstractmethod
    def isolation_summary(self) -> str:
        """One line for operators, beginning ``isolated`` or ``restricted``: what a pin
        achieves here (from the kernel's state now), and if it does not isolate, why."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """Status for operators: per VM and vCPU, cgroup, cpus and partition state."""

    @abstractmethod
    def _remove_base(self) -> None:
        """Remove extpv's own cgroup, empty by now."""

    # -- shared ----------------------------------------------------------------------------------
    def _vm_dir(self, vm: str) -> Path:
        return self.base / f"vm-{vm}"

    def _vcpu_dir(self, vm: str, vcpu: int) -> Path:
        return self._vm_dir(vm) / f"vcpu{vcpu}"

    def _rel(self, path: Path) -> str:
        return "/" + str(path.relative_to(self.root)) if path != self.root else "/"

    def pins(self) -> dict[str, dict[int, int]]:
        """Current pins: VM → vCPU → pCPU."""
        return self.state.pins()

    def _held(self) -> set[int]:
        """Every pCPU some recorded pin holds."""
        return {p for pins in self.pins().values() for p in pins.values()}

    def _others(self, vm: str, vcpu: int) -> frozenset[int]:
        """The pCPUs ``vm`` holds through its other vCPUs."""
        return frozenset(p for v, p in self.pins().get(vm, {}).items() if v != vcpu)

    def achieved(self) -> dict[str, dict[int, Isolation]]:
        """Every recorded pin's isolation (VM → vCPU → it), read back from the kernel now."""
        records = {
            (vm, vcpu): record
            for vm in self.state.vms()
            for vcpu, record in self.state.pin_records(vm).items()
        }
        out: dict[str, dict[int, Isolation]] = {}
        for (vm, vcpu), isolation in self._achieved(records).items():
            out.setdefault(vm, {})[vcpu] = isolation
        return out

    def pin(self, vm: str, vcpu: int, tid: int, pcpu: int) -> None:
        """Restrict vCPU thread ``tid`` to ``pcpu``; verified, or undone and raised."""
        if self.state.pin(vm, vcpu) is not None:
            self.unpin(vm, vcpu)
        clock = self.stages
        with clock.stage("record"):
            record = self._record(vm, vcpu, tid, pcpu)
            # Saved before the first change: a crash from here on is undone by reconcile.
            self.state.set_pin(vm, vcpu, record)
        held = frozenset(self._held())
        try:
            # The thread is confined first and the other load's cpusets give the pCPU up
            # after: what the guest asked for is in place one isolate_from write sooner (that
            # write moves the load's tasks), and a refusal still comes before any change.
            with clock.stage("isolate"):
                checked = self._isolate_check(held)
            with clock.stage("cgroup"):
                self._apply(vm, vcpu, record)
            with clock.stage("isolate"):
                self._isolate(held, checked)
            with clock.stage("verify"):
                self._verify_pin(vm, vcpu, record)
        except PlacementError:
            self.unpin(vm, vcpu)
            raise

    def _verify_pin(self, vm: str, vcpu: int, record: PinRecord) -> None:
        drift = self._check(vm, vcpu, record)
        if drift:
            raise PlacementError(
                f"verify failed for VM {vm} vCPU {vcpu} (thread {record.tid}): "
                + "; ".join(f"{f.check} {f.found}, expected {f.expected}" for f in drift)
            )

    def unpin(self, vm: str, vcpu: int) -> None:
        """Undo ``pin`` exactly."""
        clock = self.stages
        record = self.state.pin(vm, vcpu)
        with clock.stage("cgroup"):
            self._undo(vm, vcpu)
        gone = {record.pcpu} if record is not None else set()
        with clock.stage("isolate"):
            self._isolate(frozenset(self._held() - gone))
        with clock.stage("record"):
            # Cleared only now: a crash during the undo leaves the record, and reconcile
            # redoes it.
            self.state.set_pin(vm, vcpu, None)

    def detach(self, vm: str) -> None:
        """Undo everything done for ``vm`` and remove its cgroups."""
        for vcpu in sorted(self.state.pin_records(vm)):
            self.unpin(vm, vcpu)
        self._release(vm)
        self.state.drop_vm(vm)

    def teardown(self) -> None:
        """Undo whatever is still placed (recorded VMs, then cgroups of ours that no record
        names) and remove extpv's own cgroup. Stopping leaves nothing behind: what cannot be
        removed is a PlacementError naming it, never a silent leftover."""
        for vm in self.state.vms():
            self.detach(vm)
        self._isolate(frozenset())  # also what a crash left taken with no pin recorded
        if not self.base.is_dir():
            return
        for vm_dir in sorted(p for p in self.base.iterdir() if p.is_dir()):
            self._orphan(vm_dir)
        self._remove_base()

    def verify(self) -> list[Finding]:
        """Re-check every recorded placement against the kernel; empty when all hold."""
        return [
            finding
            for vm in sorted(self.state.vms())
            for vcpu, record in sorted(self.state.pin_records(vm).items())
            for finding in self._check(vm, vcpu, record)
        ]

    def _check(self, vm: str, vcpu: int, record: PinRecord) -> list[Finding]:
        """How the kernel disagrees with ``record``: the thread is alive and in its vCPU
        cgroup, allowed exactly its pCPU, and the cgroup itself still holds the pin."""

        def finding(check: Check, expected: str, found: str) -> Finding:
            return Finding(vm=vm, vcpu=vcpu, tid=record.tid, pcpu=record.pcpu, check=check,
                           expected=expected, found=found)  # fmt: skip

        if not thread_alive(record.tid):
            return [finding("thread", "alive", "gone")]
        want = self._rel(self._vcpu_dir(vm, vcpu))
        try:
            where = self._thread_cgroup(record.tid)
            allowed = thread_allowed_cpus(record.tid)
        except PlacementError as err:  # it exited between the two reads
            return [finding("thread", "alive", str(err))]
        out = []
        if where != want:
            out.append(finding("cgroup", want, where))
        if allowed != {record.pcpu}:
            out.append(finding("affinity", str(record.pcpu), format_cpulist(allowed)))
        out += [finding(*mismatch) for mismatch in self._check_cgroup(vm, vcpu, record)]
        return out

    def reconcile(self, live: Mapping[str, Mapping[int, int]]) -> dict[str, dict[int, int]]:
        """After a restart: adopt pins of live VMs (VM → vCPU → tid) whose thread is still
        the same vCPU thread and intact; undo everything else, including cgroups of ours that
        no record accounts for (the state file was lost). Returns the adopted pins."""
        adopted: dict[str, dict[int, int]] = {}
        for vm in self.state.vms():
            for vcpu, record in sorted(self.state.pin_records(vm).items()):
                same = live.get(vm, {}).get(vcpu) == record.tid
                if same and not self._check(vm, vcpu, record):
                    adopted.setdefault(vm, {})[vcpu] = record.pcpu
                else:
                    self.unpin(vm, vcpu)
            if vm not in adopted and not (self.attaches_for_life and vm in live):
                self.detach(vm)
        recorded = set(self.state.vms())
        for vm_dir in sorted(self.base.iterdir()) if self.base.is_dir() else []:
            if not (vm_dir.is_dir() and vm_dir.name.startswith("vm-")):
                continue
            vm = vm_dir.name.removeprefix("vm-")
            if vm in recorded:
                self._prune(vm, vm_dir)
            else:
                _log.warning(
                    "%s has no record in %s: handing its threads back and removing it "
                    "(a live VM is pinned again at its next request)",
                    vm_dir,
                    self.state.path,
                )
                self._orphan(vm_dir)
        self._isolate(frozenset(self._held()))  # a crash may have left more taken, or less
        return adopted


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


def read_setting(path: Path) -> str:
    """A cgroup file's value for a report: never raises (a removed cgroup is a finding too)."""
    try:
        return path.read_text().strip()
    except OSError as err:
        return f"unreadable ({err.strerror})"


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


def restore_own_affinity(record: PinRecord | Cgroup1Home) -> None:
    """Give the pinned thread back the affinity it chose itself, after the cgroup side of an undo.

    ``prev_affinity`` and ``prev_effective`` (its cpuset's effective CPUs) are from before the pin.
    On kernels that keep the user mask the cgroup undo is already exact, and calling
    sched_setaffinity would be wrong: the mask passed becomes the new user mask, so a mask
    narrowed by the cpusets of the moment (other vCPUs isolated) would stay narrowed when
    those CPUs come back (measured on 6.12: vCPU threads left on ``0-1``, ``0,2`` … after a full
    undo). Older kernels reset the affinity to the cpuset on every change: there the thread's own
    choice is put back, counting the CPUs its cpuset hid at pin time as allowed (unknowable).
    """
    if KERNEL_KEEPS_USER_MASK or not thread_alive(record.tid):
        return
    own = set(record.prev_affinity) | (possible_cpus() - set(record.prev_effective))
    # EINVAL: none of its CPUs is in its cpuset now (the kernel keeps the cpuset's); ESRCH: gone.
    with contextlib.suppress(OSError):
        os.sched_setaffinity(record.tid, own)


#: How long rmdir of a cgroup is retried while the kernel still counts it busy.
RMDIR_BUSY_S = 2.0


def remove_cgroup(path: Path) -> None:
    """rmdir a cgroup of ours; one already gone is fine, any other failure is reported.

    EBUSY is retried for a short while: a thread just moved out, or exiting, can keep a
    cgroup populated for a moment after its tasks file reads empty (more so on a loaded
    host), and giving up then would leave the cgroup behind for good."""
    deadline = time.monotonic() + RMDIR_BUSY_S
    delay = 0.001
    while True:
        try:
            path.rmdir()
        except FileNotFoundError:
            return
        except OSError as err:
            if err.errno == errno.EBUSY and time.monotonic() < deadline:
                time.sleep(delay)
                delay = min(delay * 2, 0.05)
                continue
            raise PlacementError(f"cannot remove cgroup {path}: {err.strerror}") from err
        return
