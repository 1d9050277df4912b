"""Runs INSIDE the test guest (-smp 4, kernel 6.12, cgroup v2 with cpuset) acting as a host.

Drives this checkout's ``pvhost.placement`` cgroup v2 backend against the guest's real
``/sys/fs/cgroup``, with a nested ``qemu-system-x86_64 -S`` whose vCPU threads are real QEMU
vCPU threads (they run no guest code). Prints one JSON object of observations; the host-side
test (test_2_cgroup2_in_guest.py) asserts on them, so a failure shows everything that was seen.
Every step is recorded even if an earlier one failed, and cleanup always runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, os.environ.get("EXTPV_SRC", "/mnt/extpv"))

from pvhost.errors import PartitionInvalid
from pvhost.placement import cgroup2
from pvhost.placement.cgroup2 import Cgroup2Backend
from tests.faultpoints import killed_before_write
from tests.vm.guesthost import ROOT, allowed, cgroup_of, read, stepper

VM = "inner"


def start_nested_qemu() -> tuple[subprocess.Popen[bytes], dict[int, int]]:
    proc = subprocess.Popen(
        [
            "qemu-system-x86_64",
            "-S",
            "-accel",
            "tcg",
            "-smp",
            "4",
            "-m",
            "64",
            "-nodefaults",
            "-display",
            "none",
            "-name",
            f"{VM},debug-threads=on",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    end = time.monotonic() + 60
    while time.monotonic() < end:
        tids = {}
        for task in Path(f"/proc/{proc.pid}/task").glob("*"):
            comm = read(task / "comm") or ""
            if comm.startswith("CPU ") and comm.endswith("/TCG"):
                tids[int(comm.split()[1].split("/")[0])] = int(task.name)
        if len(tids) == 4:
            return proc, tids
        if proc.poll() is not None:
            err = proc.stderr.read().decode() if proc.stderr else ""
            raise RuntimeError(f"nested QEMU exited: {err}")
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError("nested QEMU showed no 4 vCPU threads within 60 s")


def snapshot(pid: int, tids: dict[int, int]) -> dict[str, Any]:
    return {
        "root_effective": read(ROOT / "cpuset.cpus.effective"),
        "root_isolated": read(ROOT / "cpuset.cpus.isolated"),
        "root_children": sorted(p.name for p in ROOT.iterdir() if p.is_dir()),
        "qemu_cgroup": cgroup_of(pid),
        "allowed": {str(v): allowed(t) for v, t in tids.items()},
        "thread_cgroups": {str(v): cgroup_of(t) for v, t in tids.items()},
    }


def vcpu_view(backend: Cgroup2Backend, vcpu: int, tid: int) -> dict[str, Any]:
    d = backend.base / f"vm-{VM}" / f"vcpu{vcpu}"
    return {
        "partition": read(d / "cpuset.cpus.partition"),
        "cpus": read(d / "cpuset.cpus"),
        "allowed": allowed(tid),
        "cgroup": cgroup_of(tid),
        "root_isolated": read(ROOT / "cpuset.cpus.isolated"),
        "root_effective": read(ROOT / "cpuset.cpus.effective"),
    }


def verify(b: Cgroup2Backend) -> list[dict[str, Any]]:
    return [f.model_dump() for f in b.verify()]


def crash_in_unpin(b: Cgroup2Backend, vcpu: int) -> int:
    """A daemon killed in ``unpin`` just before it writes the VM's exclusive CPUs; its exit
    code (KILLED when it got that far)."""
    vm_exclusive = b.base / f"vm-{VM}" / "cpuset.cpus.exclusive"
    return killed_before_write(cgroup2, vm_exclusive, lambda: b.unpin(VM, vcpu))


def main() -> None:
    obs: dict[str, Any] = {"errors": {}}

    step = stepper(obs)

    proc, tids = start_nested_qemu()
    obs["tids"] = {str(k): v for k, v in tids.items()}
    try:
        obs["before"] = snapshot(proc.pid, tids)
        with tempfile.TemporaryDirectory() as tmp:
            b = Cgroup2Backend(ROOT, Path(tmp) / "state.json")
            step("setup", lambda: b.setup(frozenset({0, 1, 2, 3})))
            obs["remote_partitions"] = b.remote
            obs["mode"] = b.mode
            obs["summary"] = b.isolation_summary()
            obs["probe_left"] = sorted(p.name for p in b.base.iterdir() if p.is_dir())
            step("attach", lambda: b.attach(VM, proc.pid, tids))
            obs["attached"] = snapshot(proc.pid, tids)
            for vcpu in (0, 1, 2):
                step(f"pin{vcpu}", lambda v=vcpu: b.pin(VM, v, tids[v], v + 1))
                obs[f"pin{vcpu}"] = vcpu_view(b, vcpu, tids[vcpu])
            # vCPU 3 onto pCPU 0, the root's last CPU: the kernel accepts the writes but leaves
            # the partition invalid (the root cannot be left without CPUs). The backend must
            # report the kernel's reason and undo only this pin.
            try:
                b.pin(VM, 3, tids[3], 0)
                obs["invalid"] = {"raised": None}
            except PartitionInvalid as err:
                obs["invalid"] = {
                    "raised": "PartitionInvalid",
                    "reason": err.reason,
                    "message": str(err),
                }
            except Exception as err:
                obs["invalid"] = {"raised": type(err).__name__, "message": str(err)}
            obs["after_invalid"] = {str(v): vcpu_view(b, v, tids[v]) for v in range(4)}
            obs["describe"] = step("describe", b.describe)
            # pvctl verify: all hold; vCPU 2's thread moved out behind the backend's back is
            # reported; moved back, all hold again.
            vm_dir = b.base / f"vm-{VM}"
            obs["verify_pinned"] = step("verify_pinned", lambda: verify(b))
            (vm_dir / "emulator" / "cgroup.threads").write_text(str(tids[2]))
            obs["verify_moved"] = step("verify_moved", lambda: verify(b))
            (vm_dir / "vcpu2" / "cgroup.threads").write_text(str(tids[2]))
            obs["verify_back"] = step("verify_back", lambda: verify(b))
            # D11: killed between the vCPU's undo and the VM's exclusive CPUs, the record must
            # survive, so that the next start (a new backend on the same file) frees pCPU 3.
            crash: dict[str, Any] = {"exit": crash_in_unpin(b, 2)}
            crash["vm_exclusive"] = read(vm_dir / "cpuset.cpus.exclusive")
            b = Cgroup2Backend(ROOT, Path(tmp) / "state.json")
            crash["pins_after_restart"] = b.pins()
            step("setup_again", lambda: b.setup(frozenset({0, 1, 2, 3})))
            crash["adopted"] = step("reconcile", lambda: b.reconcile({VM: tids}))
            crash["pins_after_reconcile"] = b.pins()
            crash["vm_exclusive_after_reconcile"] = read(vm_dir / "cpuset.cpus.exclusive")
            crash["root_isolated"] = read(ROOT / "cpuset.cpus.isolated")
            obs["crash"] = crash
            for vcpu in (0, 1, 2):
                step(f"unpin{vcpu}", lambda v=vcpu: b.unpin(VM, v))
            obs["unpinned"] = {str(v): vcpu_view(b, v, tids[v]) for v in range(4)}
            step("detach", lambda: b.detach(VM))
            step("teardown", b.teardown)
        obs["after"] = snapshot(proc.pid, tids)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    print(json.dumps(obs))


if __name__ == "__main__":
    main()
