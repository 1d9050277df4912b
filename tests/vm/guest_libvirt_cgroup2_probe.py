"""Runs INSIDE the test guest (-smp 4, kernel 6.12, cgroup v2 with cpuset) acting as a libvirt host.

What is real and what stands in for libvirt: the cgroups, the kernel's partitions and a nested
``qemu-system-x86_64 -S`` with real vCPU threads are real, and the code under test is this
checkout's ``pvhost.placement.libvirt_cgroup2`` (the cgroup part of a libvirt pin), with the
real plain-QEMU cgroup v2 backend beside it (extpv.slice). libvirtd does not run here (too slow
under TCG); its part is played by this probe, doing exactly the cgroup and affinity writes
libvirt does (libvirt 11 on a systemd host, cgroup v2):

- the layout: ``machine.slice/machine-qemu\\x2d1\\x2dinner.scope/libvirt/`` with the QEMU
  process in it, its other threads in the threaded ``emulator`` cgroup and vCPU thread N in the
  threaded ``vcpuN`` (``cpuset.cpus`` left empty: a domain without ``<vcpu cpuset>`` gets only
  its affinity set to every host CPU);
- a live pin (``virsh vcpupin --live``, ``virDomainPinVcpuFlags``): ``cpuset.cpus`` of
  ``vcpuN`` written to the CPUs, then the thread's affinity (qemuDomainPinVcpuLive).

The libvirt API part (``virDomainPinVcpuFlags``, ``virsh vcpupin`` showing the pin) is tested
against a real libvirtd on this project's cgroup v1 host (tests/libvirt). Prints one JSON object
of observations; test_2d_libvirt_cgroup2_in_guest.py asserts on them.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, os.environ.get("EXTPV_SRC", "/mnt/extpv"))

from pvhost.errors import PartitionInvalid, PlacementError
from pvhost.placement import libvirt_cgroup2
from pvhost.placement.base import remove_cgroup
from pvhost.placement.cgroup2 import Cgroup2Backend, probe_mode
from pvhost.placement.libvirt_cgroup2 import LibvirtPartitions
from tests.faultpoints import KILLED, killed_before_write
from tests.vm.guest_cgroup2_probe import start_nested_qemu
from tests.vm.guesthost import (
    LV,
    ROOT,
    SLICE,
    enable_cpuset,
    leaf,
    libvirt_domain,
    libvirt_pin,
    read,
    rel,
    stepper,
    view,
)

SCOPE_B = SLICE / "machine-qemu\\x2d2\\x2dother.scope"
ALL = "0-3"


@contextlib.contextmanager
def second_domain() -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """Another domain, ``machine-qemu\\x2d2\\x2dother.scope``: one thread (a ``sleep``) in its
    ``libvirt/vcpu0``, laid out as libvirt does; its vcpu0 cgroup. Stopped after, if it was not."""
    proc = subprocess.Popen(["sleep", "600"])
    try:
        for path in (SCOPE_B, SCOPE_B / "libvirt"):
            path.mkdir()
            enable_cpuset(path)
        vcpu0 = SCOPE_B / "libvirt" / "vcpu0"
        vcpu0.mkdir()
        (vcpu0 / "cgroup.type").write_text("threaded")
        (SCOPE_B / "libvirt" / "cgroup.procs").write_text(str(proc.pid))
        (vcpu0 / "cgroup.threads").write_text(str(proc.pid))
        yield proc, rel(vcpu0)
    finally:
        stop_second_domain(proc)


def stop_second_domain(proc: subprocess.Popen[bytes]) -> None:
    """What libvirt (and systemd) do when a domain stops: QEMU gone, its cgroups removed."""
    proc.kill()
    proc.wait(timeout=30)
    for path in (SCOPE_B / "libvirt" / "vcpu0", SCOPE_B / "libvirt", SCOPE_B):
        if path.is_dir():
            remove_cgroup(path)


def main() -> None:
    obs: dict[str, Any] = {"errors": {}}
    step = stepper(obs)
    try:
        with libvirt_domain(obs, start_nested_qemu) as tids, tempfile.TemporaryDirectory() as tmp:
            obs["before"] = view(tids)
            mode = probe_mode(ROOT)
            obs["mode"] = mode
            # The plain-QEMU backend beside it, as in pvhost: extpv.slice holds every pool CPU
            # exclusively until libvirt's partitions need some.
            backend = Cgroup2Backend(ROOT, Path(tmp) / "cgroup2.json")
            step("backend_setup", lambda: backend.setup(frozenset({1, 2, 3})))
            state = Path(tmp) / "libvirt-cgroup2.json"
            parts = LibvirtPartitions(ROOT, state, mode)
            parts.lend = backend.lend_exclusive
            target: dict[str, int] = {}

            # 1. vCPU 1 → pCPU 1: libvirt pins, then the partition in place.
            libvirt_pin(1, tids[1], "1")
            target[leaf(1)] = 1
            step("pin1", lambda: parts.sync(target))
            obs["pin1"] = view(tids)
            obs["pin1_isolation"] = parts.isolation(leaf(1)).mode
            obs["pin1_check"] = parts.check(leaf(1), 1)
            # 2. vCPU 2 → pCPU 2.
            libvirt_pin(2, tids[2], "2")
            target[leaf(2)] = 2
            step("pin2", lambda: parts.sync(target))
            obs["pin2"] = view(tids)
            # 3. Unpin vCPU 1 as LibvirtPlacement does: partition undone, libvirt puts back
            #    its pinning from before (every CPU, written explicitly), sync again.
            del target[leaf(1)]
            step("unpin1_partition", lambda: parts.sync(target))
            step("unpin1_libvirt", lambda: libvirt_pin(1, tids[1], ALL))
            obs["unpin1_libvirt_wrote"] = view(tids)
            step("unpin1_again", lambda: parts.sync(target))
            obs["unpin1"] = view(tids)
            obs["unpin1_saved"] = parts.saved()
            obs["pin2_isolation_after_unpin1"] = parts.isolation(leaf(2)).mode
            # 3b. A second domain's pin: machine.slice holds both, each scope its own; then
            #     that domain stops (its cgroups gone with it) before its pin is undone.
            with second_domain() as (other, leaf_b):
                obs["domain_b_leaf"] = leaf_b
                (ROOT / leaf_b.lstrip("/") / "cpuset.cpus").write_text("3")  # libvirt's pin
                os.sched_setaffinity(other.pid, {3})
                step("pin_b", lambda: parts.sync({**target, leaf_b: 3}))
                obs["pin_b"] = view(tids)
                obs["pin_b"]["scope_b_exclusive"] = read(SCOPE_B / "cpuset.cpus.exclusive")
                b_partition = ROOT / leaf_b.lstrip("/") / "cpuset.cpus.partition"
                obs["pin_b"]["b_partition"] = read(b_partition)
                stop_second_domain(other)
            step("b_stopped", lambda: parts.sync({**target, leaf_b: 3}))
            obs["b_stopped"] = view(tids)
            obs["b_stopped_saved"] = parts.saved()
            # 4. A sibling libvirt confined to the CPU asked for (vCPU 0 pinned live to 3):
            #    refused before any write, with the reason.
            libvirt_pin(0, tids[0], "3")
            libvirt_pin(3, tids[3], "3")
            before_refusal = view(tids)
            try:
                parts.sync({**target, leaf(3): 3})
                obs["refused"] = None
            except PlacementError as err:
                obs["refused"] = str(err)
            obs["refusal_changed_nothing"] = view(tids) == before_refusal
            step("refusal_libvirt3", lambda: libvirt_pin(3, tids[3], ALL))
            step("refusal_libvirt0", lambda: libvirt_pin(0, tids[0], ALL))
            step("after_refusal", lambda: parts.sync(target))
            # 5. kill -9 in the middle of a pin (before the partition is written), then a new
            #    pvhost (a new LibvirtPartitions on the same record) with the pin undone.
            libvirt_pin(3, tids[3], "3")
            exit_code = killed_before_write(
                libvirt_cgroup2,
                LV / "vcpu3" / "cpuset.cpus.partition",
                lambda: parts.sync({**target, leaf(3): 3}),
            )
            crash: dict[str, Any] = {"exit": exit_code, "killed": exit_code == KILLED}
            crash["left"] = view(tids)
            parts = LibvirtPartitions(ROOT, state, mode)
            parts.lend = backend.lend_exclusive
            crash["recorded"] = parts.saved()
            # libvirt's undo of the pin the crash interrupted
            step("crash_libvirt", lambda: libvirt_pin(3, tids[3], ALL))
            step("crash_sync", lambda: parts.sync(target))
            crash["after"] = view(tids)
            obs["crash"] = crash
            # 6. Everything undone: exactly what libvirt had (its own writes aside).
            step("unpin_all", lambda: parts.sync({}))
            step("unpin2_libvirt", lambda: libvirt_pin(2, tids[2], ALL))
            obs["after"] = view(tids)
            obs["after_saved"] = parts.saved()
            obs["invalid_error"] = None
            step("backend_teardown", backend.teardown)
    except PartitionInvalid as err:
        obs["invalid_error"] = f"{err} ({err.reason})"
    print(json.dumps(obs))


if __name__ == "__main__":
    main()
