"""Who ran where, from the kernel's own CPU accounting (/proc), for the isolation tests.

Shared by the host's tests (cgroup v1 ``isolate_from``, libvirt domains) and the probes that
run inside a test guest acting as a host (they import it over the 9p share of the checkout,
as they import pvhost): a thread's share of one CPU from ``/proc/<tid>/schedstat``, the CPU a
task last ran on from ``/proc/<pid>/stat``, a CPU's busy, idle and stolen time from
``/proc/stat``. Standard library and this checkout's pvproto only: the guest image has
nothing else for it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path

from pvproto.cpulist import parse_cpulist

__all__ = [
    "Share",
    "Thread",
    "cpu_ticks",
    "idle_ticks",
    "kthreads_bound_to",
    "last_cpu",
    "load_on",
    "run_ns",
    "running_on",
    "share",
    "share_and_idle",
    "spinning_process",
    "threads",
    "user_threads_allowed_on",
]

TICK_NS = 1_000_000_000 // os.sysconf("SC_CLK_TCK")


def last_cpu(pid: int) -> int | None:
    """The CPU ``pid`` last ran on (field 39 of /proc/<pid>/stat), None once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[36])


def run_ns(tid: int) -> int:
    """Nanoseconds ``tid`` has run so far (its schedstat)."""
    return int(Path(f"/proc/{tid}/schedstat").read_text().split()[0])


def _cpu_fields(cpu: int) -> list[int]:
    for line in Path("/proc/stat").read_text().splitlines():
        name, *ticks = line.split()
        if name == f"cpu{cpu}":
            return [int(t) for t in ticks]
    raise LookupError(f"no cpu{cpu} in /proc/stat")


def cpu_ticks(cpu: int) -> tuple[int, int]:
    """(busy, steal) clock ticks of ``cpu`` so far, from /proc/stat."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = _cpu_fields(cpu)[:8]
    return user + nice + system + irq + softirq, steal


def idle_ticks(cpu: int) -> int:
    """idle + iowait clock ticks of ``cpu`` so far, from /proc/stat."""
    fields = _cpu_fields(cpu)
    return fields[3] + fields[4]


class Share(float):
    """A thread's fraction of one CPU over a window, with what else ran on that CPU and what
    the hypervisor stole from it (only when :func:`share` was told the CPU)."""

    others: float  # fraction of the window other tasks ran on the CPU
    steal: float  # fraction of the window the hypervisor took

    def __new__(cls, fraction: float, others: float = 0.0, steal: float = 0.0) -> Share:
        got = super().__new__(cls, fraction)
        got.others, got.steal = others, steal
        return got

    def why(self) -> str:
        return (
            f"other tasks ran {self.others:.0%} of the window on that CPU (on v1, tasks of the "
            f"root cpuset cannot be isolated: other work on this machine), hypervisor steal "
            f"{self.steal:.0%}"
        )


def share(tid: int, seconds: float = 2.0, cpu: int | None = None) -> Share:
    """The fraction of one CPU ``tid`` got over ``seconds`` of wall time. With ``cpu`` (the
    one it runs on alone): not counting the time the hypervisor stole from that CPU (no host
    scheduling can give that back), and what else ran there (:class:`Share`)."""
    if cpu is None:
        t0, r0 = time.monotonic_ns(), run_ns(tid)
        time.sleep(seconds)
        return Share((run_ns(tid) - r0) / (time.monotonic_ns() - t0))
    t0, r0, (busy0, steal0) = time.monotonic_ns(), run_ns(tid), cpu_ticks(cpu)
    time.sleep(seconds)
    t1, r1, (busy1, steal1) = time.monotonic_ns(), run_ns(tid), cpu_ticks(cpu)
    wall, ran = t1 - t0, r1 - r0
    stolen = (steal1 - steal0) * TICK_NS
    others = max(0, (busy1 - busy0) * TICK_NS - ran)
    return Share(ran / max(wall - stolen, 1), others / wall, stolen / wall)


#: /proc/<pid>/stat flags: a kernel thread.
PF_KTHREAD = 0x00200000


#: (tid, "tid (comm)", is a kernel thread, the CPUs it may run on)
Thread = tuple[int, str, bool, frozenset[int]]


def threads() -> list[Thread]:
    """Every thread now (:data:`Thread`): one pass over /proc for the filters below."""
    return list(_threads())


def _threads() -> Iterator[Thread]:
    for task in Path("/proc").glob("[0-9]*/task/[0-9]*"):
        try:
            name, rest = (task / "stat").read_text().rsplit(")", 1)
            status = (task / "status").read_text()
        except OSError:
            continue  # gone meanwhile
        allowed = next(
            parse_cpulist(line.split(":", 1)[1])
            for line in status.splitlines()
            if line.startswith("Cpus_allowed_list:")
        )
        kthread = bool(int(rest.split()[6]) & PF_KTHREAD)  # field 9, flags
        yield int(task.name), f"{task.name} ({name.split(' (', 1)[1]})", kthread, allowed


def kthreads_bound_to(cpu: int, now: list[Thread] | None = None) -> list[int]:
    """Kernel threads that may run on ``cpu`` alone (its ksoftirqd, kworkers, migration, …):
    cpuset isolation leaves them there by design, as the kernel's own work on that CPU. Of
    ``now`` (:func:`threads`) when given."""
    return [tid for tid, _, kthread, allowed in now or threads() if kthread and allowed == {cpu}]


def user_threads_allowed_on(
    cpu: int, exclude: Collection[int], now: list[Thread] | None = None
) -> dict[int, str]:
    """Every thread of user space (not a kernel thread) that may run on ``cpu``, less
    ``exclude``: {tid: "tid (comm)"}. A pinned vCPU's isolated pCPU should have none. Of
    ``now`` (:func:`threads`) when given."""
    return {
        tid: name
        for tid, name, kthread, allowed in now or threads()
        if not kthread and cpu in allowed and tid not in exclude
    }


def _run_ns_or_zero(tid: int) -> int:
    try:
        return run_ns(tid)
    except OSError:
        return 0  # a kworker that exited meanwhile


def share_and_idle(tid: int, cpu: int, seconds: float = 3.0) -> dict[str, float | str]:
    """Over the same ``seconds``, as fractions of the window: ``got``, ``tid``'s share of one
    CPU; ``idle``, ``cpu``'s idle; ``kernel``, what its bound kernel threads
    (:func:`kthreads_bound_to`) ran; ``irq``, its interrupt time; ``other_allowed``, every
    other thread of user space that may run on ``cpu`` (:func:`user_threads_allowed_on`, or
    "none"); ``other``, what they ran (anywhere: an upper bound of their share there), and
    ``other_who``, those of them that ran. The thread times are the scheduler's
    (schedstat), as ``got`` is: the CPU's task time in /proc/stat is tick-sampled, and a TCG
    guest whose host is starved misses ticks (one such run accounted 67 % of the window), and
    a few milliseconds of a kworker become tens when the host takes the vCPU away meanwhile
    (the guest cannot see steal time under TCG): the kernel's share, not a task's.
    """
    now = threads()
    kthreads = kthreads_bound_to(cpu, now)
    others = user_threads_allowed_on(cpu, {tid}, now)
    t0, f0 = time.monotonic(), _cpu_fields(cpu)
    k0 = {k: _run_ns_or_zero(k) for k in kthreads}
    o0 = {t: _run_ns_or_zero(t) for t in others}
    got = share(tid, seconds)
    f1, wall = _cpu_fields(cpu), time.monotonic() - t0
    kernel = sum(max(0, _run_ns_or_zero(k) - ns) for k, ns in k0.items()) / 1e9 / wall
    ran = {t: max(0, _run_ns_or_zero(t) - ns) / 1e9 / wall for t, ns in o0.items()}
    # /proc/stat per-CPU fields: user nice system idle iowait irq softirq steal …
    part = [(b - a) * TICK_NS / 1e9 / wall for a, b in zip(f0, f1, strict=True)]
    return {
        "got": float(got),
        "idle": sum(part[3:5]),
        "kernel": kernel,
        "irq": sum(part[5:7]),
        "other_allowed": ", ".join(others.values()) or "none",
        "other": sum(ran.values()),
        "other_who": ", ".join(f"{others[t]} {f:.1%}" for t, f in ran.items() if f) or "none",
    }


def load_on(pids: list[int], cpus: int | Collection[int], seconds: float = 1.5) -> int:
    """How many samples (every 10 ms) found a load process last running on ``cpus`` (one CPU
    or several)."""
    where = {cpus} if isinstance(cpus, int) else set(cpus)
    hits, end = 0, time.monotonic() + seconds
    while time.monotonic() < end:
        hits += sum(last_cpu(p) in where for p in pids)
        time.sleep(0.01)
    return hits


def running_on(cpu: int, exclude: set[int]) -> list[str]:
    """Processes other than ``exclude`` running on ``cpu`` now (root-cpuset tasks keep every
    CPU on v1: on a busy machine they, not the load, are what a pinned thread shares with)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            pid_comm, rest = stat.read_text().rsplit(")", 1)
        except OSError:
            continue
        fields = rest.split()
        pid = int(pid_comm.split(" (", 1)[0])
        if fields[0] == "R" and int(fields[36]) == cpu and pid not in exclude:
            out.append(f"{pid} ({pid_comm.split(' (', 1)[1]})")
    return out


@contextmanager
def spinning_process() -> Iterator[int]:
    """A process of ours that burns CPU, as a running vCPU thread does: its pid (= its tid)."""
    child = subprocess.Popen(
        [sys.executable, "-c", "import os; print(os.getpid(), flush=True)\nwhile True: pass"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    try:
        yield int(child.stdout.readline())
    finally:
        child.kill()
        child.wait()
