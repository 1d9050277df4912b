"""Where the time of a guest pin goes, stage by stage, in one run (issue #9).

Same set-up as ``bench/vm_latency.py`` (the test image, ``-smp 2``, a real ``pvhost`` with the
identity policy; a guest thread pins itself to vCPU 1 and widens back, ``--cycles`` times;
a host poller timestamps the vCPU-1 thread's placement), plus, measured from outside the
agent and the daemon:

* **guest** (guest ``CLOCK_MONOTONIC``, = ``bpf_ktime_get_ns``): an ftrace instance in the
  guest records the cycler's ``sched_setaffinity`` enter/exit (the affinity program's record
  goes into the ring buffer at that exit), the agent's ``epoll_wait`` returns (it woke for the
  ring buffer), its ``write`` of the frame to the virtio port, and its ``read`` of the answer
  from the port (the result back in the guest);
* **host** (host ``CLOCK_MONOTONIC``): an ftrace instance on the host records pvhost's
  ``recvfrom`` (the frame received) and ``sendto`` (the result sent) on its main thread; and
  ``pvhost -v`` logs, per change, the seconds of each stage of the placement path
  (:mod:`pvhost.placement.stages`: queue, policy, thread, record, isolate, cgroup, verify,
  readback).

The two clocks are never subtracted from each other: the transit through QEMU and the guest
kernel (both ways together) is the guest's round trip (frame written → result read) minus the
host's time (frame received → result sent). Guest and host events of one change are paired
through the test hook's clock offset (±1 ms is plenty: changes are ``--hold`` apart).

``--load N`` runs N ``yes`` processes on the host throughout (N >= 4 x CPUs for issue #9).

pvhost's state directory is a private tmpfs mounted for the run (:mod:`state_tmpfs`), as its
default ``/run/extpv/state`` is on a real host: the state record's fsync then flushes no disk.
``--qemu-nice N`` starts QEMU at nice N, as ``pvctl vm start --nice N`` does: the VM manager's
priority for the guest against the load (docs/vm-priority.md), which pvhost does not set.
``--sched-trace`` adds the host scheduler's view (:mod:`sched_trace`): per change, how long each
QEMU and pvhost thread waited on a run queue in the guest's part and in pvhost's, and how many
``yes`` ran on each CPU meanwhile.

    sudo .venv/bin/python bench/vm_stages.py --cycles 100 --load 8 \
        --out bench/results/vm-stages-load
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from contextlib import ExitStack, suppress
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from exp_stats import percentile  # noqa: E402
from ftrace import FtraceInstance  # noqa: E402
from isolation_common import stop_all, yes_load  # noqa: E402
from sched_trace import SchedTrace, parse_sched, window_waits  # noqa: E402
from state_tmpfs import state_tmpfs  # noqa: E402
from vm_latency import Poller, isolated_changes, match_events, run_cycler  # noqa: E402

from vmlab import VMSpec, start  # noqa: E402
from vmlab.daemon import PvhostDaemon  # noqa: E402
from vmlab.images import ensure_test_image  # noqa: E402

# Runs in the guest: like vm_latency's cycler, with CLOCK_MONOTONIC around each call and the
# guest's CLOCK_REALTIME - CLOCK_MONOTONIC (to pair guest events with the host's).
CYCLER = """
import json, os, sys, time
n, hold = int(sys.argv[1]), float(sys.argv[2])
everything = os.sched_getaffinity(0)
events = []
rm0 = time.time() - time.monotonic()
time.sleep(hold)
for _ in range(n):
    for kind, cpus in (("pin", {1}), ("unpin", everything)):
        t0 = time.monotonic(); os.sched_setaffinity(0, cpus); t1 = time.monotonic()
        events.append((kind, time.time(), t0, t1)); time.sleep(hold)
print(json.dumps({"events": events, "rm": (rm0 + time.time() - time.monotonic()) / 2}))
"""

# Runs in the guest (sh): an ftrace instance on the agent's port I/O and the affinity calls.
GUEST_TRACE_ON = """
set -e
T=/sys/kernel/tracing
[ -d $T/instances ] || mount -t tracefs nodev $T
I=$T/instances/extpv-stages
mkdir -p $I
echo 0 > $I/tracing_on
echo mono > $I/trace_clock
echo 8192 > $I/buffer_size_kb
AG=$(systemctl show -p MainPID --value pvagent.service)
[ "${AG:-0}" != 0 ] || { echo "no pvagent.service running" >&2; exit 1; }
for e in sys_enter_sched_setaffinity sys_exit_sched_setaffinity; do
  echo 1 > $I/events/syscalls/$e/enable
done
for e in sys_exit_epoll_wait sys_enter_write sys_enter_read sys_exit_read; do
  echo "common_pid == $AG" > $I/events/syscalls/$e/filter
  echo 1 > $I/events/syscalls/$e/enable
done
echo > $I/trace
echo 1 > $I/tracing_on
echo "agent $AG"
for f in /proc/$AG/fd/*; do echo "fd ${f##*/} $(readlink $f)"; done
"""
GUEST_TRACE_OFF = """
I=/sys/kernel/tracing/instances/extpv-stages
echo 0 > $I/tracing_on
cat $I/trace
rmdir $I
"""
CPUSET = Path("/sys/fs/cgroup/cpuset")

_LINE = re.compile(
    r"^\s*(?P<task>.+?)-(?P<pid>\d+)\s+\[\d+\].*?\s(?P<ts>\d+\.\d+):\s+"
    r"(?P<ev>\w+)(?P<rest>.*)$"
)
_STAGES = re.compile(
    r"applied seq (?P<seq>\d+) wanted \[(?P<wanted>[^\]]*)\] begun (?P<begun>[\d.]+) "
    r"done (?P<done>[\d.]+) stages (?P<stages>.*)$"
)


@dataclass
class TraceEvent:
    ts: float
    pid: int
    event: str
    text: str


def parse_trace(text: str) -> list[TraceEvent]:
    out = []
    for line in text.splitlines():
        m = _LINE.match(line)
        if m:
            out.append(TraceEvent(float(m["ts"]), int(m["pid"]), m["ev"], m["rest"]))
    return out


def _hexarg(text: str, name: str) -> int | None:
    m = re.search(rf"\b{name}: (?:0x)?([0-9a-f]+)", text)
    return int(m.group(1), 16) if m else None


def _ret(text: str) -> int:
    m = re.search(r"-> (0x[0-9a-f]+|-?\d+)", text)
    if not m:
        return -1
    value = int(m.group(1), 0)
    return value - (1 << 64) if value >= 1 << 63 else value


def split_guest(text: str, agent: int, port_fds: set[int]) -> list[dict[str, float]]:
    """Walk the guest trace in time order, one affinity call at a time."""
    events = parse_trace(text)
    calls: list[dict[str, float]] = []
    read_fd: int | None = None
    for ev in events:
        ret = "->" in ev.text
        if ev.event == "sys_sched_setaffinity" and ev.pid != agent:
            if not ret:
                calls.append({"enter": ev.ts})
            elif calls and "exit" not in calls[-1]:
                calls[-1]["exit"] = ev.ts
            continue
        if ev.pid != agent:
            continue
        if ev.event == "sys_read" and not ret:
            read_fd = _hexarg(ev.text, "fd")
            continue
        if not calls or "exit" not in calls[-1]:
            continue
        call = calls[-1]
        if ev.event == "sys_epoll_wait" and "wake" not in call and _ret(ev.text) > 0:
            call["wake"] = ev.ts
        elif ev.event == "sys_write" and "wake" in call and "frame" not in call:
            if _hexarg(ev.text, "fd") in port_fds:
                call["frame"] = ev.ts
        elif (
            ev.event == "sys_read"
            and ret
            and "frame" in call
            and "result" not in call
            and read_fd in port_fds
            and _ret(ev.text) > 0
        ):
            call["result"] = ev.ts
    return calls


class HostTrace(FtraceInstance):
    """An ftrace instance on this host: pvhost's recvfrom returns and sendto calls."""

    def __init__(self, pid: int) -> None:
        super().__init__(f"extpv-stages-{os.getpid()}", buffer_kb=4096)
        for event in ("sys_exit_recvfrom", "sys_enter_sendto"):
            self.enable(f"syscalls/{event}", f"common_pid == {pid}")
        self.start()


def host_applies(log: str) -> list[dict[str, object]]:
    out = []
    for line in log.splitlines():
        m = _STAGES.search(line)
        if not m:
            continue
        stages = {k: float(v) for k, v in (kv.split("=") for kv in m["stages"].split())}
        out.append({
            "seq": int(m["seq"]), "wanted": m["wanted"], "begun": float(m["begun"]),
            "done": float(m["done"]), "stages_ms": stages,
        })  # fmt: skip
    return out


def summarize(xs: list[float]) -> dict[str, float]:
    return {
        "n": len(xs),
        "p50": round(statistics.median(xs), 2),
        "p99": round(percentile(xs, 99), 2),
        "max": round(max(xs), 2),
    }


STAGE_ROWS = (
    ("g_call", "guest: sched_setaffinity enter → exit (record in the ring buffer)"),
    ("g_wake", "guest: ring buffer → agent woke (epoll_wait returned)"),
    ("g_agent", "guest: agent woke → frame written to the port"),
    ("transit", "transit both ways (QEMU, virtio, sockets) = round trip - host time"),
    ("h_receive", "host: frame received → service took it (decode, session, rate bucket)"),
    ("h_queue", "host: waited for the placement lock"),
    ("h_policy", "host: policy (plan)"),
    ("h_thread", "host: hand-off to the worker thread"),
    ("h_record", "host: state record saved"),
    ("h_isolate", "host: isolate_from cpusets"),
    ("h_cgroup", "host: cgroup writes (pin / undo)"),
    ("h_verify", "host: verify (read the pin back)"),
    ("h_readback", "host: isolation read-back (other tasks' scan)"),
    ("h_other", "host: rest of the change (loop, bookkeeping)"),
    ("h_send", "host: change done → result sent (encode, write)"),
    ("g_roundtrip", "guest: frame written → result read by the agent"),
    ("h_total", "host: frame received → result sent"),
    ("e2e_result", "end to end: call returned → result read by the agent (guest clock)"),
    ("e2e_received", "end to end: call returned → frame received by pvhost (clocks paired)"),
    ("e2e_placed", "end to end: call returned → host placement seen (vm_latency's figure)"),
    ("e2e_isolated", "end to end: call returned → placed and the load's cpuset gave the pCPU up"),
)


def thread_names(pid: int, prefix: str) -> dict[int, str]:
    """tid -> "prefix: comm" for each thread of ``pid`` now."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with suppress(OSError):
            out[int(task.name)] = f"{prefix}: {(task / 'comm').read_text().strip()}"
    return out


def sched_report(sched_rows: dict[str, list[dict[str, float]]]) -> list[str]:
    """The ``--sched-trace`` tables: per thread, ms runnable but waiting for a CPU (and ms
    run) in each part of a change; and the slowest pins' guest parts, who waited most."""
    md = [
        "Host scheduler (`--sched-trace`): per change, ms each thread was runnable but "
        "waiting for a CPU (woken or preempted, on a run queue) or ran, in the guest's part "
        "(guest call → frame received by pvhost: the guest's vCPUs and QEMU's I/O) and "
        "pvhost's part (frame received → change done); load tasks: how many `yes` ran on "
        "the CPU in the guest's part. p50 / p99 / max over the changes (0 where absent).",
        "",
        "| thread, part | pin p50 | pin p99 | pin max | unpin p50 | unpin p99 | unpin max |",
        "|---|---|---|---|---|---|---|",
    ]
    keys = sorted({k for kind in sched_rows.values() for r in kind for k in r})
    for key in keys:
        cells = [key]
        for kind in ("pin", "unpin"):
            xs = [r.get(key, 0.0) for r in sched_rows[kind]]
            s = summarize(xs) if xs else None
            cells += [str(s["p50"]), str(s["p99"]), str(s["max"])] if s else ["-"] * 3
        md.append("| " + " | ".join(cells) + " |")
    span = "guest part (call → frame received on the host)"
    slow = sorted(sched_rows["pin"], key=lambda r: -r.get(span, 0.0))[:8]
    md += ["", "Slowest pins, guest part: ms, and the three longest waits in it.", ""]
    for r in slow:
        waits = sorted(
            ((v, k) for k, v in r.items() if ", waited: " in k and k.startswith("guest")),
            reverse=True,
        )[:3]
        loads = ", ".join(f"{k.rsplit(' ', 1)[1]}: {v:.0f}" for k, v in r.items() if "load" in k)
        md.append(
            f"* {r.get(span, 0.0):.1f} ms — "
            + "; ".join(f"{k.split(': ', 1)[1]} {v:.1f}" for v, k in waits)
            + f" (load tasks per CPU {loads})"
        )
    return md


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--cycles", type=int, default=100, help="pin/unpin cycles (default 100)")
    ap.add_argument("--hold", type=float, default=0.4, help="seconds between changes")
    ap.add_argument("--load", type=int, default=0, help="yes processes on the host meanwhile")
    ap.add_argument("--label", default="", help="what this run is (in the report)")
    ap.add_argument(
        "--cgroup1-mode",
        choices=("move", "resident"),
        default="resident",
        help="[placement] cgroup1_mode of pvhost (cgroup v1 hosts; default: pvhost's)",
    )
    ap.add_argument(
        "--qemu-nice",
        type=int,
        default=None,
        help="QEMU's nice value (pvctl vm start --nice; docs/vm-priority.md); default: ours",
    )
    ap.add_argument(
        "--pvhost-nice",
        type=int,
        default=None,
        help="pvhost's nice value, in a session of its own (as a unit's Nice= gives it); "
        "default: the bench's session and priority",
    )
    ap.add_argument(
        "--isolate-load",
        action="store_true",
        help="run the load in a cpuset of ours named in pvhost's [placement] isolate_from "
        "(cgroup v1: the pinned pCPU is taken from the load; without: restricted)",
    )
    ap.add_argument(
        "--sched-trace",
        action="store_true",
        help="also record the host scheduler's events for QEMU's and pvhost's threads and the "
        "load (bench/sched_trace.py): per change, who waited for a CPU between the guest's "
        "call and the host's placement",
    )
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "vm-stages")
    args = ap.parse_args()

    image = ensure_test_image()
    run = Path("/run/extpv-bench") / str(os.getpid())
    runtime = run / "vms"
    runtime.mkdir(parents=True, exist_ok=True)
    load: list[subprocess.Popen[bytes]] = []
    load_cpuset = CPUSET / f"extpv-bench-load-{os.getpid()}" if args.isolate_load else None
    config = f'cgroup1_mode = "{args.cgroup1_mode}"\n'
    if load_cpuset is not None:
        load_cpuset.mkdir()
        (load_cpuset / "cpuset.mems").write_text((CPUSET / "cpuset.mems").read_text())
        (load_cpuset / "cpuset.cpus").write_text((CPUSET / "cpuset.cpus").read_text())
        config += f'isolate_from = ["/{load_cpuset.name}"]\n'
    vm = start(
        VMSpec(
            name="bench",
            image=image.path,
            smp=2,
            runtime_dir=runtime,
            test_hook=True,
            nice=args.qemu_nice,
        )
    )
    daemon = PvhostDaemon(
        run,
        runtime,
        image.signing_key,
        verbose=True,
        extra_config=config,
        nice=args.pvhost_nice,
    )
    host_trace: HostTrace | None = None
    poller: Poller | None = None
    sched: SchedTrace | None = None
    sched_text = ""
    sched_names: dict[int, str] = {}
    state = ExitStack()
    try:
        # pvhost's state directory on a tmpfs, as /run/extpv/state is on a real host.
        state.enter_context(state_tmpfs(daemon.state_dir))
        daemon.start()
        daemon.wait_status(
            "the affinity program loaded",
            lambda s: s["vms"]["bench"]["programs"] == {"affinity": "loaded"},
            180,
        )
        assert daemon.proc is not None
        tid = vm.vcpu_threads()[1].tid
        setup = vm.guest(GUEST_TRACE_ON, timeout_s=60).check().stdout
        agent = int(re.search(r"^agent (\d+)", setup, re.M).group(1))  # type: ignore[union-attr]
        port_fds = {int(m.group(1)) for m in re.finditer(r"^fd (\d+) /dev/vport\S+$", setup, re.M)}
        load = yes_load(args.load, load_cpuset)
        time.sleep(1.0 if args.load else 0)
        off0, err0 = vm.clock_offset()
        host_rm = time.time() - time.monotonic()
        host_trace = HostTrace(daemon.proc.pid)
        # With the load in isolate_from, the poller also watches its cpuset: when the pinned
        # pCPU is the guest's alone, not only the thread confined to it.
        poller = Poller(tid, load_cpuset / "cpuset.cpus" if load_cpuset is not None else None)
        if args.sched_trace:
            sched_names = {
                **thread_names(vm.pid, "qemu"),
                **thread_names(daemon.proc.pid, "pvhost"),
                poller.proc.pid: "poller",  # the instrument: does it wait to see a change?
            }
            sched = SchedTrace([*sched_names, *(p.pid for p in load)])
        stdout, changes = run_cycler(
            vm.guest, tid, CYCLER, args.cycles, args.hold, slack_s=180.0, poller=poller
        )
        host_text = host_trace.stop()
        if sched is not None:
            sched_text = sched.stop()
        off1, err1 = vm.clock_offset()
        guest_text = vm.guest(GUEST_TRACE_OFF, timeout_s=120).check().stdout
        backend = daemon.status()["backend"]
    finally:
        if poller is not None and poller.proc.poll() is None:
            poller.stop()  # its own session: nothing else ends it when a step above failed
        stop_all(load)
        if host_trace is not None:
            host_trace.close()
        if sched is not None:
            sched.close()
        vm.stop()
        log = daemon.log.read_text(errors="replace") if daemon.log.exists() else ""
        daemon.close()
        state.close()
        shutil.rmtree(run, ignore_errors=True)
        if load_cpuset is not None:
            load_cpuset.rmdir()

    out = json.loads(stdout)
    events = out["events"]
    offset = (off0 + off1) / 2
    error = max(err0, err1) + abs(off1 - off0) / 2
    # The cycler's realtime clock is read after the call: back to the call's start by the
    # monotonic span around it.
    made = [(k, t, t - (t1 - t0)) for k, t, t0, t1 in events]
    lat, missed = match_events(made, changes, offset, error)
    isolated: list[float] = []
    if load_cpuset is not None:
        pins = [e for e in made if e[0] == "pin"]
        isolated = match_events(pins, isolated_changes(poller.samples), offset, error)[0]["pin"]

    def to_host_mono(g_mono: float) -> float:
        return g_mono + out["rm"] - offset - host_rm

    calls = split_guest(guest_text, agent, port_fds)
    applies = host_applies(log)
    host_events = parse_trace(host_text)
    recvs = [e.ts for e in host_events if e.event == "sys_recvfrom" and _ret(e.text) > 0]
    sends = [e.ts for e in host_events if e.event == "sys_sendto"]
    rows: dict[str, dict[str, list[float]]] = {"pin": {}, "unpin": {}}
    sched_rows: dict[str, list[dict[str, float]]] = {"pin": [], "unpin": []}
    sched_events = parse_sched(sched_text)
    load_pids = {p.pid for p in load}
    unmatched = 0
    for (kind, _real, _t0, _t1), call in zip(events, calls, strict=False):
        if not {"enter", "exit", "wake", "frame", "result"} <= call.keys():
            unmatched += 1
            continue
        h_frame = to_host_mono(call["frame"])
        h_result = to_host_mono(call["result"])
        apply = next(
            (a for a in applies if h_frame - 0.005 <= a["begun"] <= h_result + 0.005), None
        )  # type: ignore[operator]
        if apply is None:
            unmatched += 1
            continue
        begun, done = float(apply["begun"]), float(apply["done"])  # type: ignore[arg-type]
        recv = max((t for t in recvs if t <= begun), default=None)
        sent = min((t for t in sends if t >= done), default=None)
        if recv is None or sent is None:
            unmatched += 1
            continue
        stages: dict[str, float] = apply["stages_ms"]  # type: ignore[assignment]
        ms = 1000.0
        roundtrip = (call["result"] - call["frame"]) * ms
        host_total = (sent - recv) * ms
        row = {
            "g_call": (call["exit"] - call["enter"]) * ms,
            "g_wake": (call["wake"] - call["exit"]) * ms,
            "g_agent": (call["frame"] - call["wake"]) * ms,
            "transit": roundtrip - host_total,
            "h_receive": (begun - recv) * ms,
            **{f"h_{k}": v for k, v in stages.items()},
            "h_other": (done - begun) * ms - sum(stages.values()),
            "h_send": (sent - done) * ms,
            "g_roundtrip": roundtrip,
            "h_total": host_total,
            "e2e_result": (call["result"] - call["exit"]) * ms,
            # Clocks paired (± the offset's error): the instrument-free half of "placed".
            "e2e_received": (recv - to_host_mono(call["exit"])) * ms,
        }
        for key, value in row.items():
            rows[kind].setdefault(key, []).append(value)
        if sched_events:
            # The guest's part (call → frame received on the host) and the host's (frame
            # received → change done): who waited for a CPU in each.
            guest_part = window_waits(
                sched_events, to_host_mono(call["enter"]), recv, sched_names, load_pids
            )
            host_part = window_waits(sched_events, recv, done, sched_names, load_pids)
            sched_rows[kind].append({
                "guest part (call → frame received on the host)": (
                    recv - to_host_mono(call["enter"])
                ) * ms,
                **{f"guest part, waited: {k}": v for k, v in guest_part.waited_ms.items()},
                **{f"guest part, ran: {k}": v for k, v in guest_part.ran_ms.items()},
                **{f"host part, waited: {k}": v for k, v in host_part.waited_ms.items()},
                **{f"guest part, load tasks on CPU {c}": float(n)
                   for c, n in guest_part.load_on_cpu.items()},
            })  # fmt: skip
    for kind, cols in rows.items():
        cols["e2e_placed"] = lat[kind]
    if isolated:
        rows["pin"]["e2e_isolated"] = isolated
    summary = {
        "what": "per-stage time of a guest pin/unpin (guest and host clocks kept apart)",
        "label": args.label,
        "cycles": args.cycles,
        "load_yes_processes": args.load,
        "unmatched": unmatched,
        "missed_placements": missed,
        "accel": vm.accel,
        "backend": backend,
        "cgroup1_mode": args.cgroup1_mode,
        "qemu_nice": args.qemu_nice,
        "pvhost_nice": args.pvhost_nice,
        "load_in_isolate_from": args.isolate_load,
        "state_dir": "tmpfs (bench/state_tmpfs.py)",
        "host": platform.node(),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "clock_offset_error_ms": round(error * 1000, 2),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "stages_ms": {
            kind: {k: summarize(v) for k, v in cols.items() if v} for kind, cols in rows.items()
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(
        json.dumps({**summary, "samples_ms": rows, "sched_ms": sched_rows}, indent=1) + "\n"
    )
    md = [
        f"# Stages of a guest pin ({summary['date']}{', ' + args.label if args.label else ''})",
        "",
        f"{args.cycles} pin/unpin cycles, {args.load} `yes` processes on the host; "
        f"{unmatched} changes not paired, {missed} placements not seen; "
        "pvhost's state directory on a tmpfs. "
        "ms; p50 / p99 / max.",
        "",
        "| stage | pin p50 | pin p99 | pin max | unpin p50 | unpin p99 | unpin max |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, what in STAGE_ROWS:
        cells = [what]
        for kind in ("pin", "unpin"):
            s = summary["stages_ms"][kind].get(key)  # type: ignore[index]
            cells += [str(s["p50"]), str(s["p99"]), str(s["max"])] if s else ["-"] * 3
        md.append("| " + " | ".join(cells) + " |")
    md += [
        "",
        f"Setup: accel {summary['accel']}, host kernel {summary['kernel']}, {summary['cpus']} "
        f"CPUs ({summary['host']}); guest: test image, -smp 2; pvhost identity policy, backend "
        f"{backend} (cgroup1_mode {args.cgroup1_mode}"
        f"{'; the load in an isolate_from cpuset' if args.isolate_load else ''}"
        f"{f'; QEMU at nice {args.qemu_nice}' if args.qemu_nice is not None else ''}"
        f"{f'; pvhost at nice {args.pvhost_nice}' if args.pvhost_nice is not None else ''}). "
        "Guest stages on the guest's "
        "CLOCK_MONOTONIC (ftrace in the guest), host "
        "stages on the host's (ftrace on pvhost's socket calls, `pvhost -v` stage lines); "
        "the transit is the guest's round trip minus the host's time, never a difference of "
        f"the two clocks (those pair events only: ±{summary['clock_offset_error_ms']} ms).",
        "",
        f"Raw samples: `{args.out.name}.json`. Reproduce: "
        f"`sudo .venv/bin/python bench/vm_stages.py --cycles {args.cycles} --load {args.load} "
        f"--cgroup1-mode {args.cgroup1_mode}"
        f"{' --isolate-load' if args.isolate_load else ''}"
        f"{f' --qemu-nice {args.qemu_nice}' if args.qemu_nice is not None else ''}"
        f"{f' --pvhost-nice {args.pvhost_nice}' if args.pvhost_nice is not None else ''}"
        f"{' --sched-trace' if args.sched_trace else ''}`.",
    ]
    if any(sched_rows.values()):
        md += ["", *sched_report(sched_rows)]
    args.out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0 if unmatched <= args.cycles // 10 else 1


if __name__ == "__main__":
    sys.exit(main())
