"""Isolation on a cgroup v1 host, proven with a real load: `placement.isolate_from`.

A cpuset of ours stands in for where the host's other load lives (the paper's ``yes``
processes, 4x the CPUs); a spinning thread of ours stands in for a vCPU thread. While the
thread is pinned, no ``yes`` may run on its pCPU and the thread gets ≥ 90 % of it; before the
pin and after the unpin it shares the CPUs with the load, and the load's cpuset is exactly as
it was. The host's own accounting says so: ``/proc/<pid>/stat`` (the CPU each task last ran
on) and ``/proc/<pid>/task/<tid>/schedstat`` (run time).

These run ``[placement] cgroup1_mode = "move"`` (each pin moves the thread), the opt-out from
the default; resident mode (the default) has the same proofs in test_host_cgroup1_resident.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from pvhost.errors import PlacementError
from pvhost.placement import Cgroup1Backend, cgroup1, detect_backend
from tests.cpuacct import load_on, running_on, share
from tests.cpusets import CPUSET
from tests.faultpoints import KILLED, killed_before_write, recorded_writes
from tests.integration.hostrun import daemon_and_guest, free_port, write_config
from vmlab import VMSpec, start
from vmlab.bootsector import SPIN

pytestmark = [pytest.mark.root, pytest.mark.isolation]

PCPU = 1  # CPU 0 stays the host's housekeeping CPU


def backend_for(tmp_path: Path, group: str, *isolate_from: Path) -> Cgroup1Backend:
    backend = detect_backend(
        Path("/sys/fs/cgroup"), tmp_path / "state", "cgroup1", group,
        tuple("/" + p.name for p in isolate_from), cgroup1_mode="move",
    )  # fmt: skip
    assert isinstance(backend, Cgroup1Backend)
    backend.setup(frozenset({PCPU}))
    return backend


def test_pinned_pcpu_is_taken_from_the_load_while_pinned_and_given_back_exactly(
    tmp_path: Path, cpuset_group: str, load: tuple[Path, list[int]], spinner: int
) -> None:
    path, yes = load
    backend = backend_for(tmp_path, cpuset_group, path)
    try:
        contended = share(spinner, cpu=PCPU)
        assert load_on(yes, PCPU) > 0, "the load runs on the pCPU before the pin"

        backend.pin("vm", 0, spinner, PCPU)
        assert (path / "cpuset.cpus").read_text().strip() == "0"
        time.sleep(0.2)  # the kernel moves the load off at its next scheduling point
        assert load_on(yes, PCPU) == 0, "a yes process ran on the pinned pCPU"
        pinned = share(spinner, cpu=PCPU)
        others = running_on(PCPU, {spinner, os.getpid()})
        assert pinned >= 0.9, (
            f"the pinned thread got {pinned:.0%} of its pCPU; {pinned.why()}; running now: {others}"
        )
        status = backend.describe()["isolation"]
        assert status["mode"] == "isolate_from"
        assert status["withheld"] == {"/" + path.name: "0-1"}

        backend.unpin("vm", 0)
        assert (path / "cpuset.cpus").read_text().strip() == "0-1", "given back exactly"
        assert backend.state.withheld() == {}
        time.sleep(0.2)
        assert load_on(yes, PCPU) > 0, "the load has the pCPU again"
        released = share(spinner, cpu=PCPU)
        print(f"\n[isolation] share contended {contended:.0%}, pinned {pinned:.0%}, "
              f"released {released:.0%} (while pinned: {pinned.why()})",
              file=sys.stderr)  # fmt: skip
        assert contended < 0.6 and released < 0.6, (contended, released)
    finally:
        backend.teardown()
    assert (path / "cpuset.cpus").read_text().strip() == "0-1"
    assert not (CPUSET / cpuset_group).exists()


def test_a_cpuset_that_would_be_emptied_refuses_the_pin_and_changes_nothing(
    tmp_path: Path, cpuset_group: str, load: tuple[Path, list[int]], spinner: int
) -> None:
    path, _ = load
    (path / "cpuset.cpus").write_text(str(PCPU))
    before = Path(f"/proc/{spinner}/cpuset").read_text()
    backend = backend_for(tmp_path, cpuset_group, path)
    try:
        with pytest.raises(PlacementError, match=r"would leave it no CPU"):
            backend.pin("vm", 0, spinner, PCPU)
        assert (path / "cpuset.cpus").read_text().strip() == str(PCPU)
        assert Path(f"/proc/{spinner}/cpuset").read_text() == before
        assert backend.pins() == {} and backend.state.withheld() == {}
    finally:
        backend.teardown()


def test_kill9_while_the_load_is_shrunk_is_given_back_by_the_next_start(
    tmp_path: Path, cpuset_group: str, load: tuple[Path, list[int]], spinner: int
) -> None:
    path, _ = load
    backend = backend_for(tmp_path, cpuset_group, path)
    backend.pin("vm", 0, spinner, PCPU)
    # pvhost dies in the unpin just before it gives the load its CPU back.
    code = killed_before_write(cgroup1, path / "cpuset.cpus", lambda: backend.unpin("vm", 0))
    assert code == KILLED, "the unpin never reached the load's cpuset"
    assert (path / "cpuset.cpus").read_text().strip() == "0"

    restarted = backend_for(tmp_path, cpuset_group, path)
    assert restarted.reconcile({}) == {}  # the VM is gone: nothing to adopt
    assert (path / "cpuset.cpus").read_text().strip() == "0-1"
    assert restarted.state.withheld() == {} and restarted.pins() == {}
    restarted.teardown()
    assert not (CPUSET / cpuset_group).exists()


def _view(backend: Cgroup1Backend, load: Path, tid: int) -> dict[str, object]:
    """Every cpuset of ours and the load's, the thread's cpuset and affinity, the records."""
    tree = sorted(p for p in backend.base.rglob("*") if p.is_dir())
    return {
        "load": (load / "cpuset.cpus").read_text().strip(),
        "ours": {
            str(p.relative_to(CPUSET)): (p / "cpuset.cpus").read_text().strip()
            for p in [backend.base, *tree]
            if p.exists()
        },
        "thread_cpuset": Path(f"/proc/{tid}/cpuset").read_text().strip(),
        "affinity": sorted(os.sched_getaffinity(tid)),
        "pins": backend.pins(),
        "withheld": backend.state.withheld(),
    }


@pytest.mark.faults
def test_kill9_at_every_write_of_the_first_pin_and_the_last_unpin_restarts_to_the_last_request(
    tmp_path: Path, cpuset_group: str, load: tuple[Path, list[int]], spinner: int
) -> None:
    """v1 ``isolate_from``: the pin that takes the pCPU from the load's cpuset (the first: no
    CPU withheld before) and the unpin that gives it back (the last), killed before each of
    their cgroupfs writes; a restart (setup, reconcile with the VM alive) must leave exactly
    what the last valid request implies."""
    path, _ = load
    live = {"vm": {0: spinner}}
    box = [backend_for(tmp_path, cpuset_group, path)]

    def restarted() -> Cgroup1Backend:
        box[0] = backend_for(tmp_path, cpuset_group, path)
        box[0].reconcile(live)
        return box[0]

    def goto(pinned: bool) -> None:
        if pinned and not box[0].pins():
            box[0].pin("vm", 0, spinner, PCPU)
        elif not pinned and box[0].pins():
            box[0].unpin("vm", 0)

    try:
        checked = []
        for op in ("pin", "unpin"):
            goto(op == "unpin")
            start = _view(box[0], path, spinner)

            def run(op: str = op) -> None:
                box[0].pin("vm", 0, spinner, PCPU) if op == "pin" else box[0].unpin("vm", 0)

            writes = recorded_writes(cgroup1, run)
            end = _view(box[0], path, spinner)
            assert any(w == path / "cpuset.cpus" for w in writes), writes  # the load's cpuset
            for i, write in enumerate(writes):
                goto(op == "unpin")
                nth = writes[: i + 1].count(write)
                assert killed_before_write(cgroup1, write, run, nth) == KILLED, (op, i, write)
                found = _view(restarted(), path, spinner)
                # Killed before its first write, the change is untouched. A pin killed later
                # is undone, or completed by the restart when its thread was already placed
                # (the vCPU's cpuset is written before the load's: reconcile adopts the pin
                # and withholds its pCPU); an unpin is completed. Never a half of either.
                want = [start] if i == 0 else [start, end] if op == "pin" else [end]
                assert found in want, (
                    f"kill -9 before write {i} ({write}) of the {op}:\nfound    {found}\n"
                    f"expected {' or '.join(map(str, want))}"
                )
                checked.append((op, i))
        print(f"\n[crashes/isolate_from] kill -9 points checked: {len(checked)}", file=sys.stderr)
        assert {op for op, _ in checked} == {"pin", "unpin"}
    finally:
        box[0].teardown()
    assert (path / "cpuset.cpus").read_text().strip() == "0-1"


def test_isolate_from_that_does_not_exist_is_refused_at_start(
    tmp_path: Path, cpuset_group: str
) -> None:
    backend = Cgroup1Backend(
        CPUSET, tmp_path / "state.json", cpuset_group, ("/no-such-cpuset-here",)
    )
    with pytest.raises(PlacementError, match="no cpuset /no-such-cpuset-here"):
        backend.setup(frozenset({PCPU}))
    assert not (CPUSET / cpuset_group).exists()


def test_through_the_daemon_a_spinning_vcpu_gets_its_pcpu_to_itself_while_pinned(
    tmp_path: Path, cpuset_group: str, load: tuple[Path, list[int]]
) -> None:
    """The whole path: `pvhost run` with isolate_from, a real QEMU whose vCPU 0 runs guest
    code that spins, the guest's pin of vCPU 0 (played on the channel), and the load.

    What the pin achieved is read back, not inferred from isolate_from: the load is off the
    pCPU, but this test itself (and every task of this host's root cpuset) may still run
    there, which cgroup v1 cannot change. The guest, `pvctl status`, /metrics and the start-up
    line all say ``restricted`` and why."""
    path, yes = load
    qemu = start(VMSpec.empty("iso", tmp_path / "vm", smp=2, boot_code=SPIN))
    try:
        tid = qemu.vcpu_threads()[0].tid
        port = free_port()
        config = write_config(
            tmp_path, qemu, cpuset_group, port,
            f'isolate_from = ["/{path.name}"]\ncgroup1_mode = "move"',
        )  # fmt: skip

        def metrics() -> str:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                return str(r.read().decode())

        series = (
            'extpv_vcpu_isolation{isolation="restricted",pcpu="1",vcpu="0",vm="t",'
            'why="root-cpuset-tasks"} 1.0'
        )

        async def scenario() -> None:
            agent = qemu.dir / "agent.sock"
            # The generic agent (protocol 4): told in its placement document.
            async with daemon_and_guest(tmp_path, config, agent, generic=True) as (daemon, guest):
                contended = await asyncio.to_thread(share, tid, 2.0, PCPU)
                result = await guest.update(1, [0])
                assert [(p.vcpu, p.pcpu) for p in result.placements] == [(0, PCPU)], result
                # The guest is told what the pin achieved, and why it is not isolation.
                placed = result.placements[0]
                assert placed.isolation == "restricted", placed
                why = placed.isolation_reason or ""
                assert re.match(r"\d+ task\(s\) of the root cpuset may still run on its pCPU", why)
                assert f"/{path.name} off it" in why, why  # the load's cpuset is not among them
                assert (path / "cpuset.cpus").read_text().strip() == "0"
                await asyncio.sleep(0.2)
                assert await asyncio.to_thread(load_on, yes, PCPU) == 0
                pinned = await asyncio.to_thread(share, tid, 2.0, PCPU)
                others = running_on(PCPU, {tid, os.getpid()})
                assert pinned >= 0.9, (
                    f"vCPU 0 got {pinned:.0%} of pCPU {PCPU}; {pinned.why()}; running now: {others}"
                )
                rc, out = await daemon.pvctl("status", "--json")
                assert rc == 0, out
                status = json.loads(out)
                isolation = status["backend_detail"]["isolation"]
                assert isolation["mode"] == "isolate_from", isolation
                assert isolation["withheld"] == {f"/{path.name}": "0-1"}
                vcpu0 = status["vms"]["t"]["placements"]["0"]
                assert vcpu0["isolation"] == "restricted", vcpu0
                assert "of the root cpuset may still run" in vcpu0["isolation_reason"], vcpu0
                assert status["isolation"].startswith("restricted: "), status["isolation"]
                rc, text = await daemon.pvctl("status")
                # vCPU 0's row in the VM's table: tid, wanted, its pCPU, mode restricted.
                row = rf"^\s+0\s+{tid}\s+yes\s+{PCPU}\s+restricted$"
                assert re.search(row, text, re.MULTILINE), text
                assert "  vCPU 0 restricted: " in text, text
                assert series in await asyncio.to_thread(metrics)
                # The start-up line names the backend and what a pin achieves here.
                started = r"backend cgroup1, isolation restricted: \d+ task\(s\) of the root cpuset"
                assert re.search(started, daemon.log()), daemon.log()

                await guest.update(2, [])
                assert (path / "cpuset.cpus").read_text().strip() == "0-1"
                assert "extpv_vcpu_isolation{" not in await asyncio.to_thread(metrics)
                await asyncio.sleep(0.2)
                assert await asyncio.to_thread(load_on, yes, PCPU) > 0
                released = await asyncio.to_thread(share, tid, 2.0, PCPU)
                print(f"\n[isolation/daemon] vCPU 0 share contended {contended:.0%}, "
                      f"pinned {pinned:.0%}, released {released:.0%} "
                      f"(while pinned: {pinned.why()})", file=sys.stderr)  # fmt: skip
                assert contended < 0.6 and released < 0.6, (contended, released)
                await daemon.stop()
                assert daemon.returncode == 0, daemon.log()

        asyncio.run(asyncio.wait_for(scenario(), 90))
    finally:
        qemu.kill()
        qemu.stop()
    assert (path / "cpuset.cpus").read_text().strip() == "0-1"
