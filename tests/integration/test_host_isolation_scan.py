"""The cgroup v1 isolation read-back's memory of which tasks are kernel threads
(:class:`pvhost.placement.isolation.KernelThreads`), against this host's real cpusets and
tasks: it saves reading each task's flags again, and never answers for a task that is not the
one it read (tasks that exit, and a new task given the tid of one that exited)."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pvhost.placement import Cgroup1Backend, isolation
from pvhost.placement.isolation import KernelThreads, sharing_tasks
from pvhost.state import Cgroup1Pin
from tests.conftest import absent
from tests.cpusets import CPUSET, require_cpuset_v1, scratch_cpuset

pytestmark = pytest.mark.root

NS_LAST_PID = Path("/proc/sys/kernel/ns_last_pid")
#: The read of a task's flags the memory saves (before any test replaces it).
kernel_thread = isolation._kernel_thread


@pytest.fixture
def scratch(cpuset_group: str) -> Iterator[Path]:
    """A cpuset of ours (every CPU) holding only the tasks a test puts there."""
    require_cpuset_v1()
    with scratch_cpuset(cpuset_group) as path:
        yield path


def sleeper(cpuset: Path) -> subprocess.Popen[bytes]:
    child = subprocess.Popen(["sleep", "300"])
    (cpuset / "tasks").write_text(str(child.pid))
    return child


def stop(child: subprocess.Popen[bytes]) -> None:
    child.kill()
    child.wait(timeout=10)


def scan(cpuset: Path, memory: KernelThreads | None) -> dict[str, int]:
    cpus = frozenset(os.sched_getaffinity(0))
    return sharing_tasks(cpuset, CPUSET / "none", cpus, memory).sharing(min(cpus))


def test_user_tasks_are_read_once_and_scans_match_uncached_ones(scratch: Path) -> None:
    memory = KernelThreads()
    children = [sleeper(scratch) for _ in range(3)]
    try:
        assert scan(scratch, memory) == scan(scratch, None) == {"/": 3}
        first = memory.reads
        assert first == 3
        assert scan(scratch, memory) == {"/": 3}
        assert memory.reads == first  # answered from memory
        # Tasks come and go between scans: every scan still counts exactly what is there.
        stop(children.pop())
        assert scan(scratch, memory) == scan(scratch, None) == {"/": 2}
        children.append(sleeper(scratch))
        children.append(sleeper(scratch))
        assert scan(scratch, memory) == scan(scratch, None) == {"/": 4}
        assert memory.reads == first + 2  # only the two new tasks were read
    finally:
        for child in children:
            stop(child)
    assert scan(scratch, memory) == {"/": 0}


def test_a_new_task_with_an_old_tid_is_read_again(scratch: Path) -> None:
    """The tid of a task that exited, given to a new task: the memory does not answer for it
    (a kernel thread taking a user task's tid would otherwise be counted as sharing, and a
    user task taking a remembered tid must be read, whatever it is)."""
    if not NS_LAST_PID.exists():
        absent("needs /proc/sys/kernel/ns_last_pid to give a tid again")
    memory = KernelThreads()
    old = sleeper(scratch)
    tid = old.pid
    try:
        assert scan(scratch, memory) == {"/": 1}
        reads = memory.reads
        stop(old)
        # Ask the kernel for the same number again (other tasks of the host may take it
        # first: retry a few times).
        for _ in range(50):
            NS_LAST_PID.write_text(str(tid - 1))
            new = subprocess.Popen(["sleep", "300"])
            if new.pid == tid:
                break
            stop(new)
            time.sleep(0.01)
        else:
            pytest.fail(f"the kernel never gave tid {tid} again")
    except BaseException:
        stop(old)
        raise
    try:
        (scratch / "tasks").write_text(str(new.pid))
        assert scan(scratch, memory) == {"/": 1}
        assert memory.reads == reads + 1  # the new task was read, not taken for the old one
    finally:
        stop(new)


def test_the_backends_read_backs_do_not_make_each_other_read_tasks_again(
    scratch: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cgroup v1 backend reads back its own pins, libvirt's and its summary's pCPU, each
    scanning other pCPUs, so asking about other tasks: a task that may run on one pCPU only is
    asked about by some of them. Once they alternated over one memory, each scan forgot what
    the others had asked about, and such tasks were read again at every scan.

    The backend's hierarchy is the scratch cpuset: its scans see only the tasks made here.
    Its own pin is on record only (the read-back reads the record; extpv's cpuset, where the
    pinned thread would be, is not scanned)."""
    require_cpuset_v1({0, 1})
    reads: list[str] = []

    def counted(tid: str) -> bool:
        reads.append(tid)
        return kernel_thread(tid)

    monkeypatch.setattr(isolation, "_kernel_thread", counted)
    backend = Cgroup1Backend(scratch, tmp_path / "cgroup1.json", "extpv", mode="move")
    backend.setup(frozenset({0}))  # the summary's pCPU: 0
    children = [sleeper(scratch) for _ in range(4)]
    try:
        only0, only1, both, libvirt_vcpu = children
        for child, cpus in ((only0, {0}), (only1, {1}), (libvirt_vcpu, {1})):
            os.sched_setaffinity(child.pid, cpus)
        record = Cgroup1Pin(
            tid=both.pid, pcpu=0, prev_cpuset="/", prev_affinity=(0, 1), prev_effective=(0, 1)
        )
        backend.state.set_pin("vm", 0, record)
        libvirt_pins = {("lv", 0): (1, libvirt_vcpu.pid)}

        def read_backs() -> tuple[object, ...]:
            return (
                backend.achieved(),
                backend.threads_achieved(libvirt_pins),
                backend.isolation_summary(),
            )

        first = read_backs()
        own, libvirt, summary = first
        assert "2 other task(s)" in own["vm"][0].reason  # type: ignore[index]
        assert "2 other task(s)" in libvirt[("lv", 0)].reason  # type: ignore[index]
        assert "2 other task(s)" in str(summary)
        assert set(reads) == {str(c.pid) for c in (only0, only1, both)}
        reads.clear()
        for _ in range(3):
            assert read_backs() == first
        assert reads == [], "tasks read again though nothing changed"
    finally:
        for child in children:
            stop(child)
        backend.state.set_pin("vm", 0, None)
        (scratch / "extpv").rmdir()
