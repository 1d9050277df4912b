#!/usr/bin/env python3
# Copyright extpv developers. Licensed under the Apache License, Version 2.0.
"""The appliance's demo: a guest pins its threads, and the host's vCPU threads follow.

Boots one VM wired to pvhost (the VM lab ``vmlab`` behind ``pvctl vm start``, with the test
images' command hook), starts a host load (4 x CPUs ``yes``, in a cpuset of the demo's own on a
cgroup v1 host, which pvhost's ``placement.isolate_from`` may name), runs the SPSC queue workload
in the guest with its producer and consumer pinned to two vCPUs, and watches the host while it
runs: the allowed CPUs of QEMU's vCPU threads (``/proc/<qemu>/task/<tid>/status``), their CPU
time (``…/schedstat``) before the guest's pin (the guest busy, unpinned) and while it holds, and
``pvctl status --json`` from pvhost's container (each pin's isolation, read back by pvhost).
Prints the placement, the CPU share, the isolation and the throughput; exits 1 when no guest pin
reached the host. The VM and the load are stopped at the end, whatever happened (Ctrl-C too).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

PROG = "extpv-demo"
#: The v1 cpuset hierarchy, and the demo load's cpuset in it (name it in isolate_from).
CPUSET = Path("/sys/fs/cgroup/cpuset")
LOAD_CPUSET = "extpv-demo-load"

try:
    import vmlab
    from extpv.cli import die
except ImportError:  # pragma: no cover - depends on the environment
    sys.exit(
        f"{PROG}: vmlab (extpv's VM lab) is not importable\n"
        "hint: run with the extpv virtualenv's python"
    )


def allowed_cpus(qemu_pid: int, tid: int) -> str:
    """The thread's allowed CPU list as the kernel reports it (cpuset and affinity combined)."""
    try:
        status = Path(f"/proc/{qemu_pid}/task/{tid}/status").read_text()
    except OSError:
        return "?"
    match = re.search(r"^Cpus_allowed_list:\s*(\S+)", status, re.MULTILINE)
    return match.group(1) if match else "?"


def run_ns(qemu_pid: int, tid: int) -> int | None:
    """The thread's CPU time so far (the first field of its schedstat), None once gone."""
    try:
        return int(Path(f"/proc/{qemu_pid}/task/{tid}/schedstat").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def shares(qemu_pid: int, threads: dict[int, int], seconds: float) -> dict[int, float]:
    """The fraction of one CPU each vCPU thread got over ``seconds`` of wall time."""
    t0, before = time.monotonic_ns(), {v: run_ns(qemu_pid, t) for v, t in threads.items()}
    time.sleep(seconds)
    wall = time.monotonic_ns() - t0
    out = {}
    for vcpu, tid in threads.items():
        now, then = run_ns(qemu_pid, tid), before[vcpu]
        if now is not None and then is not None:
            out[vcpu] = (now - then) / wall
    return out


def _cpu_set(text: str) -> set[int]:
    out: set[int] = set()
    for part in filter(None, text.strip().split(",")):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


def shared_cpus() -> str:
    """The root cpuset's CPUs but those of exclusive top-level cpusets (such as extpv's own
    when the kernel let pvhost make it exclusive): v1 refuses a sibling that overlaps them."""
    cpus = _cpu_set((CPUSET / "cpuset.cpus").read_text())
    for child in CPUSET.iterdir():
        flag = child / "cpuset.cpu_exclusive"
        if child.is_dir() and flag.exists() and flag.read_text().strip() == "1":
            cpus -= _cpu_set((child / "cpuset.cpus").read_text())
    return ",".join(str(c) for c in sorted(cpus))


class YesLoad:
    """``count`` ``yes`` processes, each in its own session (with autogroup scheduling a group
    of them would count as one task against a vCPU), in the cpuset ``LOAD_CPUSET`` on a cgroup
    v1 host. A cpuset the demo creates it removes again; one that was there (made for pvhost's
    ``isolate_from``) it leaves."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.procs: list[subprocess.Popen[bytes]] = []
        self.cpuset: Path | None = None
        self.created = False

    def start(self) -> None:
        if (CPUSET / "cpuset.cpus").exists():
            self.cpuset = CPUSET / LOAD_CPUSET
            if not self.cpuset.is_dir():
                self.cpuset.mkdir()
                self.created = True
            # A new cpuset (also one made by hand for isolate_from) holds no task until it has
            # mems and cpus; one pvhost has shrunk already keeps what it has.
            if not (self.cpuset / "cpuset.mems").read_text().strip():
                (self.cpuset / "cpuset.mems").write_text((CPUSET / "cpuset.mems").read_text())
            if not (self.cpuset / "cpuset.cpus").read_text().strip():
                (self.cpuset / "cpuset.cpus").write_text(shared_cpus())
        for _ in range(self.count):
            proc = subprocess.Popen(["yes"], stdout=subprocess.DEVNULL, start_new_session=True)
            self.procs.append(proc)
            if self.cpuset is not None:
                (self.cpuset / "tasks").write_text(str(proc.pid))

    def describe(self) -> str:
        where = f" in cpuset /{LOAD_CPUSET}" if self.cpuset is not None else ""
        return f"{self.count} `yes` processes (4 x {self.count // 4} CPUs){where}"

    def stop(self) -> None:
        for proc in self.procs:
            proc.kill()
            proc.wait()
        self.procs = []
        if self.cpuset is not None and self.created and self.cpuset.is_dir():
            for tid in (self.cpuset / "tasks").read_text().split():
                (CPUSET / "tasks").write_text(tid)
            self.cpuset.rmdir()


def pvctl_status(container: str) -> Any:
    res = subprocess.run(
        ["podman", "exec", container, "pvctl", "status", "--json"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if res.returncode != 0:
        return {"error": res.stderr.strip()[-500:] or f"exit {res.returncode}"}
    try:
        return json.loads(res.stdout)
    except ValueError:
        return {"error": "pvctl status --json printed no JSON", "output": res.stdout[-500:]}


def pvhost_view(container: str, vm: str) -> str:
    """What pvhost says about the demo VM (its session, programs, last request and result)
    and the last lines of its log that name the VM: a failed demo explains itself."""
    status = pvctl_status(container)
    mine = status.get("vms", {}).get(vm) if isinstance(status, dict) else None
    keys = ("qmp", "channel", "session", "resets", "guest", "programs", "last_seq", "result")
    seen = {k: mine.get(k) for k in keys} if isinstance(mine, dict) else status
    try:
        res = subprocess.run(
            ["podman", "logs", "--tail", "400", container],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        lines = [line for line in (res.stdout + res.stderr).splitlines() if vm in line][-25:]
    except (OSError, subprocess.TimeoutExpired) as err:
        lines = [f"(podman logs failed: {err})"]
    return (
        f"pvhost's status of {vm}: {json.dumps(seen, default=str)}\n"
        f"pvhost's log about {vm} (last {len(lines)} lines):\n" + "\n".join(lines)
    )


def wait_for_program(args: argparse.Namespace, *, deadline_s: float) -> float:
    """Seconds until pvhost reports the VM's affinity program loaded by its guest agent;
    exits with pvhost's view of the VM when that does not happen within ``deadline_s``."""
    t0 = time.monotonic()
    while True:
        status = pvctl_status(args.container)
        mine = status.get("vms", {}).get(args.name, {}) if isinstance(status, dict) else {}
        if isinstance(mine, dict) and mine.get("programs", {}).get("affinity") == "loaded":
            return time.monotonic() - t0
        if time.monotonic() - t0 > deadline_s:
            die(
                PROG,
                f"the guest agent did not load pvhost's affinity program within {deadline_s:.0f} s"
                " of the boot\n" + pvhost_view(args.container, args.name),
                "check the guest's `journalctl -u pvagent` (console: `pvctl vm console "
                f"{args.name}`) and `podman logs {args.container}`",
            )
        time.sleep(2)


class Watcher(threading.Thread):
    """Samples the vCPU threads' allowed CPUs until stopped; keeps what differed from baseline."""

    def __init__(self, qemu_pid: int, threads: dict[int, int], baseline: dict[int, str]) -> None:
        super().__init__(daemon=True)
        self.qemu_pid, self.threads, self.baseline = qemu_pid, threads, baseline
        self.pinned: dict[int, str] = {}
        self.first_pin_s: float | None = None
        self.started = time.monotonic()
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.wait(0.1):
            for vcpu, tid in self.threads.items():
                now = allowed_cpus(self.qemu_pid, tid)
                if now not in ("?", self.baseline[vcpu]):
                    self.pinned[vcpu] = now
                    if self.first_pin_s is None:
                        self.first_pin_s = time.monotonic() - self.started


def spscq(vm: Any, args: argparse.Namespace, duration: int, hold: int = 0) -> dict[str, Any]:
    argv = [
        "spscq",
        f"--producer-cpu={args.producer_cpu}",
        f"--consumer-cpu={args.consumer_cpu}",
        f"--duration={duration}",
        f"--hold={hold}",
        "--json",
    ]
    res = vm.guest(argv, timeout_s=duration + hold + 60).check()
    return json.loads(res.stdout)


def _cpus(cpus: list[int]) -> str:
    return ",".join(str(c) for c in cpus) if cpus else "none"


def capacity_line(status: dict[str, Any], wanted: int) -> str | None:
    """Why pvhost can pin fewer vCPUs than the guest asks for on this host, when it can."""
    host = status.get("host")
    if not isinstance(host, dict):
        return None
    eligible = list(host.get("eligible", []))
    line = (
        f"host CPUs: online {_cpus(host.get('online', []))}, housekeeping "
        f"{_cpus(host.get('housekeeping', []))} (kept for the host), eligible {_cpus(eligible)}"
    )
    if len(eligible) < wanted:
        line += (
            f": at most {len(eligible)} of the {wanted} vCPUs the guest pins can be pinned on "
            "this host, so a refusal below is expected (more host CPUs, or fewer housekeeping "
            "CPUs with -e pvhost_housekeeping_cpus=..., pin both)"
        )
    return line


def summarize(
    args: argparse.Namespace,
    *,
    accel: str,
    boot_s: float,
    agent_s: float,
    baseline: dict[int, str],
    placement: dict[str, str],
    after: dict[int, str],
    result: dict[str, Any],
    status: dict[str, Any],
    load: str = "",
    share_before: dict[int, float] | None = None,
    share_pinned: dict[int, float] | None = None,
) -> list[str]:
    """What the demo showed, line by line: every refusal with its reason, for each pinned vCPU
    its CPU share under the load before the pin and while it held with the pin's isolation
    (and why it is not isolated), and a closing line."""
    mpps = result.get("mpps")
    vm_status = status.get("vms", {}).get(args.name, {})
    summary = [
        f"VM {args.name}: {args.smp} vCPUs, {accel}, booted in {boot_s:.0f} s, pvhost's program "
        f"loaded by the guest agent {agent_s:.0f} s after the start",
        f"guest: spscq producer on vCPU {args.producer_cpu}, consumer on vCPU {args.consumer_cpu}",
    ]
    capacity = capacity_line(status, wanted=2)
    if capacity:
        summary.append(capacity)
    summary += [
        "host placement while pinned: "
        + ", ".join(f"{k} -> pCPU {v}" for k, v in placement.items())
        + f" (before: {', '.join(f'vcpu{k} {v}' for k, v in sorted(baseline.items()))})",
        f"throughput: {mpps} Mpps over {args.duration} s"
        if mpps is not None
        else f"throughput: {result}",
        *share_lines(
            vm_status,
            placement=placement,
            baseline=baseline,
            load=load,
            before=share_before,
            pinned=share_pinned,
            mpps=mpps,
        ),
        f"after the workload exited: {', '.join(f'vcpu{k} {v}' for k, v in sorted(after.items()))}",
        f"pvhost's answer to the guest (pvctl status): {json.dumps(vm_status.get('result'))}",
    ]
    # Every vCPU the guest asked for and did not get, with pvhost's reason (which says what
    # to change): a refusal is part of what the demo shows, never left unexplained.
    for placed in vm_status.get("result") or []:
        if placed.get("refused"):
            summary.append(f"vCPU {placed['vcpu']} was not pinned: {placed['refused']}")
    pinned = sorted(v for v, p in placement.items() if p != baseline[int(v[4:])])
    summary.append(
        "shown: the guest's sched_setaffinity reached the host as a cpuset placement of "
        + (", ".join(pinned) if pinned else "no vCPU")
        + ", and was undone when the workload exited"
        if after == baseline
        else "shown: the guest's pins reached the host; NOT undone after the workload exited"
    )
    return summary


def _pct(share: float | None) -> str:
    return "?" if share is None else f"{share:.0%}"


def share_lines(
    vm_status: dict[str, Any],
    *,
    placement: dict[str, str],
    baseline: dict[int, str],
    load: str,
    before: dict[int, float] | None,
    pinned: dict[int, float] | None,
    mpps: Any,
) -> list[str]:
    """Per pinned vCPU: its CPU share under the load before the pin and while it held, beside
    the throughput, and what pvhost read back the pin achieved (isolated, or restricted: why)."""
    lines = [f"host load: {load}"] if load else []
    placed = vm_status.get("placements") or {}
    for name, cpus in placement.items():
        vcpu = int(name[4:])
        if cpus == baseline.get(vcpu):
            continue  # not pinned
        lines.append(
            f"{name} CPU share under the load: {_pct((before or {}).get(vcpu))} before the "
            f"guest's pin, {_pct((pinned or {}).get(vcpu))} while pinned to pCPU {cpus} "
            f"(throughput {mpps} Mpps)"
        )
        info = placed.get(str(vcpu)) or {}
        isolation = info.get("isolation")
        if isolation == "isolated":
            lines.append(f"{name} isolation: isolated (no other task may run on pCPU {cpus})")
        elif isolation:
            lines.append(f"{name} isolation: {isolation}: {info.get('isolation_reason')}")
        else:
            lines.append(f"{name} isolation: unknown (pvhost's status did not say)")
    return lines


def run_demo(args: argparse.Namespace) -> dict[str, Any]:
    spec = vmlab.VMSpec(
        name=args.name,
        image=Path(args.image),
        smp=args.smp,
        memory_mib=args.memory,
        runtime_dir=Path(args.runtime_dir),
        test_hook=True,
    )
    load = YesLoad(4 * len(os.sched_getaffinity(0)))
    t0 = time.monotonic()
    vm = vmlab.start(spec, deadline_s=args.boot_timeout)
    try:
        boot_s = time.monotonic() - t0
        # vCPU index -> host thread id, as QEMU reports it on the lab's own monitor.
        threads = {index: thread.tid for index, thread in vm.vcpu_threads().items()}
        if len(threads) != args.smp:
            die(PROG, f"found {len(threads)} vCPU threads in QEMU {vm.pid}, expected {args.smp}")
        baseline = {vcpu: allowed_cpus(vm.pid, tid) for vcpu, tid in threads.items()}
        # The host load starts once the guest agent has loaded pvhost's program: under it a
        # TCG guest's agent takes a minute or more to start (Python, then the verifier), and
        # only then can a pin be seen at all.
        agent_s = wait_for_program(args, deadline_s=args.agent_timeout) + boot_s
        load.start()
        # Before any pin: the guest keeps every vCPU busy without pinning anything.
        busy = f"for i in $(seq {args.smp}); do timeout 6 sh -c 'while :; do :; done' & done; wait"
        guest_busy = threading.Thread(target=lambda: vm.guest(busy, timeout_s=60), daemon=True)
        guest_busy.start()
        time.sleep(1)
        share_before = shares(vm.pid, threads, 4)
        guest_busy.join(timeout=60)

        # pvhost connects, injects the affinity program and the agent loads it: short pinned
        # runs until the host shows a pin (a run before the program is loaded goes unseen).
        probe = Watcher(vm.pid, threads, baseline)
        probe.start()
        deadline = time.monotonic() + args.pin_timeout
        while not probe.pinned and time.monotonic() < deadline:
            spscq(vm, args, duration=1, hold=2)
        probe.halt.set()
        probe.join()
        if not probe.pinned:
            die(
                PROG,
                f"no guest pin reached the host within {args.pin_timeout} s "
                f"(vCPU threads' allowed CPUs stayed {baseline})\n"
                + pvhost_view(args.container, args.name),
                f"check `podman logs {args.container}` and `pvctl status` in the container",
            )

        watch = Watcher(vm.pid, threads, baseline)
        watch.start()
        status_box: dict[str, Any] = {}

        def sample_status() -> None:
            time.sleep(1)
            status_box["share"] = shares(vm.pid, threads, max(min(args.duration - 3, 5), 1))
            status_box["status"] = pvctl_status(args.container)

        sampler = threading.Thread(target=sample_status, daemon=True)
        sampler.start()
        result = spscq(vm, args, duration=args.duration)
        sampler.join(timeout=35)
        watch.halt.set()
        watch.join()
        time.sleep(1)
        after = {vcpu: allowed_cpus(vm.pid, tid) for vcpu, tid in threads.items()}
    finally:
        load.stop()
        vm.stop()

    placement = {f"vcpu{v}": watch.pinned.get(v, baseline[v]) for v in sorted(threads)}
    status = status_box.get("status") or {}
    summary = summarize(
        args,
        accel=vm.accel,
        boot_s=boot_s,
        agent_s=agent_s,
        baseline=baseline,
        placement=placement,
        after=after,
        result=result,
        status=status if isinstance(status, dict) else {},
        load=load.describe(),
        share_before=share_before,
        share_pinned=status_box.get("share"),
    )
    return {
        "summary": summary,
        "boot_s": round(boot_s, 1),
        "agent_ready_s": round(agent_s, 1),
        "first_pin_s": probe.first_pin_s,
        "baseline": baseline,
        "placement": placement,
        "after": after,
        "spscq": result,
        "share_before": share_before,
        "share_pinned": status_box.get("share"),
        "pvhost_status": status_box.get("status"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--name", default="extpv-demo", help="VM name (default %(default)s)")
    ap.add_argument("--image", required=True, help="guest image directory (<out>/<variant>)")
    ap.add_argument("--smp", type=int, default=2, help="vCPUs (default %(default)s)")
    ap.add_argument("--memory", type=int, default=1024, help="MiB (default %(default)s)")
    ap.add_argument("--producer-cpu", type=int, default=0, help="guest vCPU of the producer")
    ap.add_argument("--consumer-cpu", type=int, default=1, help="guest vCPU of the consumer")
    ap.add_argument("--duration", type=int, default=10, help="workload seconds")
    ap.add_argument("--boot-timeout", type=float, default=300, help="boot deadline, s")
    ap.add_argument(
        "--agent-timeout",
        type=float,
        default=240,
        help="deadline for the guest agent to load pvhost's program after the boot, s",
    )
    ap.add_argument(
        "--pin-timeout",
        type=float,
        default=60,
        help="deadline for the first pin once the program is loaded, s",
    )
    ap.add_argument("--container", default="pvhost", help="pvhost's container")
    ap.add_argument("--runtime-dir", default="/run/extpv/vms", help="VM runtime directory")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()
    # SIGTERM (ansible's timeout, a service manager) unwinds like Ctrl-C: the load and the VM stop.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        report = run_demo(args)
    except vmlab.LauncherError as err:
        die(PROG, str(err))
    print(json.dumps(report, indent=2) if args.json else "\n".join(report["summary"]))


if __name__ == "__main__":
    main()
