"""Runs INSIDE the test guest (-smp 4, kernel 6.12, cgroup v2 with cpuset): ``LibvirtPlacement``.

guest_libvirt_cgroup2_probe.py drives the partitions (``LibvirtPartitions``) alone; this probe
drives what the service calls for a libvirt domain's pin, ``pvhost.placement.libvirt``'s
``LibvirtPlacement`` (its ``pin``, ``unpin``, ``verify``, ``achieved``, ``describe``, the
restart after a kill -9 and ``detach``), wired to the partitions and to the plain-QEMU cgroup v2
backend exactly as ``pvhost.service.Service`` wires them. Real: the guest's cgroupfs and
kernel partitions, a nested QEMU's vCPU threads in libvirt's cgroup layout, the state files.

Standing in for libvirtd, which does not run here (the test image has no libvirt and it is too
slow under TCG), named as such: :class:`StandInLibvirt` (the binding's names this code uses) and
:class:`StandInDomain`, whose ``pinVcpuFlags`` does what libvirt's live vcpupin does
(qemuDomainPinVcpuLive: the vcpuN cgroup's ``cpuset.cpus``, then the thread's affinity) and whose
``vcpuPinInfo`` answers libvirt's live pinning. The real binding against a real libvirtd is
tested in tests/libvirt (cgroup v1 host). Prints one JSON object of observations;
test_2e_libvirt_placement_in_guest.py asserts on them.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import types
from pathlib import Path
from typing import Any

sys.path.insert(0, os.environ.get("EXTPV_SRC", "/mnt/extpv"))


class StandInLibvirtError(Exception):
    """libvirt.libvirtError's stand-in (its error code)."""

    def __init__(self, msg: str, code: int) -> None:
        super().__init__(msg)
        self.code = code

    def get_error_code(self) -> int:
        return self.code


class StandInLibvirt(types.ModuleType):
    """The libvirt binding's names ``pvhost.placement.libvirt`` uses (values as libvirt's)."""

    VIR_DOMAIN_AFFECT_LIVE = 1
    VIR_ERR_OPERATION_INVALID = 55
    VIR_ERR_NO_DOMAIN = 42
    libvirtError = StandInLibvirtError


# Before pvhost is imported: the guest has no libvirt binding.
sys.modules["libvirt"] = StandInLibvirt("libvirt")

from pvhost.errors import PlacementError  # noqa: E402
from pvhost.placement import libvirt_cgroup2  # noqa: E402
from pvhost.placement.cgroup2 import Cgroup2Backend, probe_mode  # noqa: E402
from pvhost.placement.libvirt import LibvirtPlacement  # noqa: E402
from pvhost.placement.libvirt_cgroup2 import LibvirtPartitions  # noqa: E402
from pvproto import format_cpulist  # noqa: E402
from tests.faultpoints import KILLED, killed_before_write  # noqa: E402
from tests.vm.guest_cgroup2_probe import start_nested_qemu  # noqa: E402
from tests.vm.guesthost import (  # noqa: E402
    LV,
    ROOT,
    leaf,
    libvirt_domain,
    libvirt_pin,
    read,
    stepper,
    view,
)

VM = "inner"
UUID = "4f1b7c2e-0000-4000-8000-00000000e11e"
HOST_CPUS = 4


class StandInDomain:
    """One running domain as libvirt's API shows it: the live pinning per vCPU (every host CPU
    until pinned) and libvirt's writes of a live pin."""

    def __init__(self, tids: dict[int, int]) -> None:
        self.tids = tids
        self.pins = {v: tuple(True for _ in range(HOST_CPUS)) for v in tids}

    def ID(self) -> int:  # libvirt's method names, as the placement calls them
        return 1

    def UUIDString(self) -> str:
        return UUID

    def isActive(self) -> bool:
        return True

    def vcpuPinInfo(self, flags: int) -> tuple[tuple[bool, ...], ...]:
        return tuple(self.pins[v] for v in sorted(self.pins))

    def pinVcpuFlags(self, vcpu: int, cpumap: tuple[bool, ...], flags: int) -> None:
        cpus = format_cpulist(i for i, on in enumerate(cpumap) if on)
        try:
            libvirt_pin(vcpu, self.tids[vcpu], cpus)
        except OSError as err:  # libvirt reports a failed cgroup write as an error of its own
            raise StandInLibvirtError(f"vcpupin {vcpu} {cpus}: {err}", 1) from err
        self.pins[vcpu] = tuple(cpumap)

    def vcpupin(self) -> dict[int, str]:
        """What ``virsh vcpupin`` would show."""
        return {v: format_cpulist(i for i, on in enumerate(m) if on) for v, m in self.pins.items()}


class StandInLink:
    """pvhost.libvirt.LibvirtLink's part the placement uses: the domain by UUID."""

    connected = True

    def __init__(self, dom: StandInDomain) -> None:
        self.dom = dom

    def domain(self, uuid: str) -> StandInDomain:
        return self.dom


def wire(
    tmp: Path, link: StandInLink
) -> tuple[Cgroup2Backend, LibvirtPlacement, LibvirtPartitions]:
    """What ``Service`` does at construction and at start (setup, the partitions in the mode
    it found, then the sync after a kill)."""
    backend = Cgroup2Backend(ROOT, tmp / "cgroup2.json")
    placement = LibvirtPlacement(link, tmp / "libvirt.json")  # type: ignore[arg-type]
    backend.lent = placement.held
    backend.setup(frozenset({1, 2, 3}))
    parts = LibvirtPartitions(ROOT, tmp / "libvirt-cgroup2.json", backend.mode)
    parts.lend = backend.lend_exclusive
    placement.partitions = parts
    placement.sync_partitions()
    placement.known(VM, UUID, VM)
    return backend, placement, parts


def seen(placement: LibvirtPlacement, dom: StandInDomain, tids: dict[int, int]) -> dict[str, Any]:
    """The cgroups, libvirt's view and what pvctl status would show of the pins."""
    out = view(tids)
    out["vcpupin"] = dom.vcpupin()
    out["pins"] = placement.pins()
    out["describe"] = placement.describe()["vms"]
    out["achieved"] = {
        vm: {str(v): [i.mode, i.reason] for v, i in by.items()}
        for vm, by in placement.achieved().items()
    }
    out["verify"] = [f"{f.check}: {f.expected} / {f.found}" for f in placement.verify()]
    return out


def main() -> None:
    obs: dict[str, Any] = {"errors": {}}
    step = stepper(obs)
    with libvirt_domain(obs, start_nested_qemu) as tids, tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        dom = StandInDomain(tids)
        link = StandInLink(dom)
        obs["mode"] = probe_mode(ROOT)
        obs["before"] = view(tids)
        backend, placement, _ = wire(tmp, link)
        obs["setup"] = seen(placement, dom, tids)

        # 1. The guest asks vCPU 1 → pCPU 1: libvirt pins, then the partition in place.
        step("pin1", lambda: placement.pin(VM, 1, tids[1], 1))
        obs["pin1"] = seen(placement, dom, tids)
        # 2. vCPU 2 → pCPU 2.
        step("pin2", lambda: placement.pin(VM, 2, tids[2], 2))
        obs["pin2"] = seen(placement, dom, tids)
        # 3. vCPU 1's thread exits: the unpin; the other pin holds.
        step("unpin1", lambda: placement.unpin(VM, 1))
        obs["unpin1"] = seen(placement, dom, tids)
        # 4. A pin that would leave libvirt's vcpu0 no CPU (pinned to pCPU 3 by the
        #    operator): refused, libvirt's pin of vCPU 3 put back, nothing else changed.
        dom.pinVcpuFlags(0, (False, False, False, True), 1)
        before = seen(placement, dom, tids)
        try:
            placement.pin(VM, 3, tids[3], 3)
            obs["refused"] = None
        except PlacementError as err:
            obs["refused"] = str(err)
        after = seen(placement, dom, tids)
        obs["refusal_changed"] = {k: [before[k], after[k]] for k in after if after[k] != before[k]}
        dom.pinVcpuFlags(0, (True,) * HOST_CPUS, 1)
        # 5. kill -9 just before the partition's write of a pin of vCPU 3; a new pvhost
        #    (everything wired anew from the state files) converges to the recorded pin.
        exit_code = killed_before_write(
            libvirt_cgroup2,
            LV / "vcpu3" / "cpuset.cpus.partition",
            lambda: placement.pin(VM, 3, tids[3], 3),
        )
        # libvirt's own state survived the kill: the child's pin is libvirt's now
        dom.pins[3] = tuple(i == 3 for i in range(HOST_CPUS))
        crash: dict[str, Any] = {"killed": exit_code == KILLED}
        crash["left"] = {"vcpu3": view(tids)["vcpu3"]}
        restarted = step("restart", lambda: wire(tmp, link))
        if restarted is not None:
            backend, placement, _ = restarted
        crash["after"] = seen(placement, dom, tids)
        obs["crash"] = crash
        # 6. The domain's session ends (the agent gone): detach undoes every pin.
        step("detach", lambda: placement.detach(VM))
        obs["after"] = seen(placement, dom, tids)
        obs["after_saved"] = json.loads(read(tmp / "libvirt-cgroup2.json") or "{}")
        obs["after_state"] = json.loads(read(tmp / "libvirt.json") or "{}")
        step("backend_teardown", backend.teardown)
    obs["leaf1"] = leaf(1)
    print(json.dumps(obs))


if __name__ == "__main__":
    main()
