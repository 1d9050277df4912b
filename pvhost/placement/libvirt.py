"""Placement of libvirt domains' vCPUs through libvirt itself.

libvirt keeps each vCPU thread in its own cgroup (v1: ``cpuset/machine/<domain>/vcpuN``; v2:
``machine.slice/…scope/libvirt/vcpuN``) and remembers each vCPU's pinning; moving the threads
elsewhere would make ``virsh vcpupin`` lie and be undone at libvirt's next change. So a pin is
``virDomainPinVcpuFlags(…, AFFECT_LIVE)``: libvirt writes its own vcpuN cpuset and the thread's
affinity, and ``virsh vcpupin DOM`` shows what extpv applied. The pinning libvirt had before is
recorded first (``<state_dir>/libvirt.json``, replaced atomically) and put back by the undo, also
after a kill -9 of pvhost. The live pinning dies with the domain's QEMU, so the record of a
domain that stopped (or runs as another instance: its libvirt id changed) is dropped untouched.

Isolation (cgroup v1 ``[placement] isolate_from``): libvirt's cpusets restrict the vCPU thread
only, so the pCPUs these pins hold are withheld from the ``isolate_from`` cpusets by the cgroup
v1 backend, together with its own (its ``also_held`` reads :meth:`LibvirtPlacement.held`, and
:attr:`LibvirtPlacement.isolate` is its ``isolate_held``). The pCPU is taken before libvirt pins
(a cpuset it would leave without a CPU refuses the pin, nothing changed) and given back once the
pin's record is gone; after a kill -9 the backend's reconcile withholds what the record holds.

Isolation (cgroup v2, :attr:`LibvirtPlacement.partitions`): after libvirt's pin, the vCPU's own
``vcpuN`` cgroup becomes a remote isolated partition in place (:mod:`.libvirt_cgroup2`: only
``cpuset.cpus.exclusive`` up libvirt's chain, no thread moves), recorded in the pin (``cgroup``)
before; an unpin undoes the partition before libvirt's pinning is put back, and syncs again
after it (libvirt's write of the vCPU's ``cpuset.cpus`` may invalidate a partition beside it).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

try:
    import libvirt
except ImportError:  # optional: only a [libvirt]-enabled pvhost makes this backend
    libvirt = None
from pydantic import BaseModel, ConfigDict, NonNegativeInt

from pvhost.errors import HostError, PartitionInvalid, PlacementError
from pvhost.files import load_model, replace_file
from pvhost.libvirt import LibvirtLink
from pvhost.placement.base import Check, Finding
from pvhost.placement.cgroup2 import thread_cgroup2
from pvhost.placement.isolation import Isolation, libvirt_isolation
from pvhost.placement.libvirt_cgroup2 import LibvirtPartitions, leaf_of

__all__ = ["LibvirtPlacement"]

_log = logging.getLogger(__name__)

NAME = "libvirt"


class _Pin(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    tid: int
    pcpu: NonNegativeInt
    #: libvirt's live pinning of this vCPU before extpv's (host CPU numbers).
    previous: tuple[NonNegativeInt, ...]
    #: cgroup v2: libvirt's vcpuN cgroup made a partition for this pin (``/…``), or "".
    cgroup: str = ""


class _Vm(BaseModel):
    model_config = ConfigDict(extra="forbid")
    uuid: str
    #: libvirt's id of the running instance the pins belong to.
    instance: int
    domain: str
    vcpus: dict[int, _Pin] = {}


class _File(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: int = 1
    vms: dict[str, _Vm] = {}


def _cpus(cpumap: tuple[bool, ...]) -> tuple[int, ...]:
    return tuple(i for i, on in enumerate(cpumap) if on)


class LibvirtPlacement:
    """Pins and undoes vCPUs of libvirt domains; same calls as a backend where the service
    needs them (``pins``, ``pin``, ``unpin``, ``detach``, ``describe``, ``verify``)."""

    name = NAME

    def __init__(self, link: LibvirtLink, state_path: Path) -> None:
        self.link = link
        self.path = state_path
        self._state = self._load()
        #: pvhost name → (uuid, libvirt name) of the domains the service placed for.
        self._known: dict[str, tuple[str, str]] = {}
        #: Withholds :meth:`held` from other cpusets (cgroup v1 ``isolate_from``), or None.
        self.isolate: Callable[[], None] | None = None
        #: Reads back what pins achieved (``(vm, vcpu)`` → ``(pcpu, tid)``): the cgroup v1
        #: backend's, or None where extpv isolates nothing for libvirt domains.
        self.read_back: (
            Callable[[Mapping[tuple[str, int], tuple[int, int]]], dict[tuple[str, int], Isolation]]
            | None
        ) = None
        #: cgroup v2: the partitions at libvirt's vcpuN cgroups (set by the service once its
        #: backend is set up, in the mode it found), or None (cgroup v1, or not yet set up).
        self.partitions: LibvirtPartitions | None = None

    # -- state file --------------------------------------------------------------------------
    def _load(self) -> _File:
        return load_model(self.path, _File, _log) or _File()

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        replace_file(self.path, self._state.model_dump_json().encode())

    # -- what the service calls ---------------------------------------------------------------
    def known(self, vm: str, uuid: str, domain: str) -> None:
        self._known[vm] = (uuid, domain)

    def pins(self) -> dict[str, dict[int, int]]:
        return {
            vm: {v: p.pcpu for v, p in rec.vcpus.items()}
            for vm, rec in self._state.vms.items()
            if rec.vcpus
        }

    def held(self) -> frozenset[int]:
        """Every pCPU a recorded pin holds."""
        return frozenset(p.pcpu for rec in self._state.vms.values() for p in rec.vcpus.values())

    def achieved(self) -> dict[str, dict[int, Isolation]]:
        """Every recorded pin's isolation (VM → vCPU → it), read back now where it can be."""
        pins = {
            (vm, v): (p.pcpu, p.tid)
            for vm, rec in self._state.vms.items()
            for v, p in rec.vcpus.items()
        }
        if self.partitions is not None:
            parts = self.partitions
            leaves = {
                (vm, v): p.cgroup
                for vm, rec in self._state.vms.items()
                for v, p in rec.vcpus.items()
            }
            found = {key: parts.isolation(leaves[key]) for key in pins}
        elif self.read_back is not None:
            found = self.read_back(pins)
        else:
            found = {key: libvirt_isolation() for key in pins}
        out: dict[str, dict[int, Isolation]] = {}
        for (vm, vcpu), isolation in found.items():
            out.setdefault(vm, {})[vcpu] = isolation
        return out

    def _isolate(self) -> None:
        if self.isolate is not None:
            self.isolate()

    def _targets(self, without: tuple[str, int] | None = None) -> dict[str, int]:
        """libvirt vcpuN cgroup → pCPU of every recorded pin with one (less ``without``)."""
        return {
            p.cgroup: p.pcpu
            for vm, rec in self._state.vms.items()
            for v, p in rec.vcpus.items()
            if p.cgroup and (vm, v) != without
        }

    def sync_partitions(self, without: tuple[str, int] | None = None) -> None:
        """cgroup v2: make the partitions exactly the recorded pins' (also after a kill -9)."""
        if self.partitions is not None:
            self.partitions.sync(self._targets(without))

    def _partition(self, vm: str, vcpu: int, tid: int) -> None:
        """cgroup v2, after libvirt's pin: its vcpuN cgroup becomes an isolated partition."""
        parts = self.partitions
        if parts is None or not parts.isolates():
            return
        rec = self._state.vms[vm]
        try:
            leaf = leaf_of(thread_cgroup2(tid), vcpu) or ""
        except PlacementError:
            leaf = ""  # the thread is gone: verify says so
        # Recorded before the first write: a kill -9 from here on is undone by the next sync.
        rec.vcpus[vcpu] = rec.vcpus[vcpu].model_copy(update={"cgroup": leaf})
        self._save()
        parts.sync(self._targets())

    def _domain(self, vm: str) -> Any:
        uuid = self._known[vm][0] if vm in self._known else self._state.vms[vm].uuid
        try:
            return self.link.domain(uuid)
        except HostError as err:
            raise PlacementError(f"VM {vm}: {err}") from err

    def pin(self, vm: str, vcpu: int, tid: int, pcpu: int) -> None:
        dom = self._domain(vm)
        live = libvirt.VIR_DOMAIN_AFFECT_LIVE
        try:
            current = dom.vcpuPinInfo(live)
            instance = dom.ID()
        except libvirt.libvirtError as err:
            raise PlacementError(f"VM {vm}: libvirt: {err}") from err
        if vcpu >= len(current):
            raise PlacementError(f"VM {vm}: libvirt knows no vCPU {vcpu}")
        host_cpus = len(current[vcpu])
        if pcpu >= host_cpus:
            raise PlacementError(f"VM {vm}: pCPU {pcpu} is not one of libvirt's {host_cpus}")
        rec = self._state.vms.get(vm)
        if rec is None or rec.instance != instance:
            uuid, domain = self._known.get(vm, ("", vm))
            rec = _Vm(uuid=uuid or dom.UUIDString(), instance=instance, domain=domain)
            self._state.vms[vm] = rec
        old = rec.vcpus.get(vcpu)
        previous = old.previous if old is not None else _cpus(current[vcpu])
        # Recorded before the change: a kill -9 from here on is undone from the record.
        rec.vcpus[vcpu] = _Pin(tid=tid, pcpu=pcpu, previous=previous)
        self._save()
        try:
            self._isolate()  # before the pin: refused, it changes nothing
        except PlacementError as err:
            self.unpin(vm, vcpu)
            raise PlacementError(f"VM {vm} vCPU {vcpu}: {err}") from err
        cpumap = tuple(i == pcpu for i in range(host_cpus))
        try:
            dom.pinVcpuFlags(vcpu, cpumap, live)
        except libvirt.libvirtError as err:
            self.unpin(vm, vcpu)
            raise PlacementError(f"VM {vm} vCPU {vcpu}: libvirt refused the pin: {err}") from err
        drift = self._check(vm, vcpu, dom)
        if drift:
            self.unpin(vm, vcpu)
            raise PlacementError(f"VM {vm} vCPU {vcpu}: verify failed: {drift[0]}")
        try:
            self._partition(vm, vcpu, tid)
        except PartitionInvalid as err:
            self.unpin(vm, vcpu)
            raise PartitionInvalid(f"VM {vm} vCPU {vcpu}: {err}", err.reason) from err
        except PlacementError as err:
            self.unpin(vm, vcpu)
            raise PlacementError(f"VM {vm} vCPU {vcpu}: {err}") from err

    def unpin(self, vm: str, vcpu: int) -> None:
        """Put back libvirt's pinning from before extpv's; the record goes only once it is."""
        rec = self._state.vms.get(vm)
        if rec is None or vcpu not in rec.vcpus:
            return
        pin = rec.vcpus[vcpu]
        if pin.cgroup:
            # The partition goes before libvirt's pinning is put back: libvirt writes the
            # vcpuN cgroup's cpuset.cpus, which a partition there would not take.
            self.sync_partitions(without=(vm, vcpu))
        try:
            dom = self.link.domain(rec.uuid)
        except HostError as err:
            if not self.link.connected:
                raise PlacementError(f"VM {vm} vCPU {vcpu}: undo must wait: {err}") from err
            dom = None  # libvirt knows the domain no more: its live pinning went with it
        try:
            if dom is not None and dom.isActive() and dom.ID() == rec.instance:
                host_cpus = len(dom.vcpuPinInfo(libvirt.VIR_DOMAIN_AFFECT_LIVE)[0])
                cpumap = tuple(i in pin.previous for i in range(host_cpus))
                dom.pinVcpuFlags(vcpu, cpumap, libvirt.VIR_DOMAIN_AFFECT_LIVE)
        except libvirt.libvirtError as err:
            if not _domain_gone(err):
                raise PlacementError(f"VM {vm} vCPU {vcpu}: undo failed: {err}") from err
        del rec.vcpus[vcpu]
        if not rec.vcpus:
            del self._state.vms[vm]
        self._save()
        self._isolate()  # gives the pCPU back
        if pin.cgroup:
            # libvirt's write of this vCPU's cpuset.cpus may have invalidated a partition
            # beside it (Linux 6.12): room is made again and it is enabled again.
            self.sync_partitions()

    def detach(self, vm: str) -> None:
        rec = self._state.vms.get(vm)
        errors = []
        for vcpu in sorted(rec.vcpus) if rec is not None else []:
            try:
                self.unpin(vm, vcpu)
            except PlacementError as err:
                errors.append(str(err))
        self._known.pop(vm, None)
        if errors:
            raise PlacementError("; ".join(errors))

    def forget_stopped(self, running: dict[str, int]) -> None:
        """Drop records of domains that no longer run (uuid → live id of those that do)."""
        changed = False
        for vm, rec in list(self._state.vms.items()):
            if running.get(rec.uuid) != rec.instance:
                _log.info("%s: domain %s stopped; its live pinning went with it", vm, rec.domain)
                del self._state.vms[vm]
                changed = True
        if changed:
            self._save()
            self._isolate()
            self.sync_partitions()  # a stopped domain's cgroups are gone: the rest goes back

    def _check(self, vm: str, vcpu: int, dom: Any) -> list[Finding]:
        """libvirt's live pinning of the vCPU, and the thread's affinity, against the record."""
        pin = self._state.vms[vm].vcpus[vcpu]
        try:
            shown = _cpus(dom.vcpuPinInfo(libvirt.VIR_DOMAIN_AFFECT_LIVE)[vcpu])
        except (libvirt.libvirtError, IndexError) as err:
            shown = ()
            _log.info("%s: vcpupin of vCPU %d unreadable: %s", vm, vcpu, err)
        try:
            allowed = tuple(sorted(os.sched_getaffinity(pin.tid)))
        except OSError:
            allowed = ()
        seen: list[tuple[Check, tuple[int, ...], str]] = [
            ("cpuset", shown, "nothing"),
            ("affinity", allowed, "thread gone"),
        ]
        partition: list[Finding] = []
        if self.partitions is not None and pin.cgroup:
            partition = [
                Finding(
                    vm=vm,
                    vcpu=vcpu,
                    tid=pin.tid,
                    pcpu=pin.pcpu,
                    check="partition" if what == "partition" else "cpuset",
                    expected=expected,
                    found=found,
                )
                for what, expected, found in self.partitions.check(pin.cgroup, pin.pcpu)
            ]
        return partition + [
            Finding(
                vm=vm,
                vcpu=vcpu,
                tid=pin.tid,
                pcpu=pin.pcpu,
                check=check,
                expected=str(pin.pcpu),
                found=",".join(map(str, cpus)) or empty,
            )
            for check, cpus, empty in seen
            if cpus != (pin.pcpu,)
        ]

    def verify(self) -> list[Finding]:
        findings: list[Finding] = []
        for vm, rec in self._state.vms.items():
            try:
                dom = self._domain(vm)
            except PlacementError:
                continue  # libvirt down: nothing to ask
            for vcpu in sorted(rec.vcpus):
                findings += self._check(vm, vcpu, dom)
        return findings

    def describe(self) -> dict[str, Any]:
        return {
            "vms": {
                vm: {
                    str(v): {
                        "pcpu": p.pcpu,
                        "tid": p.tid,
                        "previous": list(p.previous),
                        "cgroup": p.cgroup or None,
                        "domain": rec.domain,
                    }
                    for v, p in sorted(rec.vcpus.items())
                }
                for vm, rec in self._state.vms.items()
            }
        }


def _domain_gone(err: Exception) -> bool:
    code = err.get_error_code() if isinstance(err, libvirt.libvirtError) else None
    return code in (libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_ERR_OPERATION_INVALID)
