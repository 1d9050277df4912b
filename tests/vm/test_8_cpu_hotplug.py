"""vCPU hot-plug on plain QEMU (no libvirt): QMP ``device_add`` of a vCPU into a running guest.

The test image's root file system booting Debian 12's 6.1 kernel (under TCG, trixie's 6.12
takes no hot-added vCPU: see tests/libvirt/test_libvirt_domains.py's hot-plug domain), 1 vCPU
of at most 2, served by this checkout's pvhost. The image's udev rule brings the new CPU
online; the guest agent tells pvhost (``TopologyUpdate``, protocol 5) with no restart and no
new Hello; a guest pin to the new vCPU is placed on its thread and released when it exits.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import vmlab
from vmlab import ImageError, VMSpec, start
from vmlab.daemon import PvhostDaemon
from vmlab.images import ensure_test_image_kernel61

pytestmark = [pytest.mark.vm, pytest.mark.root]

REPO = Path(__file__).resolve().parents[2]
VM = "hotplug"


@pytest.fixture(scope="module")
def vm(runtime_dir: Path) -> Iterator[vmlab.VirtualMachine]:
    try:
        image = ensure_test_image_kernel61(REPO)
    except ImageError as err:
        pytest.fail(str(err), pytrace=False)
    spec = VMSpec(
        name=VM,
        image=image.path,
        smp=1,
        maxcpus=2,
        memory_mib=1024,
        runtime_dir=runtime_dir,
        test_hook=True,
    )
    t0 = time.monotonic()
    machine = start(spec, deadline_s=300, retries=2)
    try:
        print(f"\n[vm] booted {machine} (6.1, 1 of 2 vCPUs) in {time.monotonic() - t0:.1f} s",
              file=sys.stderr)  # fmt: skip
        yield machine
    finally:
        machine.stop()


def _vm(status: dict[str, Any]) -> dict[str, Any]:
    return status["vms"].get(VM, {})  # type: ignore[no-any-return]


def test_a_vcpu_added_with_qmp_is_told_by_the_agent_and_pinned(
    vm: vmlab.VirtualMachine, pvhost_daemon: PvhostDaemon
) -> None:
    st = pvhost_daemon.wait_status(
        "the hot-plug VM's affinity program loaded",
        lambda s: _vm(s).get("programs", {}).get("affinity") == "loaded",
        300,
    )
    assert _vm(st)["guest_online"] == [0] and _vm(st)["protocol_version"] == 5, _vm(st)
    resets = _vm(st)["resets"]
    t0 = time.monotonic()
    added = vm.hot_plug_vcpu()
    assert added.index == 1, added
    st = pvhost_daemon.wait_status(
        "the guest's agent told pvhost CPU 1 is online",
        lambda s: _vm(s).get("guest_online") == [0, 1],
        60,
    )
    print(f"\n[hotplug] device_add → pvhost told by the agent: {time.monotonic() - t0:.2f} s",
          file=sys.stderr)  # fmt: skip
    assert _vm(st)["topology_changes"] == 1, _vm(st)
    assert _vm(st)["resets"] == resets, "no new session: the agent was not restarted"
    assert "1" in _vm(st)["vcpus"], "pvhost re-read the vCPU map"
    tid = added.tid
    t1 = time.monotonic()
    vm.guest_background(["taskset", "-c", "1", "sleep", "20"])
    st = pvhost_daemon.wait_status(
        "vCPU 1 placed", lambda s: "1" in _vm(s).get("placements", {}), 18
    )
    print(f"[hotplug] pin to the new vCPU → placed: {time.monotonic() - t1:.2f} s",
          file=sys.stderr)  # fmt: skip
    pcpu = int(_vm(st)["placements"]["1"]["pcpu"])
    assert os.sched_getaffinity(tid) == {pcpu}
    pvhost_daemon.wait_status("released", lambda s: not _vm(s).get("placements"), 60)
