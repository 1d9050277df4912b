"""(a) Isolation under a real load on trixie's 6.12 kernel (remote partitions).

The shared -smp 4 guest acts as a host: this checkout's cgroup v2 backend, driven as the
daemon drives it, pins a spinning thread (a vCPU thread's stand-in) while 16 ``yes`` processes
load its CPUs; the guest kernel's own accounting says who ran where
(guest_isolation_probe.py). The same run on Debian 12's 6.1 kernel (local-partition chain) is
in test_2b_cgroup2_kernel61.py, sharing that module's VM.
"""

from __future__ import annotations

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

pytestmark = [pytest.mark.vm, pytest.mark.slow, pytest.mark.isolation]


@pytest.fixture(scope="module")
def observed(guest_vm: vmlab.VirtualMachine) -> dict[str, Any]:
    return run_isolation_probe(guest_vm)


def test_remote_partitions_isolate_the_pinned_pcpu_from_a_yes_load(observed: dict) -> None:
    assert observed["mode"] == "remote"
    assert_isolated_under_load(observed)
    # Remote partitions take exactly the pinned pCPU from the host, nothing else.
    assert observed["isolation"]["taken"] == [1]


@pytest.mark.faults
def test_kill9_at_every_write_of_a_remote_pin_and_unpin_restarts_to_the_last_valid_request(
    observed: dict,
) -> None:
    """The first pin (the VM's exclusive CPUs from nothing), a second pin, an unpin of one of
    two and the last unpin: kill -9 before each of their writes."""
    assert observed["mode"] == "remote"
    assert_crashes_restart_to_the_last_request(observed)
    # The remote partition's writes are those of cgroup2.py: the exclusive CPUs are among them.
    assert any(c["write"].endswith("cpuset.cpus.exclusive") for c in observed["crashes"])


def test_through_the_daemon_a_spinning_vcpu_gets_its_pcpu_to_itself(
    guest_vm: vmlab.VirtualMachine,
) -> None:
    assert_daemon_isolates(run_daemon_probe(guest_vm), "remote")
