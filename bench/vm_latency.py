"""Latency of the whole path: guest ``sched_setaffinity`` return → host placement observed.

Boots the test image (``-smp 2``, test hook on) wired to a real ``pvhost`` on this host
(identity policy), then a guest thread pins itself to vCPU 1 and widens back to all vCPUs,
``--cycles`` times. On the host a poller watches QEMU's vCPU-1 thread's ``Cpus_allowed_list``
(every ~0.2 ms) and timestamps each change. Guest timestamps are mapped to the host clock by an
NTP-style offset measured over the test hook before and after the run (error bound reported).
pvhost's state directory is a private tmpfs for the run (:mod:`state_tmpfs`), as its default
``/run/extpv/state`` is on a real host.

    sudo .venv/bin/python bench/vm_latency.py --cycles 60
    → bench/results/vm-latency.md and .json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from exp_stats import percentile  # noqa: E402
from state_tmpfs import state_tmpfs  # noqa: E402

from extpv.autogroup import set_autogroup_nice  # noqa: E402
from pvproto.cpulist import parse_cpulist  # noqa: E402
from vmlab import VMSpec, start  # noqa: E402
from vmlab.daemon import PvhostDaemon  # noqa: E402
from vmlab.images import ensure_test_image  # noqa: E402
from vmlab.testhook import GuestResult  # noqa: E402

# Runs in the guest: pin to vCPU 1, hold, widen back, hold; (kind, time right after the call
# returned, time right before it was made) per change.
CYCLER = """
import json, os, sys, time
n, hold = int(sys.argv[1]), float(sys.argv[2])
everything = os.sched_getaffinity(0)
events = []
time.sleep(hold)
for _ in range(n):
    for kind, cpus in (("pin", {1}), ("unpin", everything)):
        t0 = time.time(); os.sched_setaffinity(0, cpus); t1 = time.time()
        events.append((kind, t1, t0)); time.sleep(hold)
print(json.dumps(events))
"""


# The poller's own process: prints "host time<TAB>allowed CPUs<TAB>watched file" at each change
# of thread argv[1]'s allowed CPUs or of the file argv[2] (optional: a cpuset's cpuset.cpus).
POLLER = """
import os, sys, time
# Files kept open and re-read with pread (procfs and cgroupfs regenerate them at offset 0):
# each poll is one or two syscalls, so that the instrument takes little CPU from what it
# measures.
status = os.open(f"/proc/{sys.argv[1]}/status", os.O_RDONLY)
watched = os.open(sys.argv[2], os.O_RDONLY) if len(sys.argv) > 2 else None
KEY = b"Cpus_allowed_list:"
def allowed():
    data = os.pread(status, 8192, 0)
    i = data.find(KEY)
    if i < 0:
        return "?"
    return data[i + len(KEY):data.find(b"\\n", i)].strip().decode()
def watch():
    return "" if watched is None else os.pread(watched, 4096, 0).strip().decode()
last = None
while True:
    now = (allowed(), watch())
    if now != last:
        print(f"{time.time()}\t{now[0]}\t{now[1]}", flush=True)
        last = now
    time.sleep(0.0002)
"""


class Poller:
    """Timestamps every change of a thread's allowed CPUs (host CLOCK_REALTIME), and of a
    watched file's content when one is given (the other load's ``cpuset.cpus``: when that
    load gave the pinned pCPU up).

    The poller is the instrument, so it must not wait for the CPU itself: on a loaded host
    (``--load``) a poller at the load's priority sees a change only when the scheduler next
    runs it (seen under 8 ``yes``: "placement seen" 36-60 ms after a call whose result, sent by
    pvhost after the placement, was in the guest after 5-7 ms). It is a process of its own (no
    GIL shared with the bench's other threads) at nice -20 where it may (root): each poll is
    one ``pread`` per file, 0.2 ms apart. It leads a session of its own, and where the
    scheduler's autogroup is on that group is at -20 too: a thread's own value weighs only
    inside its group (:mod:`extpv.autogroup`), and in the bench's session the poller's group
    would be the bench's, at 0, against one group per ``yes``.
    """

    def __init__(self, tid: int, watched: Path | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", POLLER, str(tid), *([str(watched)] if watched else [])],
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        with contextlib.suppress(PermissionError):
            os.setpriority(os.PRIO_PROCESS, self.proc.pid, -20)
            set_autogroup_nice(self.proc.pid, -20)
        #: (host time, allowed CPUs, watched file's content) at each change of either.
        self.samples: list[tuple[float, str, str]] = []

    def stop(self) -> list[tuple[float, str]]:
        """End the poller; every change of the allowed CPUs it saw (:attr:`samples` has the
        watched file's too)."""
        self.proc.terminate()
        out, _ = self.proc.communicate(timeout=10)
        for line in out.splitlines():
            t, value, watched = line.split("\t")
            self.samples.append((float(t), value, watched))
        changes: list[tuple[float, str]] = []
        for t, value, _watched in self.samples:
            if not changes or changes[-1][1] != value:
                changes.append((t, value))
        return changes


def isolated_changes(samples: list[tuple[float, str, str]]) -> list[tuple[float, str]]:
    """The :class:`Poller` samples as ``match_events`` changes in which the value is "1" only
    while the thread is confined to CPU 1 *and* the watched cpuset has given CPU 1 up: a pin's
    latency to *isolated*, not only placed."""
    return [
        (t, "1" if allowed == "1" and 1 not in parse_cpulist(cpus) else "-")
        for t, allowed, cpus in samples
    ]


def run_cycler(
    guest: Callable[[Sequence[str], float], GuestResult],
    tid: int,
    cycler: str,
    cycles: int,
    hold: float,
    *,
    slack_s: float = 120.0,
    poller: Poller | None = None,
) -> tuple[str, list[tuple[float, str]]]:
    """Run ``cycler`` (a guest Python script taking ``cycles`` and ``hold``) through ``guest``
    (argv, timeout) while a :class:`Poller` (``poller``, or a new one) watches host thread
    ``tid``; the cycler's stdout and the poller's (host time, allowed CPUs) changes. The poller
    runs on for a second after the cycler ends, so the last change is seen too."""
    poller = poller or Poller(tid)
    try:
        time.sleep(0.2)  # its first line: the mask before the first change
        result = guest(
            ["python3", "-c", cycler, str(cycles), str(hold)], cycles * 2 * hold + slack_s
        ).check()
        time.sleep(1.0)
    finally:
        changes = poller.stop()
    return result.stdout, changes


def match_events(
    events: list[tuple[str, float, float]],
    changes: list[tuple[float, str]],
    offset: float,
    error: float,
) -> tuple[dict[str, list[float]], int]:
    """Latency (ms) of each guest pin/unpin to the first matching host change, and the misses.

    ``events`` are the guest's (kind, time the call returned, time it was made) triples,
    ``changes`` the poller's (host time, value) pairs; a guest time maps to host time by
    ``offset``, within ``error`` either side. A change is searched from the moment the call was
    *made*: the guest thread can be preempted between the call's return and its clock read
    (under load, for longer than the whole round trip), and the placement then lands before the
    recorded return. Searching from the return would pair it with the next change of that kind,
    a whole cycle later (seen: 810 ms "unpin" samples whose result was in the guest after
    10 ms). Such a placement counts 0 ms: it was there when the guest's clock was read.
    """
    lat: dict[str, list[float]] = {"pin": [], "unpin": []}
    missed = 0
    for kind, returned, made in events:
        host_made, host_returned = made - offset, returned - offset
        want = (lambda v: v == "1") if kind == "pin" else (lambda v: v != "1")
        hit = next((t for t, v in changes if t >= host_made - error and want(v)), None)
        if hit is None:
            missed += 1
        else:
            lat[kind].append(max(0.0, hit - host_returned) * 1000)
    return lat, missed


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--cycles", type=int, default=60, help="pin/unpin cycles (default 60)")
    ap.add_argument("--hold", type=float, default=0.4, help="seconds between changes")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "vm-latency")
    args = ap.parse_args()

    image = ensure_test_image()
    run = Path("/run/extpv-bench") / str(os.getpid())
    runtime = run / "vms"
    runtime.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    vm = start(VMSpec(name="bench", image=image.path, smp=2, runtime_dir=runtime, test_hook=True))
    boot_s = time.monotonic() - t0
    daemon = PvhostDaemon(run, runtime, image.signing_key)
    state = ExitStack()
    try:
        # pvhost's state directory on a tmpfs, as /run/extpv/state is on a real host.
        state.enter_context(state_tmpfs(daemon.state_dir))
        daemon.start()
        t1 = time.monotonic()
        daemon.wait_status(
            "the affinity program loaded",
            lambda s: s["vms"]["bench"]["programs"] == {"affinity": "loaded"},
            180,
        )
        inject_s = time.monotonic() - t1
        tid = vm.vcpu_threads()[1].tid
        off0, err0 = vm.clock_offset()
        stdout, changes = run_cycler(vm.guest, tid, CYCLER, args.cycles, args.hold)
        off1, err1 = vm.clock_offset()
        status_backend = daemon.status()["backend"]
    finally:
        vm.stop()
        daemon.close()
        state.close()
        shutil.rmtree(run, ignore_errors=True)
    events = json.loads(stdout)
    offset = (off0 + off1) / 2
    error = max(err0, err1) + abs(off1 - off0) / 2
    lat, missed = match_events(events, changes, offset, error)
    summary = {
        "what": "guest sched_setaffinity return -> host vCPU thread placement observed",
        "cycles": args.cycles,
        "missed": missed,
        "accel": vm.accel,
        "boot_to_ready_s": round(boot_s, 1),
        "pvhost_start_to_program_loaded_s": round(inject_s, 1),
        "clock_offset_error_ms": round(error * 1000, 2),
        "host": platform.node(),
        "kernel": platform.release(),
        "state_dir": "tmpfs (bench/state_tmpfs.py)",
        "cpus": os.cpu_count(),
        "qemu": subprocess.run(
            ["qemu-system-x86_64", "--version"], check=False, capture_output=True, text=True
        ).stdout.splitlines()[0],
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    for kind, xs in lat.items():
        if xs:
            summary[kind] = {
                "n": len(xs),
                "p50_ms": round(statistics.median(xs), 1),
                "p99_ms": round(percentile(xs, 99), 1),
                "min_ms": round(min(xs), 1),
                "max_ms": round(max(xs), 1),
            }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(
        json.dumps({**summary, "samples_ms": lat}, indent=1) + "\n"
    )
    md = [
        f"# Pin latency, guest to host ({summary['date']})",
        "",
        f"{summary['what']}; {args.cycles} pin/unpin cycles, {missed} unmatched; "
        "pvhost's state directory on a tmpfs.",
        "",
        "| change | n | p50 ms | p99 ms | min ms | max ms |",
        "|---|---|---|---|---|---|",
    ]
    for kind in ("pin", "unpin"):
        if kind in summary:
            s = summary[kind]
            cells = [kind, s["n"], s["p50_ms"], s["p99_ms"], s["min_ms"], s["max_ms"]]
            md.append("| " + " | ".join(str(c) for c in cells) + " |")
    backend = status_backend
    md += [
        "",
        f"Setup: {summary['qemu']}, accel {summary['accel']}, host kernel {summary['kernel']}, "
        f"{summary['cpus']} CPUs; guest: test image, -smp 2; pvhost identity policy, "
        f"backend {backend}. "
        f"Guest→host clock mapping error ±{summary['clock_offset_error_ms']} ms. "
        f"Boot to userspace ready {summary['boot_to_ready_s']} s; pvhost start to the affinity "
        f"program loaded in the guest {summary['pvhost_start_to_program_loaded_s']} s.",
        "",
        "Raw samples: `vm-latency.json`. Reproduce: `sudo .venv/bin/python bench/vm_latency.py`.",
    ]
    args.out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print(json.dumps(summary, indent=1))
    return 0 if missed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
