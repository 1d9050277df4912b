"""The host side of one measurement: ``yes`` load, forced serialization, placement watching.

* :class:`YesLoad` starts N ``yes`` processes (anywhere on the host, as the paper's load) that
  die with the harness even on ``kill -9`` (``PR_SET_PDEATHSIG``) and are always reaped.
* :class:`Serializer` forces both vCPU threads onto one pCPU (``sched_setaffinity``) for a
  fraction of every period, as the paper's "serialization" does, and records whether the
  kernel let it: with extpv placing the threads in cpusets, the cpuset bounds the affinity, so
  moving vCPU 1's thread to pCPU 0 fails (EINVAL) — that is how extpv's placement wins.
* :class:`Watcher` polls the vCPU threads' ``Cpus_allowed_list`` and timestamps when the
  placement the guest asked for (vCPU i → pCPU i) is first seen.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

__all__ = ["Serializer", "Watcher", "YesLoad", "allowed", "cpulist"]

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def allowed(tid: int) -> str:
    """The thread's ``Cpus_allowed_list`` ("?" once it is gone)."""
    try:
        for line in Path(f"/proc/{tid}/status").read_text().splitlines():
            if line.startswith("Cpus_allowed_list:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "?"


def cpulist(cpus: set[int]) -> str:
    """``{0, 1, 2, 5}`` → ``"0-2,5"`` (the kernel's format, to compare with ``allowed``)."""
    out: list[str] = []
    for c in sorted(cpus):
        if out and "-" not in out[-1] and int(out[-1]) == c - 1:
            out[-1] = f"{out[-1]}-{c}"
        elif out and "-" in out[-1] and int(out[-1].split("-")[1]) == c - 1:
            out[-1] = f"{out[-1].split('-')[0]}-{c}"
        else:
            out.append(str(c))
    return ",".join(out)


class YesLoad:
    """N ``yes > /dev/null`` processes; a context manager that always kills and reaps them."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.procs: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> YesLoad:
        try:
            for _ in range(self.count):
                self.procs.append(
                    subprocess.Popen(
                        ["yes"],
                        stdin=subprocess.DEVNULL,
                        stdout=subprocess.DEVNULL,
                        preexec_fn=_die_with_parent,  # noqa: PLW1509 - no threads touch fork here
                    )
                )
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for p in self.procs:
            with contextlib.suppress(ProcessLookupError):
                p.kill()
        for p in self.procs:
            p.wait(timeout=30)
        self.procs = []

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Serializer(threading.Thread):
    """For ``fraction`` of every ``period_s``, force both vCPU threads onto ``pcpu``.

    Outside the windows the threads get ``restore`` back (QEMU's own affinity). Counts the
    windows tried, those the kernel applied (both threads allowed only ``pcpu``) and the
    seconds actually serialized.
    """

    def __init__(
        self, tids: list[int], pcpu: int, restore: set[int], fraction: float, period_s: float = 1.0
    ) -> None:
        super().__init__(daemon=True, name="serializer")
        self.tids, self.pcpu, self.restore = tids, pcpu, restore
        self.fraction, self.period_s = fraction, period_s
        self.halt = threading.Event()
        self.windows = self.applied = self.refused = 0
        self.serialized_s = 0.0

    def _force(self, cpus: set[int]) -> int:
        refused = 0
        for tid in self.tids:
            try:
                os.sched_setaffinity(tid, cpus)
            except OSError:  # EINVAL: the thread's cpuset has none of ``cpus``
                refused += 1
        return refused

    def run(self) -> None:
        on_s = self.fraction * self.period_s
        try:
            while not self.halt.wait(self.period_s - on_s):
                self.windows += 1
                t0 = time.monotonic()
                self.refused += self._force({self.pcpu})
                both = all(allowed(t) == str(self.pcpu) for t in self.tids)
                self.halt.wait(on_s)
                self._force(self.restore)
                if both:
                    self.applied += 1
                    self.serialized_s += time.monotonic() - t0
        finally:
            self._force(self.restore)

    def stop(self) -> dict[str, float]:
        self.halt.set()
        self.join(timeout=30)
        return {
            "fraction": self.fraction,
            "windows": self.windows,
            "applied": self.applied,
            "refused_setaffinity": self.refused,
            "serialized_s": round(self.serialized_s, 3),
        }


class Watcher(threading.Thread):
    """Polls the vCPU threads' allowed CPUs every ~1 ms; notes when ``want`` is first seen."""

    def __init__(self, tids: dict[int, int], want: dict[int, str]) -> None:
        super().__init__(daemon=True, name="watcher")
        self.tids, self.want = tids, want
        self.halt = threading.Event()
        self.placed_at: float | None = None  # CLOCK_REALTIME, comparable with guest clocks
        self.seen: dict[int, set[str]] = {v: set() for v in tids}

    def run(self) -> None:
        while not self.halt.is_set():
            now = {v: allowed(t) for v, t in self.tids.items()}
            for v, a in now.items():
                self.seen[v].add(a)
            if (
                self.placed_at is None
                and self.want
                and all(now[v] == a for v, a in self.want.items())
            ):
                self.placed_at = time.time()
            time.sleep(0.001)

    def stop(self) -> None:
        self.halt.set()
        self.join(timeout=10)
