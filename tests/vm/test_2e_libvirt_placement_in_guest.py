"""``LibvirtPlacement`` on cgroup v2: a libvirt domain's pin, unpin, refusal and kill -9.

test_2d drives the partitions at libvirt's vcpuN cgroups alone; this drives the placement the
service calls for a libvirt domain (pvhost.placement.libvirt), wired to them and to the
plain-QEMU cgroup v2 backend as ``pvhost.service.Service`` wires them, in the shared -smp 4
guest (Debian trixie, 6.12) acting as the host. Real: the guest's cgroupfs and partitions, a
nested QEMU's vCPU threads in libvirt's layout, the state files. Standing in for libvirtd
(absent from the test image, too slow under TCG): the probe's ``StandInDomain``, which does
libvirt's live vcpupin writes and answers its live pinning (the real libvirt API is tested
against a real libvirtd in tests/libvirt, on this cgroup v1 host).
"""

from __future__ import annotations

import pytest

from tests.vm.guesthost import LV_ANCESTORS, LV_CGROUP, assert_as_libvirt_had
from tests.vm.probes import probe_fixture

pytestmark = [pytest.mark.vm, pytest.mark.slow]

VM = "inner"
EVERY = dict.fromkeys(("0", "1", "2", "3"), "0-3")  # virsh vcpupin, vCPU → pCPUs


observed = probe_fixture("guest_libvirt_placement_probe.py")


def test_no_step_failed(observed: dict) -> None:
    assert observed["mode"] == "remote"
    assert observed["errors"] == {}, observed["errors"]
    setup = observed["setup"]
    assert setup["pins"] == {} and setup["extpv_slice_exclusive"] == "1-3", setup


def test_pin_goes_through_libvirt_and_isolates_in_its_vcpu_cgroup(observed: dict) -> None:
    pin1 = observed["pin1"]
    assert pin1["vcpupin"] == {**EVERY, "1": "1"}, "virsh vcpupin shows extpv's pin"
    assert pin1["pins"] == {VM: {"1": 1}}
    assert pin1["vcpu1"]["partition"] == "isolated", pin1["vcpu1"]
    assert pin1["vcpu1"]["cgroup"] == f"{LV_CGROUP}/vcpu1", "the thread stays in libvirt's cgroup"
    assert pin1["vcpu1"]["allowed"] == "1"
    assert pin1["exclusive"] == dict.fromkeys(LV_ANCESTORS, "1"), pin1["exclusive"]
    assert pin1["root_isolated"] == "1"
    assert pin1["extpv_slice_exclusive"] == "2-3", "extpv.slice lent pCPU 1"
    # What pvctl status and the guest's answer say: the partition, read back.
    assert pin1["describe"][VM]["1"]["cgroup"] == f"{LV_CGROUP}/vcpu1"
    assert pin1["describe"][VM]["1"]["previous"] == [0, 1, 2, 3]
    assert pin1["achieved"] == {VM: {"1": ["isolated", ""]}}, pin1["achieved"]
    assert pin1["verify"] == []
    pin2 = observed["pin2"]
    assert pin2["vcpupin"] == {**EVERY, "1": "1", "2": "2"}
    assert pin2["vcpu1"]["partition"] == pin2["vcpu2"]["partition"] == "isolated", pin2
    assert pin2["root_isolated"] == "1-2"
    assert pin2["extpv_slice_exclusive"] == "3"
    assert [m for m, _ in pin2["achieved"][VM].values()] == ["isolated", "isolated"]
    assert pin2["verify"] == []


def test_unpin_puts_libvirts_pinning_back_and_the_other_pin_holds(observed: dict) -> None:
    after = observed["unpin1"]
    assert after["vcpupin"] == {**EVERY, "2": "2"}, "libvirt's pinning from before, back"
    assert after["pins"] == {VM: {"2": 2}}
    assert after["vcpu1"]["partition"] == "member" and after["vcpu1"]["exclusive"] == ""
    assert after["vcpu1"]["allowed"] != "1", after["vcpu1"]
    assert after["vcpu2"]["partition"] == "isolated", after["vcpu2"]
    assert after["exclusive"] == dict.fromkeys(LV_ANCESTORS, "2"), after["exclusive"]
    assert after["extpv_slice_exclusive"] == "1,3", "pCPU 1 given back to extpv.slice"
    assert after["achieved"] == {VM: {"2": ["isolated", ""]}}
    assert after["verify"] == []


def test_pin_that_would_leave_a_sibling_no_cpu_is_refused_and_undone(observed: dict) -> None:
    assert observed["refused"] is not None and "leave it no CPU" in observed["refused"]
    assert f"{LV_CGROUP}/vcpu0" in observed["refused"]
    # libvirt's pin of vCPU 3 was put back and nothing was recorded: only what libvirt itself
    # wrote for the pin and its undo differs (vcpu3's cpuset.cpus, now explicit).
    changed = observed["refusal_changed"]
    assert set(changed) <= {"vcpu3"}, changed
    if changed:
        before, after = changed["vcpu3"]
        assert after["partition"] == "member" and after["exclusive"] == "", after
        assert after["allowed"] == before["allowed"]


def test_kill_9_mid_pin_converges_to_the_recorded_pin_on_restart(observed: dict) -> None:
    crash = observed["crash"]
    assert crash["killed"] is True, crash
    assert crash["left"]["vcpu3"]["partition"] == "member", "killed before the partition"
    after = crash["after"]
    assert after["pins"] == {VM: {"2": 2, "3": 3}}
    assert after["vcpu3"]["partition"] == after["vcpu2"]["partition"] == "isolated", after
    assert after["exclusive"] == dict.fromkeys(LV_ANCESTORS, "2-3"), after["exclusive"]
    assert after["extpv_slice_exclusive"] == "1", "the restarted backend lent both"
    assert [m for m, _ in after["achieved"][VM].values()] == ["isolated", "isolated"]
    assert after["verify"] == []


def test_detach_restores_exactly_what_libvirt_had(observed: dict) -> None:
    after = observed["after"]
    assert after["vcpupin"] == EVERY
    assert after["pins"] == {}
    assert_as_libvirt_had(observed["before"], after)
    assert observed["after_saved"].get("leaves", {}) == {}, observed["after_saved"]
    assert observed["after_state"].get("vms", {}) == {}, observed["after_state"]
