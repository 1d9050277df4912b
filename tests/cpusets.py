"""Scratch cgroup v1 cpusets for the tests on this host (its cpuset hierarchy is v1).

A test's own cpuset next to extpv's stands in for where QEMU or the host's other load runs.
It is made with the root's memory nodes (a v1 cpuset takes no task before it has some) and, on
the way out, its tasks are handed back to the root cpuset (a cpuset with tasks cannot be
removed) and it is removed, whatever the test did.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.conftest import absent

__all__ = ["CPUSET", "hand_back", "require_cpuset_v1", "scratch_cpuset", "yes_load"]

#: The v1 cpuset hierarchy's root.
CPUSET = Path("/sys/fs/cgroup/cpuset")


def require_cpuset_v1(cpus: Iterable[int] = ()) -> None:
    """Absent (skipped, or failed where CI requires it) without a v1 cpuset hierarchy or
    without each of ``cpus`` for this process."""
    wanted = sorted(cpus)
    if not set(wanted) <= os.sched_getaffinity(0) or not (CPUSET / "cpuset.cpus").exists():
        also = f" and CPUs {' and '.join(map(str, wanted))}" if wanted else ""
        absent(f"needs a cgroup v1 cpuset hierarchy{also}")


def hand_back(path: Path) -> None:
    """Move every task of cpuset ``path`` to the root cpuset."""
    for tid in (path / "tasks").read_text().split():
        (CPUSET / "tasks").write_text(tid)


@contextmanager
def scratch_cpuset(name: str, cpus: str | None = None) -> Iterator[Path]:
    """Cpuset ``name`` under the root, on ``cpus`` (a CPU list; the root's CPUs if None);
    its tasks handed back and the cpuset removed on exit."""
    path = CPUSET / name
    path.mkdir()
    try:
        (path / "cpuset.mems").write_text((CPUSET / "cpuset.mems").read_text())
        (path / "cpuset.cpus").write_text(cpus or (CPUSET / "cpuset.cpus").read_text())
        yield path
    finally:
        hand_back(path)
        path.rmdir()


@contextmanager
def yes_load(name: str, cpus: str = "0-1") -> Iterator[tuple[Path, list[int]]]:
    """Scratch cpuset ``name`` on ``cpus`` running 4 x this process's CPUs ``yes`` processes
    (the paper's host load): the cpuset and their pids; they are killed on exit."""
    procs: list[subprocess.Popen[bytes]] = []
    with scratch_cpuset(name, cpus) as path:
        try:
            for _ in range(4 * len(os.sched_getaffinity(0))):
                # Each in its own session, as if started from its own shell: with autogroup
                # scheduling, a group of them would otherwise count as one task against a vCPU.
                p = subprocess.Popen(["yes"], stdout=subprocess.DEVNULL, start_new_session=True)
                (path / "tasks").write_text(str(p.pid))
                procs.append(p)
            yield path, [p.pid for p in procs]
        finally:
            for p in procs:
                p.kill()
                p.wait()
