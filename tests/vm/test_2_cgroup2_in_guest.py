"""(d) The cgroup v2 placement backend on a real cgroup v2 kernel: a guest acting as a host.

This machine's cpuset is cgroup v1 only, so the shared -smp 4 guest (Debian trixie, 6.12,
cpuset in the unified hierarchy, remote partitions) runs this checkout's backend (over 9p)
against its own /sys/fs/cgroup, with a nested QEMU providing real vCPU threads.
"""

from __future__ import annotations

import pytest

import vmlab
from tests.vm.probes import run_probe

pytestmark = [pytest.mark.vm, pytest.mark.slow]


@pytest.fixture(scope="module")
def observed(guest_vm: vmlab.VirtualMachine) -> dict:
    return run_probe(guest_vm, "guest_cgroup2_probe.py", timeout_s=240)


def test_kernel_offers_remote_partitions(observed: dict) -> None:
    assert observed["errors"].get("setup") is None, observed["errors"]["setup"]
    assert observed["remote_partitions"] is True
    # Chosen by what the kernel accepted in a scratch cgroup, which is gone again.
    assert observed["mode"] == "remote"
    assert observed["summary"].startswith("isolated:"), observed["summary"]
    assert observed["probe_left"] == [], observed["probe_left"]


def test_vcpu_threads_move_into_their_threaded_cgroups(observed: dict) -> None:
    assert observed["errors"].get("attach") is None, observed["errors"]["attach"]
    for vcpu, cgroup in observed["attached"]["thread_cgroups"].items():
        assert cgroup == f"/extpv.slice/vm-inner/vcpu{vcpu}"


def test_pin_makes_a_valid_isolated_partition(observed: dict) -> None:
    for vcpu in (0, 1, 2):
        assert observed["errors"].get(f"pin{vcpu}") is None, observed["errors"][f"pin{vcpu}"]
        view = observed[f"pin{vcpu}"]
        assert view["partition"] == "isolated", view
        assert view["allowed"] == str(vcpu + 1), view
    # While pinned, pCPUs 1-3 leave the root's effective set: isolated from other host load.
    assert observed["pin2"]["root_isolated"] == "1-3"
    assert observed["pin2"]["root_effective"] == "0"
    # And the backend says so, from the partitions it read back (pvctl status, the guest).
    described = observed["describe"]["vms"]["inner"]
    assert {v: described[v]["isolation"] for v in ("0", "1", "2")} == dict.fromkeys(
        ("0", "1", "2"), "isolated"
    ), described


def test_invalid_partition_is_reported_with_the_kernels_reason_and_undone(observed: dict) -> None:
    invalid = observed["invalid"]
    assert invalid["raised"] == "PartitionInvalid", invalid
    assert invalid["reason"], invalid
    after = observed["after_invalid"]
    for vcpu in (0, 1, 2):
        assert after[str(vcpu)]["partition"] == "isolated", f"valid pin of vCPU {vcpu} must survive"
        assert after[str(vcpu)]["allowed"] == str(vcpu + 1)
    assert after["3"]["partition"] == "member", "the refused pin must be undone"
    assert after["3"]["root_effective"] == "0", "the root keeps its last CPU"


def test_verify_reports_a_vcpu_thread_moved_out_of_its_partition(observed: dict) -> None:
    for name in ("verify_pinned", "verify_moved", "verify_back"):
        assert observed["errors"].get(name) is None, observed["errors"][name]
    assert observed["verify_pinned"] == []
    moved = observed["verify_moved"]
    assert {(f["vm"], f["vcpu"]) for f in moved} == {("inner", 2)}, moved
    checks = {f["check"]: f for f in moved}
    assert checks["cgroup"]["expected"] == "/extpv.slice/vm-inner/vcpu2"
    assert checks["cgroup"]["found"] == "/extpv.slice/vm-inner/emulator"
    assert checks["affinity"]["expected"] == "3", moved
    assert observed["verify_back"] == []


@pytest.mark.security
def test_a_crash_in_the_middle_of_unpin_keeps_the_record_and_restart_frees_the_pcpu(
    observed: dict,
) -> None:
    """D11: kill -9 after vCPU 2's partition is undone but before the VM's exclusive CPUs
    shrink. The record must still be on disk, so the restarted backend gives pCPU 3 back;
    before the fix it was cleared first and the VM held pCPU 3 exclusively for good."""
    crash = observed["crash"]
    assert crash["exit"] == 137, "the unpin never reached the VM's exclusive CPUs"
    assert crash["vm_exclusive"] == "1-3", "killed before the VM gave pCPU 3 back"
    assert crash["pins_after_restart"] == {"inner": {"0": 1, "1": 2, "2": 3}}, crash
    for name in ("setup_again", "reconcile"):
        assert observed["errors"].get(name) is None, observed["errors"][name]
    assert crash["adopted"] == {"inner": {"0": 1, "1": 2}}
    assert crash["pins_after_reconcile"] == {"inner": {"0": 1, "1": 2}}
    assert crash["vm_exclusive_after_reconcile"] == "1-2"
    assert crash["root_isolated"] == "1-2"


def test_unpin_and_detach_undo_exactly(observed: dict) -> None:
    for name in ("unpin0", "unpin1", "unpin2", "detach", "teardown"):
        assert observed["errors"].get(name) is None, observed["errors"][name]
    for view in observed["unpinned"].values():
        assert view["partition"] == "member", view
    before, after = observed["before"], observed["after"]
    assert after == before, f"state differs after undo:\nbefore {before}\nafter  {after}"
