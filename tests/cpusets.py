"""Scratch cgroup v1 cpusets for the tests on this host (its cpuset hierarchy is v1).

A test's own cpuset next to extpv's stands in for where QEMU or the host's other load runs.
It is made with the root's memory nodes (a v1 cpuset takes no task before it has some) and, on
the way out, its tasks are handed back to the root cpuset (a cpuset with tasks cannot be
removed) and it is removed, whatever the test did.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.conftest import absent

__all__ = ["CPUSET", "hand_back", "require_cpuset_v1", "scratch_cpuset"]

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
