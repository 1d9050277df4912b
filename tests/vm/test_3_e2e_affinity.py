"""(a)-(c) End to end: a guest thread's pin becomes a host placement, and goes away again.

Real parts only: the test image's pvagent (started by udev in the guest), this checkout's
pvhost daemon on this host (cgroup v1 cpusets here), QEMU with its virtio-serial channel and
QMP. The guest runs the paper's SPSC workload (``spscq``), whose two threads pin themselves to
vCPU 0 and vCPU 1; identity policy: vCPU i → pCPU i. The tests run in file order on one VM; the
last one shuts it down.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

import pytest

import vmlab
from vmlab.daemon import PvhostDaemon

pytestmark = [pytest.mark.vm, pytest.mark.root, pytest.mark.slow]

CPUSET = Path("/sys/fs/cgroup/cpuset")
VM = "e2e"


def allowed(tid: int) -> str:
    for line in Path(f"/proc/{tid}/status").read_text().splitlines():
        if line.startswith("Cpus_allowed_list:"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"no Cpus_allowed_list for thread {tid}")


def vcpu_tids(vm: vmlab.VirtualMachine) -> dict[int, int]:
    """vCPU index → host tid, as QEMU reports it on the lab's own monitor."""
    return {index: thread.tid for index, thread in vm.vcpu_threads().items()}


def placements(status: dict[str, Any]) -> dict[int, int]:
    vm = status["vms"][VM]
    return {int(v): int(p["pcpu"]) for v, p in vm["placements"].items()}


def pinned_01(status: dict[str, Any]) -> bool:
    return status["vms"][VM]["wanted"][:2] == [0, 1] and placements(status) == {0: 0, 1: 1}


def released(status: dict[str, Any]) -> bool:
    return status["vms"][VM]["wanted"] == [] and placements(status) == {}


def journal(vm: vmlab.VirtualMachine, unit: str = "pvagent.service") -> str:
    return vm.guest(["journalctl", "-b", "-u", unit, "-o", "cat", "--no-pager"]).stdout


def test_a_agent_starts_from_udev_and_loads_the_signed_program(
    guest_vm: vmlab.VirtualMachine, pvhost_daemon: PvhostDaemon
) -> None:
    # Not enabled anywhere: only udev's SYSTEMD_WANTS on the port can have started it.
    enabled = guest_vm.guest(["systemctl", "is-enabled", "pvagent.service"]).stdout.strip()
    assert enabled != "enabled"
    st = pvhost_daemon.wait_status(
        "Hello and the affinity program acked by the guest",
        lambda s: s["vms"][VM]["programs"] == {"affinity": "loaded"},
        deadline_s=180,
    )
    assert st["vms"][VM]["guest"], "the guest's Hello (software version) is recorded"
    active = guest_vm.guest(["systemctl", "is-active", "pvagent.service"]).stdout.strip()
    assert active == "active", journal(guest_vm)
    assert "host said hello" in journal(guest_vm)


def test_b_guest_pins_place_the_vcpu_threads(
    guest_vm: vmlab.VirtualMachine, pvhost_daemon: PvhostDaemon
) -> None:
    tids = vcpu_tids(guest_vm)
    before = {v: allowed(tids[v]) for v in (0, 1)}
    guest_vm.guest_background(["spscq", "--duration", "20", "--json"], "/tmp/spscq-b.log")
    # A third thread asks for vCPU 3: this 2-CPU host has no pCPU 3, so identity refuses it,
    # and the refusal must reach the guest.
    guest_vm.guest_background(["taskset", "-c", "3", "sleep", "20"])
    st = pvhost_daemon.wait_status("vCPU 0 → pCPU 0 and vCPU 1 → pCPU 1", pinned_01, 120)
    vm = st["vms"][VM]
    assert (allowed(tids[0]), allowed(tids[1])) == ("0", "1")
    for v in (0, 1):
        cg = CPUSET / pvhost_daemon.group / f"vm-{VM}" / f"vcpu{v}"
        assert vm["placements"][str(v)]["cgroup"] == str(cg)
        assert str(tids[v]) in (cg / "tasks").read_text().split()
        assert (cg / "cpuset.cpus").read_text().strip() == str(v)
        assert vm["vcpus"][str(v)]["tid"] == tids[v]
    # The guest got the answer: its agent publishes the placement document, refusal included.
    end = time.monotonic() + 60
    while True:
        text = guest_vm.guest(["cat", "/run/pvagent/placement.json"]).stdout
        got = {p["vcpu"]: p for p in json.loads(text)["placements"]} if text.strip() else {}
        if {0, 1, 3} <= set(got):
            break
        assert time.monotonic() < end, f"no placement of vCPUs 0, 1, 3 in the guest:\n{text}"
        time.sleep(0.5)
    assert (got[0]["pcpu"], got[1]["pcpu"], got[3]["pcpu"]) == (0, 1, None)
    assert got[3]["refused"], got[3]
    # And what each pin achieved (protocol 4): on this cgroup v1 host, restricted and why.
    for v in (0, 1):
        assert got[v]["isolation"] == "restricted" and got[v]["isolation_reason"], got[v]
    assert got[3]["isolation"] is None, got[3]
    assert "published /run/pvagent/placement.json" in journal(guest_vm)
    # (c) Thread exit releases both: spscq's threads end after 20 s.
    pvhost_daemon.wait_status("release after the workload's threads exited", released, 120)
    assert {v: allowed(tids[v]) for v in (0, 1)} == before


def test_c_pvhost_killed_mid_run_converges_to_the_same_placement(
    guest_vm: vmlab.VirtualMachine, pvhost_daemon: PvhostDaemon
) -> None:
    tids = vcpu_tids(guest_vm)
    before = {v: allowed(tids[v]) for v in (0, 1)}
    gpid = guest_vm.guest_background(["spscq", "--duration", "600"], "/tmp/spscq-c.log")
    pvhost_daemon.wait_status("vCPUs 0 and 1 placed", pinned_01, 120)
    pvhost_daemon.kill(signal.SIGKILL)
    # Placement is kernel state: it holds while the daemon is gone.
    assert (allowed(tids[0]), allowed(tids[1])) == ("0", "1")
    pvhost_daemon.start()
    pvhost_daemon.wait_status("the same placement after restart", pinned_01, 120)
    assert (allowed(tids[0]), allowed(tids[1])) == ("0", "1")
    guest_vm.guest(f"kill {gpid}").check()  # the shell's kill: no procps in the image
    pvhost_daemon.wait_status("release after the workload was killed", released, 120)
    assert {v: allowed(tids[v]) for v in (0, 1)} == before


def test_c_vm_shutdown_leaves_no_cgroup_behind(
    guest_vm: vmlab.VirtualMachine, pvhost_daemon: PvhostDaemon
) -> None:
    guest_vm.guest_background(["spscq", "--duration", "600"], "/tmp/spscq-d.log")
    pvhost_daemon.wait_status("vCPUs 0 and 1 placed before shutdown", pinned_01, 120)
    vm_cgroup = CPUSET / pvhost_daemon.group / f"vm-{VM}"
    assert vm_cgroup.is_dir()
    guest_vm.guest_background(["systemctl", "poweroff"])
    guest_vm.wait_exit(120)
    pvhost_daemon.wait_status(
        "the VM's removal after QEMU exited",
        lambda s: VM not in s["vms"] or placements(s) == {},
        deadline_s=60,
    )
    end = time.monotonic() + 30
    while vm_cgroup.exists():
        assert time.monotonic() < end, f"{vm_cgroup} still exists 30 s after the VM ended"
        time.sleep(0.2)


def test_c_pvhost_exit_removes_its_own_cgroup(pvhost_daemon: PvhostDaemon) -> None:
    base = CPUSET / pvhost_daemon.group
    assert base.is_dir(), "pvhost made its cgroup at start"
    pvhost_daemon.kill(signal.SIGTERM)
    try:
        assert not base.exists(), f"pvhost left {base} behind at exit (SIGTERM)"
    finally:
        pvhost_daemon.start()  # the daemon is the session's: later modules use it too
