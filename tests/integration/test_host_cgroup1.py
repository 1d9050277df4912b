"""cgroup v1 backend against this host's real cpuset hierarchy: undo leaves a thread as if it
had never been pinned, including its own affinity choice and later cpuset changes; a lost state
file or a crash in the middle of an undo leaves nothing behind after the next start.

Move mode (``[placement] cgroup1_mode = "move"``, the opt-out): each pin moves the thread in
and each unpin moves it back. Resident mode, the default: test_host_cgroup1_resident.py."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from pvhost.placement import (
    Cgroup1Backend,
    PlacementBackend,
    cgroup1,
    detect_backend,
    thread_allowed_cpus,
)
from tests.cpusets import CPUSET, require_cpuset_v1, scratch_cpuset
from tests.faultpoints import KILLED, killed_before_write

pytestmark = pytest.mark.root


@pytest.fixture
def threads(process: tuple[int, list[int]]) -> list[int]:
    """Three threads of a process of ours."""
    return process[1]


@pytest.fixture
def outer(cpuset_group: str) -> Iterator[Path]:
    """A cpuset of ours next to extpv's (CPUs 0-1), standing in for where QEMU runs."""
    require_cpuset_v1({0, 1})
    with scratch_cpuset(f"{cpuset_group}-outer", "0-1") as path:
        yield path


def backend_in(state_dir: Path, group: str) -> PlacementBackend:
    """What pvhost does at start: choose the backend (it reads its state file), set it up."""
    backend = detect_backend(
        Path("/sys/fs/cgroup"), state_dir, "cgroup1", group, cgroup1_mode="move"
    )
    backend.setup(frozenset({0, 1}))
    return backend


def cpuset_of(tid: int) -> str:
    return Path(f"/proc/{tid}/cpuset").read_text().strip()


def move_process(pid: int, cpuset: Path) -> None:
    for task in Path(f"/proc/{pid}/task").iterdir():
        (cpuset / "tasks").write_text(task.name)


def test_unpinned_thread_follows_its_cpuset_and_keeps_its_own_mask(
    tmp_path: Path, cpuset_group: str, threads: list[int]
) -> None:
    """Threads in a cpuset of their own ("outer", CPU 0): one left to its cpuset, one that
    chose CPU 1 itself, one never pinned (the control). After pin + unpin, widening "outer"
    to 0-1 must widen the first like the control and give the second its own CPU 1 back.
    Regression: unpin passed the affinity of the moment to sched_setaffinity, which the kernel
    (≥ 6.2) keeps as the thread's own mask, so neither followed the cpuset any more."""
    require_cpuset_v1({0, 1})
    plain, chooser, control = threads
    os.sched_setaffinity(chooser, {1})
    with scratch_cpuset(f"{cpuset_group}-outer", "0") as outer:
        for tid in threads:
            (outer / "tasks").write_text(str(tid))
        assert {t: thread_allowed_cpus(t) for t in threads} == {t: {0} for t in threads}

        backend = Cgroup1Backend(CPUSET, tmp_path / "cgroup1.json", cpuset_group, mode="move")
        backend.setup(frozenset({1}))
        backend.pin("vm", 0, plain, 1)
        assert thread_allowed_cpus(plain) == {1}
        backend.unpin("vm", 0)
        backend.pin("vm", 1, chooser, 1)
        assert thread_allowed_cpus(chooser) == {1}
        backend.unpin("vm", 1)
        assert {t: thread_allowed_cpus(t) for t in threads} == {t: {0} for t in threads}
        assert all(str(t) in (outer / "tasks").read_text().split() for t in threads)
        backend.detach("vm")
        backend.teardown()

        (outer / "cpuset.cpus").write_text("0-1")
        assert thread_allowed_cpus(control) == {0, 1}
        assert thread_allowed_cpus(plain) == {0, 1}, "the unpinned thread follows its cpuset"
        assert thread_allowed_cpus(chooser) == {1}, "and one that chose CPU 1 has it back"


def test_unreadable_state_file_is_kept_aside_and_cgroups_reconciled(
    tmp_path: Path,
    cpuset_group: str,
    outer: Path,
    process: tuple[int, list[int]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A pin, then pvhost dies and its state file turns to garbage: the next start must say so,
    keep the file, and still give the vCPU thread back to its process's cpuset (the undo record
    is gone: cgroupfs is the only witness). Regression: the file was dropped without a word and
    the thread left in the root cpuset."""
    pid, (tid, *_) = process
    move_process(pid, outer)
    before = (cpuset_of(tid), thread_allowed_cpus(tid))
    state_dir = tmp_path / "state"
    first = backend_in(state_dir, cpuset_group)
    first.pin("vm", 0, tid, 1)
    vm_dir = CPUSET / cpuset_group / "vm-vm"
    assert (cpuset_of(tid), thread_allowed_cpus(tid)) == (f"/{cpuset_group}/vm-vm/vcpu0", {1})

    garbage = b'{"vms": {"vm": {"vcpus": {"0": {"tid": 12'  # cut short
    (state_dir / "cgroup1.json").write_bytes(garbage)
    with caplog.at_level(logging.WARNING):
        second = backend_in(state_dir, cpuset_group)
        adopted = second.reconcile({"vm": {0: tid}})

    assert adopted == {}
    assert (cpuset_of(tid), thread_allowed_cpus(tid)) == before, "handed back to its cpuset"
    assert not vm_dir.exists()
    kept = list(state_dir.glob("cgroup1.json.unreadable-*"))
    assert len(kept) == 1 and kept[0].read_bytes() == garbage, "kept aside, untouched"
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any(str(state_dir / "cgroup1.json") in m and str(kept[0]) in m for m in errors), errors
    assert second.pins() == {}
    second.teardown()
    assert not (CPUSET / cpuset_group).exists()


@pytest.mark.security
def test_crash_in_the_middle_of_an_undo_keeps_the_record_until_it_is_done(
    tmp_path: Path, cpuset_group: str, outer: Path, process: tuple[int, list[int]]
) -> None:
    """kill -9 after a vCPU's cpuset is gone but before the VM's cpuset gave its pCPU back:
    the record must still be saved, so the next start shrinks the VM's cpuset. Regression
    (D11): the record was cleared first, and the VM's cpuset held the pCPU from then on."""
    pid, (tid0, tid1, _) = process
    move_process(pid, outer)
    state_dir = tmp_path / "state"
    backend = backend_in(state_dir, cpuset_group)
    backend.pin("vm", 0, tid0, 1)
    backend.pin("vm", 1, tid1, 0)
    vm_cpus = CPUSET / cpuset_group / "vm-vm" / "cpuset.cpus"
    assert vm_cpus.read_text().strip() == "0-1"

    # The daemon, killed at the VM-level write of its unpin.
    code = killed_before_write(cgroup1, vm_cpus, lambda: backend.unpin("vm", 1))
    assert code == KILLED, "the unpin never reached the VM's cpuset"
    assert cpuset_of(tid1) == "/" + outer.name, "the thread was already handed back"

    restarted = backend_in(state_dir, cpuset_group)
    assert restarted.pins() == {"vm": {0: 1, 1: 0}}, "the record outlives the crash"
    adopted = restarted.reconcile({"vm": {0: tid0, 1: tid1}})
    assert adopted == {"vm": {0: 1}}
    assert vm_cpus.read_text().strip() == "1", "pCPU 0 is no longer held by the VM"
    assert restarted.pins() == {"vm": {0: 1}}
    restarted.detach("vm")
    restarted.teardown()
    assert not (CPUSET / cpuset_group).exists()
