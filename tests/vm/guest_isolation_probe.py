"""Runs INSIDE the test guest (-smp 4, cgroup v2 with cpuset) acting as a host: isolation
proven with a real load, and (on kernels with local partitions only) the chain's edge cases.

The cgroup v2 backend is driven as the daemon drives it (``setup``, ``attach``, ``pin``,
``unpin``, ``reconcile`` after a restart, ``teardown``), against the guest's real
``/sys/fs/cgroup``. A "VM" is a process of ours: one thread spins (what a running vCPU thread
does), the others wait. The load is 4 x CPUs ``yes`` processes, each in its own session, in
the probe's own cgroup (the rest of the host). The kernel's own accounting decides:
``/proc/<pid>/stat`` (CPU each task last ran on), ``/proc/<tid>/schedstat`` (run time).

Prints one JSON object; tests/vm/test_2c_isolation_in_guest.py asserts on it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, os.environ.get("EXTPV_SRC", "/mnt/extpv"))

from pvhost.placement import chain
from pvhost.placement.cgroup2 import Cgroup2Backend
from pvproto import parse_cpulist
from tests.faultpoints import killed_before_write

ROOT = Path("/sys/fs/cgroup")
VM = "spin"
# CPU 0 stays the host's housekeeping CPU; the rest may be pinned.
POOL = frozenset(range(1, os.cpu_count() or 1))
PCPU = 1

FAKE_QEMU = """
import os, sys, threading
def spin():
    while True:
        pass
ready = []
def wait():
    ready.append(threading.get_native_id())
    threading.Event().wait()
threads = [threading.Thread(target=spin, daemon=True)]
threads += [threading.Thread(target=wait, daemon=True) for _ in range(2)]
tids = []
for t in threads:
    t.start()
    tids.append(t.native_id)
print(" ".join(map(str, tids)), flush=True)
sys.stdin.read()
"""


def read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def allowed(tid: int) -> str | None:
    for line in (read(Path(f"/proc/{tid}/status")) or "").splitlines():
        if line.startswith("Cpus_allowed_list:"):
            return line.split(":", 1)[1].strip()
    return None


def last_cpu(pid: int) -> int | None:
    stat = read(Path(f"/proc/{pid}/stat"))
    return None if stat is None else int(stat.rsplit(")", 1)[1].split()[36])


def run_ns(tid: int) -> int:
    return int(Path(f"/proc/{tid}/schedstat").read_text().split()[0])


def share(tid: int, seconds: float = 2.0) -> float:
    """The fraction of one CPU ``tid`` got over ``seconds`` of wall time."""
    t0, r0 = time.monotonic_ns(), run_ns(tid)
    time.sleep(seconds)
    return (run_ns(tid) - r0) / (time.monotonic_ns() - t0)


def load_on(pids: list[int], cpus: set[int], seconds: float = 1.5) -> int:
    """Samples (every 10 ms) that found a load process last running on one of ``cpus``."""
    hits, end = 0, time.monotonic() + seconds
    while time.monotonic() < end:
        hits += sum(last_cpu(p) in cpus for p in pids)
        time.sleep(0.01)
    return hits


def fake_vm() -> tuple[subprocess.Popen[str], dict[int, int]]:
    """A process standing in for QEMU: vCPU 0 spins, vCPUs 1 and 2 wait."""
    proc = subprocess.Popen(
        [sys.executable, "-c", FAKE_QEMU], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    tids = [int(t) for t in proc.stdout.readline().split()]
    return proc, dict(enumerate(tids))


def snapshot(b: Cgroup2Backend, pid: int, tids: dict[int, int]) -> dict[str, Any]:
    """Every cpuset and partition of ours, the root's CPUs, every thread's affinity, pins."""
    vm_dir = b.base / f"vm-{VM}"
    out: dict[str, Any] = {
        "root_effective": read(ROOT / "cpuset.cpus.effective"),
        "pins": {vm: {str(v): p for v, p in pins.items()} for vm, pins in b.pins().items()},
        "allowed": {str(v): allowed(t) for v, t in tids.items()},
        "emulator_allowed": allowed(pid),
    }
    for name, d in [("slice", b.base), ("vm", vm_dir)] + [
        (f"vcpu{v}", vm_dir / f"vcpu{v}") for v in tids
    ]:
        # A member's own CPUs are whatever makes it inherit (empty, or every CPU once it was
        # populated: see chain.release_cpus); what it may run on shows in the allowed lists.
        part = read(d / "cpuset.cpus.partition")
        out[name] = f"{read(d / 'cpuset.cpus') if part != 'member' else '*'}|{part}"
    return out


def recorded_writes(operation: Callable[[], object]) -> list[Path]:
    """The cgroupfs writes ``operation`` makes through the chain's writer, in order."""
    real, seen = chain.write_text, []

    def record(path: Path, value: str) -> None:
        seen.append(path)
        real(path, value)

    chain.write_text = record  # type: ignore[assignment]
    try:
        operation()
    finally:
        chain.write_text = real  # type: ignore[assignment]
    return seen


def main() -> None:
    obs: dict[str, Any] = {"errors": {}}

    def step(name: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception as err:
            obs["errors"][name] = f"{type(err).__name__}: {err}\n{traceback.format_exc()[-1500:]}"
            return None

    vm, tids = fake_vm()
    spinner = tids[0]
    yes: list[subprocess.Popen[bytes]] = []
    tmp = tempfile.mkdtemp()
    state = Path(tmp) / "state.json"
    b = Cgroup2Backend(ROOT, state)
    try:
        obs["before"] = {"root_effective": read(ROOT / "cpuset.cpus.effective"),
                         "allowed": {str(v): allowed(t) for v, t in tids.items()},
                         "emulator_allowed": allowed(vm.pid)}  # fmt: skip
        step("setup", lambda: b.setup(POOL))
        obs["mode"] = b.mode
        obs["summary"] = b.isolation_summary()
        obs["probe_left"] = sorted(p.name for p in b.base.iterdir() if p.is_dir())
        step("attach", lambda: b.attach(VM, vm.pid, tids))
        for _ in range(4 * len(os.sched_getaffinity(0))):
            yes.append(subprocess.Popen(["yes"], stdout=subprocess.DEVNULL, start_new_session=True))
        pids = [p.pid for p in yes]
        obs["load"] = len(pids)
        time.sleep(0.5)
        iso: dict[str, Any] = {"contended": share(spinner), "load_before": load_on(pids, {PCPU})}
        t0 = time.monotonic()
        step("pin", lambda: b.pin(VM, 0, spinner, PCPU))
        iso["pin_ms"] = (time.monotonic() - t0) * 1000
        iso["pinned_view"] = snapshot(b, vm.pid, tids)
        iso["describe"] = step("describe", b.describe)
        time.sleep(0.3)  # the kernel moves the load off at its next scheduling point
        taken = POOL - set(parse_cpulist(read(ROOT / "cpuset.cpus.effective") or ""))
        iso["taken"] = sorted(taken)
        iso["load_on_pcpu"] = load_on(pids, {PCPU})
        iso["load_on_taken"] = load_on(pids, taken)
        iso["pinned"] = share(spinner)
        t0 = time.monotonic()
        step("unpin", lambda: b.unpin(VM, 0))
        iso["unpin_ms"] = (time.monotonic() - t0) * 1000
        iso["unpinned_view"] = snapshot(b, vm.pid, tids)
        time.sleep(0.3)
        iso["load_after"] = load_on(pids, {PCPU})
        iso["released"] = share(spinner)
        obs["isolation"] = iso
        for p in yes:
            p.kill()
            p.wait()
        yes.clear()
        if b.mode == "local":
            holder = [b]
            obs["chain"] = step("chain", lambda: chain_cases(holder, state, vm.pid, tids))
            b = holder[0]
        step("detach", lambda: b.detach(VM))
        step("teardown", b.teardown)
        obs["after"] = {"root_effective": read(ROOT / "cpuset.cpus.effective"),
                        "allowed": {str(v): allowed(t) for v, t in tids.items()},
                        "emulator_allowed": allowed(vm.pid),
                        "base_left": b.base.exists()}  # fmt: skip
    finally:
        for p in yes:
            p.kill()
            p.wait()
        vm.kill()
        vm.wait(timeout=30)
    print(json.dumps(obs))


def chain_cases(
    cur: list[Cgroup2Backend], state: Path, pid: int, tids: dict[int, int]
) -> dict[str, Any]:
    """Local mode only: a second pin, refusals, and kill -9 at every write of a pin/unpin.
    ``cur[0]``: the backend, replaced by each restart."""
    out: dict[str, Any] = {}
    b = cur[0]

    def attempt(fn: Callable[[], object]) -> str | None:
        try:
            fn()
        except Exception as err:
            return f"{type(err).__name__}: {getattr(err, 'reason', '')} {err}"
        return None

    # A second VM with no pin under the slice: the chain would confine it, so a pin is refused.
    other, other_tids = fake_vm()
    try:
        b.attach("other", other.pid, other_tids)
        before = snapshot(b, pid, tids)
        out["refused_for_other"] = attempt(lambda: b.pin(VM, 0, tids[0], PCPU))
        out["refused_unchanged"] = snapshot(b, pid, tids) == before
        b.detach("other")
    finally:
        other.kill()
        other.wait(timeout=30)

    # Two pins of one VM: pCPUs 1 and 3 plus one extra CPU (2); growing the VM's partition
    # takes a spare CPU (4) for a moment: the guest needs 5 CPUs for this.
    out["cpus"] = os.cpu_count()
    out["pin0"] = attempt(lambda: b.pin(VM, 0, tids[0], 1))
    s0 = snapshot(b, pid, tids)
    out["s0"] = s0
    out["pin1"] = attempt(lambda: b.pin(VM, 1, tids[1], 3))
    out["s1"] = snapshot(b, pid, tids)
    out["verify_two"] = [str(f) for f in b.verify()]
    # A third pin (onto pCPU 4) leaves the host no spare CPU for the growth step: the kernel
    # refuses, the backend says why and undoes it; the two others stay.
    out["pin2"] = attempt(lambda: b.pin(VM, 2, tids[2], 4))
    out["after_pin2"] = snapshot(b, pid, tids)
    out["unpin1"] = attempt(lambda: b.unpin(VM, 1))
    out["back_to_s0"] = snapshot(b, pid, tids) == s0

    # kill -9 before each write of a pin (vCPU 1 → 3, vCPU 0 pinned), and of its unpin.
    def restarted() -> Cgroup2Backend:
        again = Cgroup2Backend(ROOT, state)
        again.setup(POOL)
        again.reconcile({VM: tids})
        cur[0] = again
        return again

    crashes = []
    for op in ("pin", "unpin"):
        if op == "unpin":
            cur[0].pin(VM, 1, tids[1], 3)
        start = snapshot(cur[0], pid, tids)

        def run(op: str = op) -> None:
            if op == "pin":
                cur[0].pin(VM, 1, tids[1], 3)
            else:
                cur[0].unpin(VM, 1)

        def back(op: str = op) -> None:  # to the state the op starts from
            pinned = 1 in cur[0].pins().get(VM, {})
            if op == "pin" and pinned:
                cur[0].unpin(VM, 1)
            elif op == "unpin" and not pinned:
                cur[0].pin(VM, 1, tids[1], 3)

        writes = recorded_writes(run)
        end = snapshot(cur[0], pid, tids)
        back()
        for i, path in enumerate(writes):
            nth = writes[: i + 1].count(path)
            code = killed_before_write(chain, path, run, nth)
            found = snapshot(restarted(), pid, tids)
            # A pin killed before its last write never completed: the state it started from.
            # An unpin: completed by reconcile, or untouched when killed before its first write.
            ok = found == start if op == "pin" else found == end or (i == 0 and found == start)
            crashes.append({
                "op": op, "index": i, "write": str(path.relative_to(ROOT)), "nth": nth,
                "exit": code, "ok": ok, "found": found, "expected": start if op == "pin" else end,
            })  # fmt: skip
            back()
        if op == "unpin":
            cur[0].unpin(VM, 1)
    b = cur[0]
    out["crashes"] = crashes
    out["unpin0"] = attempt(lambda: cur[0].unpin(VM, 0))
    out["all_unpinned"] = snapshot(cur[0], pid, tids)
    return out


if __name__ == "__main__":
    main()
