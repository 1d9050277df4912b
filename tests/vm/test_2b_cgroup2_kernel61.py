"""(d') and issue 9 (b): the cgroup v2 backend on Debian 12's own 6.1 kernel, local partitions.

The test image's root file system booting Debian 12's 6.1 kernel (vmlab.images.
ensure_test_image_kernel61: images/add-kernel) acts as a host, like test (d) on trixie's 6.12,
and runs the in-guest isolation probe (guest_isolation_probe.py) against its /sys/fs/cgroup.
6.1 has the ``isolated`` partition type but no ``cpuset.cpus.exclusive``: the backend must find
that out in its scratch cgroup (mode ``local``) and isolate through the chain of local
partitions (pvhost.placement.chain), proven with a ``yes`` load, its refusals and kill -9 at
every write of a pin and an unpin.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import vmlab
from tests.vm.isolation_run import (
    assert_crashes_restart_to_the_last_request,
    assert_daemon_isolates,
    assert_isolated_under_load,
    run_daemon_probe,
    run_isolation_probe,
)
from vmlab import ImageError, VMSpec, start
from vmlab.images import ensure_test_image_kernel61

pytestmark = [pytest.mark.vm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def vm61(runtime_dir: Path) -> Iterator[vmlab.VirtualMachine]:
    try:
        image = ensure_test_image_kernel61(REPO)
    except ImageError as err:
        pytest.fail(str(err), pytrace=False)
    spec = VMSpec(
        name="k61",
        image=image.path,
        smp=5,  # housekeeping CPU 0, two pins, the VM's extra CPU, the spare for growing
        memory_mib=1536,
        runtime_dir=runtime_dir,
        virtfs=((REPO, "extpv"),),
        test_hook=True,
    )
    t0 = time.monotonic()
    vm = start(spec, deadline_s=300, retries=2)
    try:
        print(f"\n[vm] booted {vm} (6.1) in {time.monotonic() - t0:.1f} s", file=sys.stderr)
        vm.mount_virtfs("extpv", "/mnt/extpv")
        yield vm
    finally:
        vm.stop()


@pytest.fixture(scope="module")
def chained(vm61: vmlab.VirtualMachine) -> dict[str, Any]:
    """One run of the in-guest isolation probe (guest_isolation_probe.py) for every test here:
    mode detection, isolation under a yes load, the chain's edge cases, kill -9 points."""
    kernel = vm61.guest(["uname", "-r"], timeout_s=30).stdout.strip()
    return {"kernel": kernel, **run_isolation_probe(vm61)}


def test_the_guest_runs_debian_12s_kernel(chained: dict) -> None:
    assert chained["kernel"].startswith("6.1."), chained["kernel"]


def test_the_backend_finds_local_partitions_only(chained: dict) -> None:
    assert chained["errors"].get("setup") is None, chained["errors"]["setup"]
    assert chained["mode"] == "local"
    assert chained["probe_left"] == [], "the scratch cgroup must be removed"


def test_describe_and_summary_say_what_a_pin_achieves(chained: dict) -> None:
    assert chained["summary"].startswith("isolated:"), chained["summary"]
    assert "chain of local partitions" in chained["summary"], chained["summary"]
    assert "extra CPU" in chained["summary"], chained["summary"]
    describe = chained["isolation"]["describe"]
    assert describe["partition_mode"] == "local"
    assert describe["local_chain"] == {
        "extpv.slice": {"cpus": "1-2", "partition": "root"},
        "vm-spin": {"cpus": "1-2", "partition": "root"},
    }, describe


# -- (b) the local-partition chain: isolation under a real load, its edge cases, kill -9 ------


@pytest.mark.isolation
def test_the_local_chain_isolates_the_pinned_pcpu_from_a_yes_load(chained: dict) -> None:
    assert chained["mode"] == "local"
    assert_isolated_under_load(chained)
    # The pCPU and the VM's extra CPU (where its other threads run) leave the host.
    assert chained["isolation"]["taken"] == [1, 2]
    # The spare CPU (4) used to enable the VM's partition went back to the host.
    view = chained["isolation"]["pinned_view"]
    assert view["slice"] == "1-2|root" and view["vm"] == "1-2|root", view
    assert view["vcpu0"] == "1|isolated", view
    assert view["emulator_allowed"] == "2" and view["allowed"]["1"] == "2", view
    unpinned = chained["isolation"]["unpinned_view"]
    assert unpinned["slice"] == "*|member" and unpinned["vm"] == "*|member", unpinned
    assert set(unpinned["allowed"].values()) == {"0-4"}, unpinned
    assert unpinned["emulator_allowed"] == "0-4", unpinned
    assert unpinned["root_effective"] == chained["before"]["root_effective"]


@pytest.mark.isolation
def test_a_pin_that_would_confine_another_vm_is_refused_and_changes_nothing(
    chained: dict,
) -> None:
    case = chained["chain"]
    assert chained["errors"].get("chain") is None, chained["errors"]["chain"]
    assert case["refused_for_other"] is not None, "the pin must be refused"
    assert "VM other holds no pin" in case["refused_for_other"], case["refused_for_other"]
    assert case["refused_unchanged"] is True


@pytest.mark.isolation
def test_two_pins_of_one_vm_share_one_extra_cpu_and_a_third_is_refused(chained: dict) -> None:
    case = chained["chain"]
    assert case["pin0"] is None and case["pin1"] is None, case
    s1 = case["s1"]
    assert s1["vcpu0"] == "1|isolated" and s1["vcpu1"] == "3|isolated", s1
    assert s1["vm"] == "1-3|root" and s1["slice"] == "1-3|root", s1
    assert s1["emulator_allowed"] == "2" and s1["root_effective"] == "0,4", s1
    assert case["verify_two"] == []
    # pCPU 4 would leave the host no spare CPU for growing the VM's partition, which the
    # kernel refuses: the backend refuses up front with the reason, writing nothing of the chain.
    assert case["pin2"] is not None, "the third pin must be refused"
    assert "no spare CPU for the local-partition chain's growth step" in case["pin2"], case
    assert "Parent unable to distribute cpu downstream" in case["pin2"], case["pin2"]
    chain_files = [w for w in case["pin2_writes"] if w.count("/") == 1 or "/vm-spin/cpuset" in w]
    assert chain_files == [], f"the refused pin wrote the chain: {case['pin2_writes']}"
    assert case["after_pin2"] == s1, "the refused pin must leave the others as they were"
    assert case["unpin1"] is None and case["back_to_s0"] is True


@pytest.mark.isolation
@pytest.mark.faults
def test_kill9_at_every_write_of_a_pin_and_an_unpin_restarts_to_the_last_valid_request(
    chained: dict,
) -> None:
    """The chain's first pin (built from nothing), a second pin, an unpin of one of two and
    its last unpin (dissolved): kill -9 before each of their writes."""
    assert chained["mode"] == "local"
    assert_crashes_restart_to_the_last_request(chained)


@pytest.mark.isolation
def test_the_chain_is_gone_after_the_last_unpin_and_teardown(chained: dict) -> None:
    for name in ("detach", "teardown"):
        assert chained["errors"].get(name) is None, chained["errors"][name]
    assert chained["chain"]["unpin0"] is None
    done = chained["chain"]["all_unpinned"]
    assert done["slice"] == "*|member" and done["vm"] == "*|member", done
    assert set(done["allowed"].values()) == {"0-4"}, done


@pytest.mark.isolation
def test_through_the_daemon_a_spinning_vcpu_gets_its_pcpu_to_itself(
    vm61: vmlab.VirtualMachine, chained: dict
) -> None:
    """After the backend-level run (``chained``: it must leave the guest clean), the same
    proof through ``pvhost run`` on the local chain."""
    obs = run_daemon_probe(vm61)
    assert_daemon_isolates(obs, "local")
    chain_cgroups = obs["local_chain"]
    assert chain_cgroups["extpv.slice"]["partition"] == "root", chain_cgroups
    assert chain_cgroups["vm-t"]["partition"] == "root", chain_cgroups
