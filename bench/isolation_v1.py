"""cgroup v1 isolation, measured: pin/unpin latency per mode and a vCPU-like thread's share.

Two modes of the cgroup v1 backend, on the same host under the same load (N ``yes`` processes,
each in its own session, inside a cpuset of ours standing in for where the host's other load
lives):

* ``restricted`` — the default: the pinned thread is confined to its pCPU, the load is not;
* ``isolate_from`` — ``placement.isolate_from`` names the load's cpuset: while pinned, the
  pCPU is taken from it and given back exactly at unpin.

For each: ``--cycles`` pin + unpin cycles of a spinning thread of ours (p50/p99 of each
step), then the thread's CPU share (from ``/proc/<tid>/schedstat``) unpinned and pinned, and
how often a ``yes`` process was seen on the pinned pCPU (``/proc/<pid>/stat`` field 39).

Run as root on a cgroup v1 (hybrid) host with ≥ 2 CPUs:
``.venv/bin/python bench/isolation_v1.py [--cycles 200] [--load 0 (= 4 x CPUs)]``
→ ``bench/results/isolation-v1.{md,json}``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from exp_stats import latency_summary  # noqa: E402
from isolation_common import cycles, pinned, share, spinner, stop_all, yes_load  # noqa: E402

from pvhost.placement import Cgroup1Backend  # noqa: E402

CPUSET = Path("/sys/fs/cgroup/cpuset")


def last_cpu(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[36])
    except OSError:
        return None


def load_seen_on(pids: list[int], cpu: int, seconds: float) -> float:
    """The fraction of 10 ms samples in which some load process last ran on ``cpu``."""
    hits = samples = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        samples += 1
        hits += any(last_cpu(p) == cpu for p in pids)
        time.sleep(0.01)
    return hits / max(samples, 1)


def measure(mode: str, n: int, pcpu: int, *, load: Path, yes: list[int], tid: int) -> Any:
    with tempfile.TemporaryDirectory() as tmp:
        isolate = ("/" + load.name,) if mode == "isolate_from" else ()
        # Move mode, as bench/results/isolation-v1.md was recorded (resident: vm_stages.py).
        backend = Cgroup1Backend(
            CPUSET, Path(tmp) / "state.json", "extpv-bench-iso", isolate, mode="move"
        )
        backend.setup(frozenset({pcpu}))
        try:
            pins, unpins = cycles(backend, n, tid, pcpu)
            unpinned = share(tid, 3.0)
            with pinned(backend, tid, pcpu):
                pinned_share = share(tid, 3.0)
                seen = load_seen_on(yes, pcpu, 2.0)
        finally:
            backend.teardown()
    return {
        "pin": latency_summary(pins),
        "unpin": latency_summary(unpins),
        "share_unpinned": round(unpinned, 3),
        "share_pinned": round(pinned_share, 3),
        "load_seen_on_pinned_pcpu": round(seen, 3),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=200, help="pin+unpin cycles per mode")
    parser.add_argument("--load", type=int, default=0, help="yes processes (0: 4 x CPUs)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results")
    args = parser.parse_args()
    cpus = sorted(os.sched_getaffinity(0))
    if os.geteuid() != 0 or not (CPUSET / "cpuset.cpus").exists() or len(cpus) < 2:
        sys.exit("isolation_v1: needs root, a cgroup v1 cpuset hierarchy and at least 2 CPUs")
    pcpu = cpus[-1]
    n = args.load or 4 * len(cpus)
    load = CPUSET / "extpv-bench-load"
    load.mkdir()
    procs: list[subprocess.Popen[bytes]] = []
    spin, tid = spinner()
    try:
        (load / "cpuset.mems").write_text((CPUSET / "cpuset.mems").read_text())
        (load / "cpuset.cpus").write_text(",".join(map(str, cpus)))
        procs = yes_load(n, load)
        modes = {m: measure(m, args.cycles, pcpu, load=load, yes=[p.pid for p in procs], tid=tid)
                 for m in ("restricted", "isolate_from")}  # fmt: skip
    finally:
        spin.kill()
        stop_all(procs)
        with contextlib.suppress(OSError):
            for t in (load / "tasks").read_text().split():
                (CPUSET / "tasks").write_text(t)
            load.rmdir()
    result = {
        "machine": f"{platform.node()} {platform.release()}, {len(cpus)} CPUs",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_processes": n,
        "pinned_pcpu": pcpu,
        "modes": modes,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "isolation-v1.json").write_text(json.dumps(result, indent=2) + "\n")
    rows = "\n".join(
        f"| {m} | {r['pin']['p50_ms']} / {r['pin']['p99_ms']} | "
        f"{r['unpin']['p50_ms']} / {r['unpin']['p99_ms']} | {r['share_unpinned']:.0%} | "
        f"{r['share_pinned']:.0%} | {r['load_seen_on_pinned_pcpu']:.0%} |"
        for m, r in modes.items()
    )
    md = f"""# cgroup v1 isolation: latency and CPU share per mode

Machine: {result["machine"]}; {result["date"]}. Load: {n} `yes` processes (own sessions) in a
cpuset of ours on every CPU; a spinning thread stands in for a vCPU thread, pinned to pCPU
{pcpu}. Command: `bench/isolation_v1.py --cycles {args.cycles}` (raw: `isolation-v1.json`).
Latency is the backend's own (cgroupfs writes + read-back + verify), p50 / p99 over
{args.cycles} cycles.

| mode | pin ms p50 / p99 | unpin ms p50 / p99 | share unpinned | share pinned | load seen on the pCPU |
|---|---|---|---|---|---|
{rows}

*share*: the thread's fraction of one CPU over 3 s. *load seen*: the fraction of 10 ms samples
in which some `yes` had last run on the pinned pCPU (while pinned). `restricted` confines the
thread but leaves the load on its pCPU; `isolate_from` takes the pCPU from the load's cpuset.
"""  # noqa: E501
    (args.out / "isolation-v1.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
