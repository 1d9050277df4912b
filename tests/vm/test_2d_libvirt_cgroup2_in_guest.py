"""A libvirt domain's pin isolates on cgroup v2: a remote partition in libvirt's own vcpuN cgroup.

This machine's cpuset is cgroup v1, so the shared -smp 4 guest (Debian trixie, 6.12, remote
partitions) acts as the host. Real: the guest's cgroupfs and kernel partitions, a nested QEMU's
vCPU threads, this checkout's ``pvhost.placement.libvirt_cgroup2`` and the plain-QEMU cgroup v2
backend beside it. Standing in for libvirtd (too slow to run in the TCG guest): the probe lays
out the cgroups exactly as libvirt does on a systemd host
(``machine.slice/machine-qemu\\x2d1\\x2dinner.scope/libvirt/{emulator,vcpuN}``) and does the
writes of libvirt's live vcpupin (``vcpuN/cpuset.cpus``, then the thread's affinity). The
libvirt API part of a pin is tested against a real libvirtd in tests/libvirt (cgroup v1 host).
"""

from __future__ import annotations

import pytest

from pvproto import parse_cpulist
from tests.vm.guesthost import LV_ANCESTORS, LV_CGROUP, assert_as_libvirt_had
from tests.vm.probes import probe_fixture

pytestmark = [pytest.mark.vm, pytest.mark.slow]

observed = probe_fixture("guest_libvirt_cgroup2_probe.py")


def test_no_step_failed(observed: dict) -> None:
    assert observed["mode"] == "remote"
    assert observed["errors"] == {}, observed["errors"]
    assert observed["invalid_error"] is None


def test_pin_is_an_isolated_partition_in_libvirts_own_vcpu_cgroup(observed: dict) -> None:
    pin1 = observed["pin1"]
    vcpu1 = pin1["vcpu1"]
    assert vcpu1["partition"] == "isolated", pin1
    assert vcpu1["exclusive"] == "1"
    assert vcpu1["cgroup"] == f"{LV_CGROUP}/vcpu1", "the thread stays in libvirt's cgroup"
    assert vcpu1["allowed"] == "1"
    # Remote partition: exclusive CPUs up the chain, no partition root in between.
    assert pin1["exclusive"] == dict.fromkeys(LV_ANCESTORS, "1"), pin1["exclusive"]
    assert pin1["root_isolated"] == "1"
    # extpv.slice (plain-QEMU VMs) lent pCPU 1 out of its exclusive CPUs.
    assert pin1["extpv_slice_exclusive"] == "2-3"
    # libvirt's other cgroups keep their type and their (empty) cpuset.cpus.
    assert pin1["emulator"]["cpus"] == "" and pin1["vcpu0"]["cpus"] == ""
    assert 1 not in parse_cpulist(pin1["emulator"]["effective"]), pin1["emulator"]
    assert observed["pin1_isolation"] == "isolated"
    assert observed["pin1_check"] == []
    pin2 = observed["pin2"]
    assert pin2["vcpu1"]["partition"] == pin2["vcpu2"]["partition"] == "isolated", pin2
    assert pin2["exclusive"] == dict.fromkeys(LV_ANCESTORS, "1-2"), pin2["exclusive"]
    assert pin2["root_isolated"] == "1-2"
    assert pin2["extpv_slice_exclusive"] == "3"


def test_unpin_beside_a_pin_keeps_the_other_isolated(observed: dict) -> None:
    """libvirt's undo writes the vCPU's cpuset.cpus back to every CPU, over the partition beside
    it: the room is made again (the pCPU trimmed from it, recorded) and the partition holds."""
    after = observed["unpin1"]
    assert after["vcpu1"]["partition"] == "member" and after["vcpu1"]["exclusive"] == ""
    assert after["vcpu1"]["cpus"] == "0-1,3", after["vcpu1"]
    assert after["vcpu2"]["partition"] == "isolated", after["vcpu2"]
    assert after["exclusive"] == dict.fromkeys(LV_ANCESTORS, "2"), after["exclusive"]
    assert after["extpv_slice_exclusive"] == "1,3"
    assert observed["pin2_isolation_after_unpin1"] == "isolated"
    assert observed["unpin1_saved"]["siblings"] == {
        f"{LV_CGROUP}/vcpu1": {"cpus": "0-3", "wrote": "0-1,3"}
    }


def test_each_domain_holds_its_own_and_a_stopped_one_gives_back(observed: dict) -> None:
    pin_b = observed["pin_b"]
    assert pin_b["b_partition"] == "isolated", pin_b
    assert pin_b["exclusive"]["/machine.slice"] == "2-3", "machine.slice holds both domains'"
    assert pin_b["exclusive"][LV_CGROUP] == "2" and pin_b["scope_b_exclusive"] == "3", pin_b
    assert pin_b["extpv_slice_exclusive"] == "1"
    assert pin_b["root_isolated"] == "2-3"
    # The domain stopped (its cgroups removed, as libvirt does) with its pin still recorded:
    # its pCPU comes back from machine.slice and extpv.slice, nothing of it stays recorded.
    stopped = observed["b_stopped"]
    assert stopped["exclusive"] == dict.fromkeys(LV_ANCESTORS, "2"), stopped["exclusive"]
    assert stopped["extpv_slice_exclusive"] == "1,3"
    assert stopped["root_isolated"] == "2"
    saved = observed["b_stopped_saved"]
    assert not any("x2dother" in cgroup for kind in saved.values() for cgroup in kind), saved


def test_pin_that_would_leave_a_sibling_no_cpu_is_refused_unchanged(observed: dict) -> None:
    assert observed["refused"] is not None and "leave it no CPU" in observed["refused"]
    assert f"{LV_CGROUP}/vcpu0" in observed["refused"]
    assert observed["refusal_changed_nothing"] is True


def test_kill_9_mid_pin_converges_on_restart(observed: dict) -> None:
    crash = observed["crash"]
    assert crash["killed"] is True, crash
    assert f"{LV_CGROUP}/vcpu3" in crash["recorded"]["leaves"], crash["recorded"]
    after = crash["after"]
    assert after["vcpu3"]["partition"] == "member" and after["vcpu3"]["exclusive"] == ""
    assert after["vcpu2"]["partition"] == "isolated"
    assert after["exclusive"] == dict.fromkeys(LV_ANCESTORS, "2"), after["exclusive"]
    assert after["root_isolated"] == "2"


def test_undo_restores_exactly_what_libvirt_had(observed: dict) -> None:
    assert_as_libvirt_had(observed["before"], observed["after"])
    assert observed["after_saved"] == {"leaves": {}, "ancestors": {}, "siblings": {}}
