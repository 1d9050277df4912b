"""What ``isolation_v1.py`` (this host's cgroup v1) and ``isolation_v2.py`` (cgroup v2, in a
guest) share: a spinning thread standing in for a vCPU thread, the ``yes`` load, pin/unpin
cycles of a placement backend, and the thread's CPU share from ``/proc/<tid>/schedstat``.

Importable from either script as a sibling module (a script's own directory is first on
``sys.path``, also in the guest, where ``isolation_v2.py`` runs from the shared checkout).
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["cycles", "pinned", "share", "spinner", "stop_all", "yes_load"]

#: A process whose one thread spins and first prints its tid.
SPIN = "import os, threading\nprint(threading.get_native_id(), flush=True)\nwhile True: pass"


def spinner() -> tuple[subprocess.Popen[str], int]:
    """The spinning process and its thread's tid."""
    spin = subprocess.Popen([sys.executable, "-c", SPIN], stdout=subprocess.PIPE, text=True)
    assert spin.stdout is not None
    return spin, int(spin.stdout.readline())


def yes_load(n: int, cpuset: Path | None = None) -> list[subprocess.Popen[bytes]]:
    """``n`` ``yes`` processes, each in a session of its own (and in ``cpuset``, if given)."""
    procs = []
    for _ in range(n):
        p = subprocess.Popen(["yes"], stdout=subprocess.DEVNULL, start_new_session=True)
        if cpuset is not None:
            (cpuset / "tasks").write_text(str(p.pid))
        procs.append(p)
    return procs


def stop_all(procs: list[subprocess.Popen[Any]]) -> None:
    for p in procs:
        p.kill()
        p.wait()


def share(tid: int, seconds: float) -> float:
    """The thread's fraction of one CPU over ``seconds``."""

    def run_ns() -> int:
        return int(Path(f"/proc/{tid}/schedstat").read_text().split()[0])

    t0, r0 = time.monotonic_ns(), run_ns()
    time.sleep(seconds)
    return (run_ns() - r0) / (time.monotonic_ns() - t0)


def cycles(backend: Any, n: int, tid: int, pcpu: int) -> tuple[list[float], list[float]]:
    """``n`` pin + unpin cycles of vCPU 0 of VM ``bench``: (pin seconds, unpin seconds)."""
    pins: list[float] = []
    unpins: list[float] = []
    for _ in range(n):
        t0 = time.perf_counter()
        backend.pin("bench", 0, tid, pcpu)
        t1 = time.perf_counter()
        backend.unpin("bench", 0)
        pins.append(t1 - t0)
        unpins.append(time.perf_counter() - t1)
    return pins, unpins


@contextmanager
def pinned(backend: Any, tid: int, pcpu: int) -> Iterator[None]:
    """vCPU 0 of VM ``bench`` pinned (and settled for 0.2 s) for the duration."""
    backend.pin("bench", 0, tid, pcpu)
    time.sleep(0.2)
    try:
        yield
    finally:
        backend.unpin("bench", 0)
