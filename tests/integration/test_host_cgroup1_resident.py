"""cgroup v1 backend, resident mode, against this host's real cpuset hierarchy: a vCPU thread is
moved once into a cpuset of its own; a pin and an unpin then only rewrite that cpuset's CPUs
(no thread move, so no wait for an RCU grace period); detach gives everything back exactly;
a kill -9 at any cgroupfs write of attach + pin, unpin or detach converges after a restart."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pvhost.placement import Cgroup1Backend, cgroup1, thread_allowed_cpus
from pvproto import parse_cpulist
from tests.cpuacct import load_on, running_on, share
from tests.cpusets import CPUSET, require_cpuset_v1, scratch_cpuset
from tests.faultpoints import KILLED, killed_before_write, recorded_writes
from tests.integration.hostrun import daemon_and_guest, free_port, write_config
from vmlab import VMSpec, start
from vmlab.bootsector import SPIN

pytestmark = pytest.mark.root


@pytest.fixture
def outer(cpuset_group: str) -> Iterator[Path]:
    """A cpuset of ours next to extpv's (CPUs 0-1), standing in for where QEMU runs. Its name
    begins with "0" so that an isolation reason, which names the first cpusets by name after
    the root, names it whatever other cpusets the host has."""
    require_cpuset_v1({0, 1})
    with scratch_cpuset(f"0{cpuset_group}-home", "0-1") as path:
        yield path


def resident(state_dir: Path, group: str, isolate_from: tuple[str, ...] = ()) -> Cgroup1Backend:
    """What pvhost does at start in resident mode: read the state file, set up."""
    backend = Cgroup1Backend(CPUSET, state_dir / "cgroup1.json", group, isolate_from, "resident")
    backend.setup(frozenset({1}))
    return backend


def cpuset_of(tid: int) -> str:
    return Path(f"/proc/{tid}/cpuset").read_text().strip()


def cpus(path: Path) -> str:
    return (path / "cpuset.cpus").read_text().strip()


def move_process(pid: int, cpuset: Path) -> None:
    for task in Path(f"/proc/{pid}/task").iterdir():
        (cpuset / "tasks").write_text(task.name)


def test_pin_and_unpin_rewrite_cpus_only_and_detach_gives_back(
    tmp_path: Path, cpuset_group: str, outer: Path, process: tuple[int, list[int]]
) -> None:
    """After attach, a pin and an unpin write one file each, the thread's own cpuset's CPUs:
    the thread stays where it is, allowed its pCPU while pinned and its home's CPUs again after.
    Detach puts both threads back in the cpuset they came from with the affinity they had,
    including one's own choice (CPU 1). The home's CPUs changed meanwhile reach an unpinned
    thread at the next change."""
    pid, (tid0, tid1, _) = process
    move_process(pid, outer)
    os.sched_setaffinity(tid1, {1})
    before = {t: (cpuset_of(t), thread_allowed_cpus(t)) for t in (tid0, tid1)}
    backend = resident(tmp_path, cpuset_group)
    backend.attach("vm", pid, {0: tid0, 1: tid1})
    vcpu0 = CPUSET / cpuset_group / "vm-vm" / "vcpu0"
    vcpu1 = vcpu0.with_name("vcpu1")
    assert cpuset_of(tid0) == f"/{cpuset_group}/vm-vm/vcpu0"
    assert cpuset_of(tid1) == f"/{cpuset_group}/vm-vm/vcpu1"
    assert (cpus(vcpu0), cpus(vcpu1)) == ("0-1", "0-1"), "the home's CPUs"
    assert thread_allowed_cpus(tid1) == {1}, "its own choice kept"

    writes = recorded_writes(cgroup1, lambda: backend.pin("vm", 0, tid0, 1))
    assert writes == [vcpu0 / "cpuset.cpus"], "a pin writes its cpuset's CPUs, nothing else"
    assert (cpuset_of(tid0), thread_allowed_cpus(tid0)) == (f"/{cpuset_group}/vm-vm/vcpu0", {1})
    assert backend.verify() == []

    (outer / "cpuset.cpus").write_text("0")
    writes = recorded_writes(cgroup1, lambda: backend.unpin("vm", 0))
    assert vcpu0 / "cpuset.cpus" in writes and not [w for w in writes if w.name == "tasks"]
    assert cpus(vcpu0) == "0" and cpus(vcpu1) == "0", "both follow their home's CPUs"
    assert cpuset_of(tid0) == f"/{cpuset_group}/vm-vm/vcpu0", "never moved by a pin or unpin"
    (outer / "cpuset.cpus").write_text("0-1")

    backend.detach("vm")
    assert {t: (cpuset_of(t), thread_allowed_cpus(t)) for t in (tid0, tid1)} == before
    assert not (CPUSET / cpuset_group / "vm-vm").exists()
    assert backend.state.vms() == []
    backend.teardown()
    assert not (CPUSET / cpuset_group).exists()


def test_read_back_counts_an_unpinned_resident_thread_under_its_home(
    tmp_path: Path, cpuset_group: str, outer: Path, process: tuple[int, list[int]]
) -> None:
    """The isolation read-back skips extpv's cpusets; an unpinned resident vCPU thread that
    may run on the pinned pCPU must still count, under the cpuset it came from (as in move
    mode, where it stays there): the main thread, the fourth thread and vCPU 1 = 3."""
    pid, (tid0, tid1, _) = process
    move_process(pid, outer)
    backend = resident(tmp_path, cpuset_group)
    backend.attach("vm", pid, {0: tid0, 1: tid1})
    backend.pin("vm", 0, tid0, 1)
    isolation = backend.achieved()["vm"][0]
    assert isolation.mode == "restricted"
    assert f"3 in /{outer.name}" in isolation.reason, isolation.reason
    backend.detach("vm")
    backend.teardown()


def test_isolate_from_home_takes_the_pinned_pcpu_from_unpinned_residents(
    tmp_path: Path, cpuset_group: str, outer: Path, process: tuple[int, list[int]]
) -> None:
    """With the home named in isolate_from, a pin takes the pCPU from the home and from the
    VM's unpinned resident threads (they left the home, so only extpv can), and gives it back
    to both on unpin."""
    pid, (tid0, tid1, _) = process
    move_process(pid, outer)
    backend = resident(tmp_path, cpuset_group, ("/" + outer.name,))
    backend.attach("vm", pid, {0: tid0, 1: tid1})
    backend.pin("vm", 0, tid0, 1)
    assert cpus(outer) == "0"
    assert thread_allowed_cpus(tid1) == {0}, "the unpinned vCPU is off the pinned pCPU"
    backend.unpin("vm", 0)
    assert cpus(outer) == "0-1"
    assert thread_allowed_cpus(tid0) == thread_allowed_cpus(tid1) == {0, 1}
    backend.detach("vm")
    backend.teardown()


def _kill_points(
    operation: Callable[[], object], undo: Callable[[], object]
) -> list[tuple[Path, int]]:
    """Every cgroupfs write of ``operation``, as (file, how many times written so far)."""
    writes = recorded_writes(cgroup1, operation)
    undo()
    seen: dict[Path, int] = {}
    points = []
    for path in writes:
        seen[path] = seen.get(path, 0) + 1
        points.append((path, seen[path]))
    return points


@pytest.mark.parametrize("step", ["attach+pin", "unpin", "detach"])
def test_kill_at_every_write_converges_after_restart(
    tmp_path: Path,
    cpuset_group: str,
    outer: Path,
    process: tuple[int, list[int]],
    step: str,
) -> None:
    """kill -9 of pvhost just before each cgroupfs write of a step: the restarted backend
    reconciles to a state that holds (every recorded pin verified, the pinned pCPU withheld
    from the home, unpinned residents on their home's CPUs), and detach + teardown give
    everything back exactly: threads in their cpuset with their affinity, the home's CPUs."""
    pid, (tid0, tid1, _) = process
    move_process(pid, outer)
    before = {t: (cpuset_of(t), thread_allowed_cpus(t)) for t in (tid0, tid1)}
    isolate = ("/" + outer.name,)
    live = {"vm": {0: tid0, 1: tid1}}

    def prepare(state: Path) -> Cgroup1Backend:
        backend = resident(state, cpuset_group, isolate)
        if step != "attach+pin":
            backend.attach("vm", pid, live["vm"])
            backend.pin("vm", 0, tid0, 1)
        return backend

    def operation(backend: Cgroup1Backend) -> Callable[[], object]:
        def run() -> None:
            if step == "attach+pin":
                backend.attach("vm", pid, live["vm"])
                backend.pin("vm", 0, tid0, 1)
            elif step == "unpin":
                backend.unpin("vm", 0)
            else:
                backend.detach("vm")

        return run

    dry = prepare(tmp_path / "dry")
    points = _kill_points(operation(dry), dry.teardown)
    assert len(points) >= 2, points
    for n, (path, nth) in enumerate(points):
        state = tmp_path / f"kill-{n}"
        backend = prepare(state)
        code = killed_before_write(cgroup1, path, operation(backend), nth)
        assert code == KILLED, f"never reached write {n}: {path} #{nth}"

        restarted = resident(state, cpuset_group, isolate)
        adopted = restarted.reconcile(live)
        where = f"killed before write {n} ({path} #{nth})"
        assert restarted.verify() == [], where
        assert adopted == restarted.pins(), where
        held = {p for pins in restarted.pins().values() for p in pins.values()}
        assert cpus(outer) == ("0" if held else "0-1"), where
        for vcpu, home in restarted.state.homes("vm").items():
            assert home.prev_cpuset == "/" + outer.name, where
            if vcpu not in restarted.pins().get("vm", {}):
                assert thread_allowed_cpus(home.tid) == parse_cpulist(cpus(outer)), where

        # The VM's next request is served: attach, pin, unpin, as if nothing had happened.
        restarted.attach("vm", pid, live["vm"])
        restarted.pin("vm", 0, tid0, 1)
        assert restarted.verify() == [] and cpus(outer) == "0", where
        assert thread_allowed_cpus(tid1) == {0}, where
        restarted.unpin("vm", 0)
        assert thread_allowed_cpus(tid0) == thread_allowed_cpus(tid1) == {0, 1}, where

        restarted.detach("vm")
        restarted.teardown()
        assert cpus(outer) == "0-1", where
        assert {t: (cpuset_of(t), thread_allowed_cpus(t)) for t in (tid0, tid1)} == before, where
        assert not (CPUSET / cpuset_group).exists(), where


@pytest.mark.isolation
def test_a_resident_pin_isolates_from_a_real_load(
    tmp_path: Path, cpuset_group: str, load: tuple[Path, list[int]], spinner: int
) -> None:
    """Resident mode with the load's cpuset in isolate_from and 4x CPUs ``yes`` in it: while
    the spinning thread's pin holds no ``yes`` runs on the pCPU and the thread gets >= 90 % of
    it; before and after, it shares. Detach puts it back in its own cpuset."""
    path, yes = load
    home = cpuset_of(spinner)
    backend = resident(tmp_path, cpuset_group, ("/" + path.name,))
    try:
        backend.attach("vm", spinner, {0: spinner})
        contended = share(spinner, cpu=1)
        assert load_on(yes, 1) > 0, "the load runs on the pCPU before the pin"
        backend.pin("vm", 0, spinner, 1)
        assert cpus(path) == "0"
        time.sleep(0.2)  # the kernel moves the load off at its next scheduling point
        assert load_on(yes, 1) == 0, "a yes process ran on the pinned pCPU"
        pinned = share(spinner, cpu=1)
        assert pinned >= 0.9, f"the pinned thread got {pinned:.0%} of its pCPU; {pinned.why()}"
        backend.unpin("vm", 0)
        assert cpus(path) == "0-1", "given back exactly"
        time.sleep(0.2)
        assert load_on(yes, 1) > 0, "the load has the pCPU again"
        released = share(spinner, cpu=1)
        print(f"\n[isolation/resident] share contended {contended:.0%}, pinned {pinned:.0%}, "
              f"released {released:.0%}", file=sys.stderr)  # fmt: skip
        assert contended < 0.6 and released < 0.6, (contended, released)
        backend.detach("vm")
        assert cpuset_of(spinner) == home
    finally:
        backend.teardown()
    assert not (CPUSET / cpuset_group).exists()


@pytest.mark.isolation
def test_through_the_daemon_threads_move_at_discovery_pin_isolates_and_stop_gives_back(
    tmp_path: Path, cpuset_group: str, outer: Path, load: tuple[Path, list[int]]
) -> None:
    """`pvhost run` in resident mode with a real QEMU (started in ``outer``) whose vCPU 0 spins,
    the guest's pins played on the channel, 4x CPUs ``yes`` in an ``isolate_from`` cpuset.

    The vCPU threads are moved into their own cpusets when the session finds them, before any
    request, so the guest's first pin moves nothing; while it holds no ``yes`` runs on the pCPU
    and vCPU 0 gets >= 90 % of it; the unpin gives the CPUs back; a kill -9 leaves the threads
    resident and the restarted daemon keeps them; its stop puts every vCPU thread back in the
    cpuset it came from with the affinity it had (vCPU 1's own choice included)."""
    path, yes = load
    qemu = start(VMSpec.empty("res", tmp_path / "vm", smp=2, boot_code=SPIN))
    try:
        move_process(qemu.pid, outer)
        tids = {i: v.tid for i, v in qemu.vcpu_threads().items()}
        os.sched_setaffinity(tids[1], {0})
        others = [int(t.name) for t in Path(f"/proc/{qemu.pid}/task").iterdir()]
        others = [t for t in others if t not in tids.values()]
        before = {t: (cpuset_of(t), thread_allowed_cpus(t)) for t in tids.values()}
        assert {c for c, _ in before.values()} == {f"/{outer.name}"}
        config = write_config(
            tmp_path,
            qemu,
            cpuset_group,
            free_port(),
            f'isolate_from = ["/{path.name}"]\ncgroup1_mode = "resident"',
        )
        vm_dir = CPUSET / cpuset_group / "vm-t"

        def resident_now() -> dict[int, str]:
            return {v: cpuset_of(t) for v, t in tids.items()}

        home = {v: f"/{cpuset_group}/vm-t/vcpu{v}" for v in tids}

        async def scenario() -> None:
            agent = qemu.dir / "agent.sock"
            async with daemon_and_guest(tmp_path, config, agent, generic=True) as (daemon, guest):
                # Found and moved once, before the guest asked anything.
                assert resident_now() == home, daemon.log()
                assert {cpus(vm_dir / f"vcpu{v}") for v in tids} == {"0-1"}, "outer's CPUs"
                assert thread_allowed_cpus(tids[1]) == {0}, "its own choice kept"
                assert {cpuset_of(t) for t in others} == {f"/{outer.name}"}, "vCPU threads only"
                rc, out = await daemon.pvctl("status", "--json")
                assert rc == 0, out
                detail = json.loads(out)["backend_detail"]
                assert detail["mode"] == "resident", detail
                assert detail["resident"]["t"]["0"] == {"tid": tids[0], "home": f"/{outer.name}"}

                contended = await asyncio.to_thread(share, tids[0], 2.0, 1)
                result = await guest.update(1, [0])
                assert [(p.vcpu, p.pcpu) for p in result.placements] == [(0, 1)], result
                assert resident_now() == home, "the pin moved no thread"
                assert cpus(vm_dir / "vcpu0") == "1" and cpus(path) == "0"
                await asyncio.sleep(0.2)
                assert await asyncio.to_thread(load_on, yes, 1) == 0
                pinned = await asyncio.to_thread(share, tids[0], 2.0, 1)
                running = running_on(1, {tids[0], os.getpid()})
                assert pinned >= 0.9, (
                    f"vCPU 0 got {pinned:.0%} of pCPU 1; {pinned.why()}; running now: {running}"
                )

                await guest.update(2, [])
                assert resident_now() == home, "the unpin moved no thread"
                assert cpus(vm_dir / "vcpu0") == "0-1" and cpus(path) == "0-1"
                await asyncio.sleep(0.2)
                assert await asyncio.to_thread(load_on, yes, 1) > 0
                released = await asyncio.to_thread(share, tids[0], 2.0, 1)
                print(f"\n[isolation/daemon resident] vCPU 0 share contended {contended:.0%}, "
                      f"pinned {pinned:.0%}, released {released:.0%}", file=sys.stderr)  # fmt: skip
                assert contended < 0.6 and released < 0.6, (contended, released)

                # kill -9: the threads stay resident; the restarted daemon keeps them there.
                await daemon.stop(signal.SIGKILL)
                assert resident_now() == home
                await daemon.start()
                async with asyncio.timeout(20):
                    while guest.connections < 2:
                        await asyncio.sleep(0.05)
                assert resident_now() == home, daemon.log()
                result = await guest.update(3, [0])
                assert [(p.vcpu, p.pcpu) for p in result.placements] == [(0, 1)], result
                assert resident_now() == home and cpus(path) == "0"

                # pvhost stop (pinned): every vCPU thread home, as it was; nothing of ours left.
                await daemon.stop()
                assert daemon.returncode == 0, daemon.log()
                after = {t: (cpuset_of(t), thread_allowed_cpus(t)) for t in tids.values()}
                assert after == before, daemon.log()
                assert not (CPUSET / cpuset_group).exists()
                assert cpus(path) == "0-1"

        asyncio.run(asyncio.wait_for(scenario(), 120))
    finally:
        qemu.kill()
        qemu.stop()
    assert cpus(path) == "0-1"
