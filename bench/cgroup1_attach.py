"""What one cgroup v1 cpuset step of a pin costs in the kernel, alone (no pvhost, no guest).

A thread of this process is moved into a scratch cpuset and back, as a pin and an unpin do,
``--cycles`` times: back to back, and ``--gap`` seconds apart (a guest's pins come hundreds of
milliseconds apart). Each step is timed: mkdir, ``cpuset.mems``/``cpuset.cpus`` writes, the
``tasks`` writes (moves), rmdir. On kernels that keep ``cgroup_threadgroup_rwsem`` in its fast
mode (a v1 or v2 hierarchy mounted without ``favordynmods``), the first move after a quiet
spell waits for an RCU grace period; back-to-back moves do not.

Then the pin of the cgroup1 backend's ``resident`` mode: the thread stays in a cpuset of its
own and only that cpuset's ``cpuset.cpus`` is rewritten (one pCPU, then every CPU again),
again back to back and ``--gap`` seconds apart. That write takes no threadgroup rwsem.

    sudo .venv/bin/python bench/cgroup1_attach.py [--cycles 12] [--gap 0.4] [--busy]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

from pvproto import parse_cpulist

CPUSET = Path("/sys/fs/cgroup/cpuset")


def write(path: Path, value: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cycles", type=int, default=12)
    ap.add_argument("--gap", type=float, default=0.4, help="seconds between cycles")
    ap.add_argument(
        "--busy", action="store_true", help="move a spinning process (as a vCPU thread runs)"
    )
    args = ap.parse_args()
    stop = threading.Event()
    tids: list[int] = []
    spinner = subprocess.Popen(["sh", "-c", "while :; do :; done"]) if args.busy else None
    worker = threading.Thread(target=lambda: (tids.append(threading.get_native_id()), stop.wait()))
    worker.start()
    while not tids:
        time.sleep(0.01)
    tid = str(spinner.pid if spinner is not None else tids[0])
    home = CPUSET / Path(f"/proc/{tid}/cpuset").read_text().strip().lstrip("/")
    mems = (CPUSET / "cpuset.mems").read_text().strip()
    cpus = (CPUSET / "cpuset.cpus").read_text().strip()
    base = CPUSET / f"extpv-attach-bench-{os.getpid()}"
    times: dict[str, list[float]] = {}

    def step(name: str, action: Callable[[], object]) -> None:
        t0 = time.perf_counter()
        action()
        times.setdefault(name, []).append((time.perf_counter() - t0) * 1000)

    base.mkdir()
    try:
        write(base / "cpuset.mems", mems)
        write(base / "cpuset.cpus", cpus)
        vcpu = base / "vcpu"
        for label, gap in (("back to back", 0.0), (f"{args.gap:g} s apart", args.gap)):
            for _ in range(args.cycles):
                step(f"{label}: mkdir", vcpu.mkdir)
                step(f"{label}: write cpuset.mems", lambda: write(vcpu / "cpuset.mems", mems))
                step(f"{label}: write cpuset.cpus", lambda: write(vcpu / "cpuset.cpus", cpus))
                step(f"{label}: move in (tasks)", lambda: write(vcpu / "tasks", tid))
                step(f"{label}: move out (tasks)", lambda: write(home / "tasks", tid))
                step(f"{label}: rmdir", vcpu.rmdir)
                time.sleep(gap)
        # Resident: moved in once, then only its own cpuset's CPUs change.
        one = str(max(parse_cpulist(cpus)))
        vcpu.mkdir()
        write(vcpu / "cpuset.mems", mems)
        write(vcpu / "cpuset.cpus", cpus)
        write(vcpu / "tasks", tid)
        pin_to = vcpu / "cpuset.cpus"
        for label, gap in (("back to back", 0.0), (f"{args.gap:g} s apart", args.gap)):
            for _ in range(args.cycles):
                step(f"{label}: resident pin (cpuset.cpus = {one})", lambda: write(pin_to, one))
                time.sleep(gap)
                step(f"{label}: resident unpin (cpuset.cpus = {cpus})", lambda: write(pin_to, cpus))
                time.sleep(gap)
        if os.sched_getaffinity(int(tid)) != parse_cpulist(cpus):
            raise SystemExit("the resident unpin did not give the thread its CPUs back")
        write(home / "tasks", tid)
        vcpu.rmdir()
    finally:
        stop.set()
        worker.join()
        if spinner is not None:
            spinner.kill()
            spinner.wait()
        with_tasks = base / "vcpu" / "tasks"
        if with_tasks.exists():
            for t in with_tasks.read_text().split():
                write(home / "tasks", t)
            (base / "vcpu").rmdir()
        base.rmdir()
    print(f"| step ({os.uname().release}) | p50 ms | max ms |\n|---|---|---|")
    for name, xs in times.items():
        print(f"| {name} | {statistics.median(xs):.3f} | {max(xs):.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
