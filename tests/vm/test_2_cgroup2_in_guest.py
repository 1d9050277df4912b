"""(d) The cgroup v2 placement backend on a real cgroup v2 kernel: a guest acting as a host.

This machine's cpuset is cgroup v1 only, so the shared -smp 4 guest (Debian trixie, 6.12,
cpuset in the unified hierarchy, remote partitions) runs this checkout's backend (over 9p)
against its own /sys/fs/cgroup, with a nested QEMU providing real vCPU threads.
"""

from __future__ import annotations

import json

import pytest

from pvhost import launcher

pytestmark = [pytest.mark.vm, pytest.mark.slow]


@pytest.fixture(scope="module")
def observed(guest_vm: launcher.VirtualMachine) -> dict:
    r = guest_vm.guest(
        [
            "env",
            "PYTHONDONTWRITEBYTECODE=1",
            "python3",
            "/mnt/extpv/tests/vm/guest_cgroup2_probe.py",
        ],
        timeout_s=240,
    )
    assert r.returncode == 0, f"the in-guest probe failed:\n{r.stderr[-3000:]}"
    return json.loads(r.stdout)


def test_kernel_offers_remote_partitions(observed: dict) -> None:
    assert observed["errors"].get("setup") is None, observed["errors"]["setup"]
    assert observed["remote_partitions"] is True


def test_vcpu_threads_move_into_their_threaded_cgroups(observed: dict) -> None:
    assert observed["errors"].get("attach") is None, observed["errors"]["attach"]
    for vcpu, cgroup in observed["attached"]["thread_cgroups"].items():
        assert cgroup == f"/extpv.slice/vm-inner/vcpu{vcpu}"


def test_pin_makes_a_valid_isolated_partition(observed: dict) -> None:
    for name, pcpu in (("pin0", "1"), ("pin1", "2")):
        assert observed["errors"].get(name) is None, observed["errors"][name]
        view = observed[name]
        assert view["partition"] == "isolated", view
        assert view["allowed"] == pcpu, view
    # While pinned, pCPUs 1 and 2 leave the root's effective set: isolated from host load.
    assert observed["pin1"]["root_isolated"] == "1-2"
    assert observed["pin1"]["root_effective"] == "0,3"


def test_invalid_partition_is_reported_with_the_kernels_reason_and_undone(observed: dict) -> None:
    overlap = observed["overlap"]
    assert overlap["raised"] == "PartitionInvalid", overlap
    assert overlap["reason"], overlap
    after = observed["after_overlap"]
    assert after["1"]["partition"] == "isolated", "the valid pin of vCPU 1 must survive"
    assert after["1"]["allowed"] == "2"
    assert after["2"]["partition"] == "member", "the refused pin must be undone"
    assert after["2"]["allowed"] != "2"


def test_unpin_and_detach_undo_exactly(observed: dict) -> None:
    for name in ("unpin0", "unpin1", "detach", "teardown"):
        assert observed["errors"].get(name) is None, observed["errors"][name]
    for view in observed["unpinned"].values():
        assert view["partition"] == "member", view
    before, after = observed["before"], observed["after"]
    assert after == before, f"state differs after undo:\nbefore {before}\nafter  {after}"
