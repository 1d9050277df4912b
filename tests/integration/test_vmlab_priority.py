"""``pvctl vm start --nice N``: every QEMU thread at the VM manager's priority, also those QEMU
creates later (a hot-plugged vCPU), and the value recorded where ``pvctl vm list`` reads it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from extpv.autogroup import autogroup_nice
from vmlab import VMSpec, list_vms, start
from vmlab.priority import thread_nices

pytestmark = [pytest.mark.root, pytest.mark.vm]

NICE = -3


def test_every_qemu_thread_runs_at_the_asked_nice_also_a_hot_plugged_vcpu(tmp_path: Path) -> None:
    runtime = tmp_path / "vms"
    vm = start(VMSpec(name="nice", image=None, smp=1, maxcpus=2, runtime_dir=runtime, nice=NICE))
    try:
        before = thread_nices(vm.pid)
        assert len(before) >= 2, "QEMU runs a main loop and a vCPU thread at least"
        assert set(before.values()) == {NICE}, before
        tid = vm.hot_plug_vcpu().tid
        assert tid not in before, "the hot-plugged vCPU is a new thread"
        after = thread_nices(vm.pid)
        assert after[tid] == NICE, after
        assert set(after.values()) == {NICE}, after
        # Where autogroup is on (CI's hosts), QEMU's session group weighs it against other
        # sessions' load, so it gets the value too; its threads' values alone change nothing.
        autogroup_on = Path("/proc/sys/kernel/sched_autogroup_enabled").read_text().strip() == "1"
        assert autogroup_nice(vm.pid) == (NICE if autogroup_on else None)
        (listed,) = list_vms(runtime)
        assert listed["nice"] == NICE
    finally:
        vm.stop()


def test_without_nice_qemu_keeps_the_launchers_priority(tmp_path: Path) -> None:
    vm = start(VMSpec(name="plain", image=None, smp=1, runtime_dir=tmp_path / "vms"))
    try:
        ours = os.getpriority(os.PRIO_PROCESS, 0)
        assert set(thread_nices(vm.pid).values()) == {ours}
        assert autogroup_nice(vm.pid) in (0, None), "a session group of its own, untouched"
        (listed,) = list_vms(tmp_path / "vms")
        assert listed["nice"] is None
    finally:
        vm.stop()
