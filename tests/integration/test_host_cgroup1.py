"""cgroup v1 backend against this host's real cpuset hierarchy: undo leaves a thread as if it
had never been pinned, including its own affinity choice and later cpuset changes."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pvhost.placement import Cgroup1Backend, thread_allowed_cpus
from pvhost.state import StateStore
from tests.conftest import absent

pytestmark = pytest.mark.root

CPUSET = Path("/sys/fs/cgroup/cpuset")

_CHILD = """
import threading, sys
ready = []
stop = threading.Event()
def work():
    ready.append(threading.get_native_id())
    stop.wait()
threads = [threading.Thread(target=work) for _ in range(3)]
for t in threads: t.start()
while len(ready) < 3: pass
print(" ".join(map(str, sorted(ready))), flush=True)
sys.stdin.read()
stop.set()
"""


@pytest.fixture
def threads() -> Iterator[list[int]]:
    """Three threads of a process of ours."""
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None
    try:
        yield [int(t) for t in child.stdout.readline().split()]
    finally:
        child.kill()
        child.wait(timeout=10)


def test_unpinned_thread_follows_its_cpuset_and_keeps_its_own_mask(
    tmp_path: Path, cpuset_group: str, threads: list[int]
) -> None:
    """Threads in a cpuset of their own ("outer", CPU 0): one left to its cpuset, one that
    chose CPU 1 itself, one never pinned (the control). After pin + unpin, widening "outer"
    to 0-1 must widen the first like the control and give the second its own CPU 1 back.
    Regression: unpin passed the affinity of the moment to sched_setaffinity, which the kernel
    (≥ 6.2) keeps as the thread's own mask, so neither followed the cpuset any more."""
    if not {0, 1} <= os.sched_getaffinity(0) or not (CPUSET / "cpuset.cpus").exists():
        absent("needs a cgroup v1 cpuset hierarchy and CPUs 0 and 1")
    plain, chooser, control = threads
    os.sched_setaffinity(chooser, {1})
    outer = CPUSET / f"{cpuset_group}-outer"
    outer.mkdir()
    try:
        (outer / "cpuset.mems").write_text((CPUSET / "cpuset.mems").read_text())
        (outer / "cpuset.cpus").write_text("0")
        for tid in threads:
            (outer / "tasks").write_text(str(tid))
        assert {t: thread_allowed_cpus(t) for t in threads} == {t: {0} for t in threads}

        backend = Cgroup1Backend(CPUSET, StateStore(tmp_path / "cgroup1.json"), cpuset_group)
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
    finally:
        for tid in (outer / "tasks").read_text().split():
            (CPUSET / "tasks").write_text(tid)
        outer.rmdir()
