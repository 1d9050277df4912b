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
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, os.environ.get("EXTPV_SRC", "/mnt/extpv"))

from pvhost.placement import cgroup2, chain
from pvhost.placement.cgroup2 import Cgroup2Backend
from pvproto import parse_cpulist
from tests.cpuacct import load_on, share
from tests.faultpoints import killed_before_write, recorded_writes
from tests.vm.guesthost import ROOT, allowed, read, stepper

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
        out[f"{name}_exclusive"] = read(d / "cpuset.cpus.exclusive")  # remote partitions
    out["root_isolated"] = read(ROOT / "cpuset.cpus.isolated")
    return out


def main() -> None:
    obs: dict[str, Any] = {"errors": {}}

    step = stepper(obs)

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
        holder = [b]
        if b.mode == "local":
            obs["chain"] = step("chain", lambda: chain_cases(holder, state, vm.pid, tids))
        if b.mode != "restricted":
            obs["crashes"] = step("crashes", lambda: crash_cases(holder, state, vm.pid, tids))
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
    """Local mode only: a second pin, refusals. ``cur[0]``: the backend."""
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

    # A third pin (onto pCPU 4) leaves the host no spare CPU for the growth step, which the
    # kernel would refuse: the backend refuses up front, says why, and writes nothing of the
    # chain; the two others stay.
    def third() -> None:
        out["pin2"] = attempt(lambda: b.pin(VM, 2, tids[2], 4))

    out["pin2_writes"] = [str(p.relative_to(ROOT)) for p in recorded_writes(chain, third)]
    out["after_pin2"] = snapshot(b, pid, tids)
    out["unpin1"] = attempt(lambda: b.unpin(VM, 1))
    out["back_to_s0"] = snapshot(b, pid, tids) == s0

    out["unpin0"] = attempt(lambda: b.unpin(VM, 0))
    out["all_unpinned"] = snapshot(b, pid, tids)
    return out


#: kill -9 scenarios: (name, the pins the operation starts from, the operation). The first pin
#: builds the chain (local mode) or the VM's exclusive CPUs (remote) from nothing; the last
#: unpin dissolves them; the middle two change a chain that stays.
CRASHES: list[tuple[str, dict[int, int], tuple[str, int, int]]] = [
    ("first pin", {}, ("pin", 0, 1)),
    ("second pin", {0: 1}, ("pin", 1, 3)),
    ("unpin of one of two", {0: 1, 1: 3}, ("unpin", 1, 3)),
    ("last unpin", {0: 1}, ("unpin", 0, 1)),
]


def crash_cases(
    cur: list[Cgroup2Backend], state: Path, pid: int, tids: dict[int, int]
) -> list[dict[str, Any]]:
    """kill -9 before every cgroupfs write of each operation in :data:`CRASHES`, then a
    restart (a new backend on the same state file: setup, reconcile): every cpuset, partition
    and thread affinity must be exactly what the last valid request implies. ``cur[0]``: the
    backend, replaced by each restart; every pin is undone at the end."""

    def goto(want: dict[int, int]) -> None:
        b = cur[0]
        for vcpu in sorted(set(b.pins().get(VM, {})) - set(want)):
            b.unpin(VM, vcpu)
        for vcpu, pcpu in sorted(want.items()):
            if b.pins().get(VM, {}).get(vcpu) != pcpu:
                b.pin(VM, vcpu, tids[vcpu], pcpu)

    def restarted() -> Cgroup2Backend:
        again = Cgroup2Backend(ROOT, state)
        again.setup(POOL)
        again.reconcile({VM: tids})
        cur[0] = again
        return again

    out = []
    for name, pins, (op, vcpu, pcpu) in CRASHES:
        goto(pins)
        start = snapshot(cur[0], pid, tids)

        def run(op: str = op, vcpu: int = vcpu, pcpu: int = pcpu) -> None:
            if op == "pin":
                cur[0].pin(VM, vcpu, tids[vcpu], pcpu)
            else:
                cur[0].unpin(VM, vcpu)

        writes = recorded_writes((cgroup2, chain), run)
        end = snapshot(cur[0], pid, tids)
        for i, path in enumerate(writes):
            goto(pins)
            nth = writes[: i + 1].count(path)
            code = killed_before_write((cgroup2, chain), path, run, nth)
            found = snapshot(restarted(), pid, tids)
            # A pin killed before its last write never completed: the state it started from.
            # An unpin: completed by reconcile, or untouched when killed before its first write.
            ok = found == start if op == "pin" else found == end or (i == 0 and found == start)
            out.append({
                "case": name, "op": op, "index": i, "writes": len(writes),
                "write": str(path.relative_to(ROOT)), "nth": nth, "exit": code, "ok": ok,
                "found": found, "expected": start if op == "pin" else end,
            })  # fmt: skip
    goto({})
    return out


if __name__ == "__main__":
    main()
