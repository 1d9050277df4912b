"""End to end on this host: real QEMU (TCG), real QMP, real cgroup v1 cpusets, the guest
played on the channel socket. An AffinityUpdate for vCPU 1 must end with QEMU's vCPU-1
thread restricted to the planned pCPU, and an empty update must restore it exactly.

pvhost's default ``cgroup1_mode`` (``resident``) unless a test names one: the first test runs
both modes, as their cgroup layouts differ."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from pvhost.placement import thread_allowed_cpus
from pvproto import AffinityResult, AffinityUpdate, LoadProgram
from tests.integration.hostrun import served, service_config
from vmlab import VirtualMachine, VMSpec, start
from vmlab.bootsector import ACPI_OST_PERIODIC

pytestmark = [pytest.mark.root, pytest.mark.vm]

CPUSET = Path("/sys/fs/cgroup/cpuset")


def thread_cpuset(tid: int) -> str:
    return Path(f"/proc/{tid}/cpuset").read_text().strip()


@pytest.mark.parametrize("mode", [None, "move"], ids=["default", "move"])
def test_update_pins_vcpu_thread_and_empty_update_restores(
    tmp_path: Path, qemu: VirtualMachine, cpuset_group: str, mode: str | None
) -> None:
    """Both modes pin and unpin the same for the thread's CPUs; ``move`` puts the thread back
    in its cpuset at the unpin, ``resident`` (the default) keeps it in its own (with its home's
    CPUs) until the VM's end, here pvhost's stop."""
    tid = qemu.vcpu_threads()[1].tid
    before = (thread_allowed_cpus(tid), thread_cpuset(tid))
    home_cpus = (CPUSET / before[1].lstrip("/") / "cpuset.cpus").read_text().strip()

    async def scenario() -> None:
        chosen = {} if mode is None else {"cgroup1_mode": mode}
        config = service_config(tmp_path, qemu, cpuset_group, **chosen)
        async with served(config, qemu.dir / "agent.sock") as (service, guest):
            assert service.status()["backend_detail"]["mode"] == (mode or "resident")
            load = await guest.expect(LoadProgram)
            assert isinstance(load, LoadProgram) and load.program_id == "affinity"

            result = await guest.update(1, [1])
            assert result.placements[0].pcpu == 1, result
            assert result.backend == "cgroup1" and result.policy == "identity"
            vcpu_dir = CPUSET / cpuset_group / "vm-t" / "vcpu1"
            assert thread_allowed_cpus(tid) == {1}
            assert (vcpu_dir / "cpuset.cpus").read_text().strip() == "1"
            assert str(tid) in (vcpu_dir / "tasks").read_text().split()
            # The other vCPU threads are untouched.
            for other, thread in qemu.vcpu_threads().items():
                if other != 1:
                    assert thread_allowed_cpus(thread.tid) == before[0]

            status = service.status()
            assert status["vms"]["t"]["vcpus"]["1"]["tid"] == tid
            assert status["vms"]["t"]["placements"]["1"]["pcpu"] == 1

            empty = await guest.update(2, [])
            assert empty.placements == []
            assert thread_allowed_cpus(tid) == before[0]
            if mode == "move":
                assert thread_cpuset(tid) == before[1]
                assert not vcpu_dir.exists()
            else:  # resident: the thread stays in its cpuset, which has its home's CPUs again
                assert thread_cpuset(tid) == f"/{cpuset_group}/vm-t/vcpu1"
                assert (vcpu_dir / "cpuset.cpus").read_text().strip() == home_cpus
            assert guest.bad_frames == []

    asyncio.run(scenario())
    assert (thread_allowed_cpus(tid), thread_cpuset(tid)) == before
    assert not (CPUSET / cpuset_group).exists()


def test_update_storm_is_rate_limited_coalesced_and_all_answered(
    tmp_path: Path, qemu: VirtualMachine, cpuset_group: str
) -> None:
    tids = {v: t.tid for v, t in qemu.vcpu_threads().items()}
    before = {v: thread_allowed_cpus(t) for v, t in tids.items()}

    async def scenario() -> None:
        config = service_config(tmp_path, qemu, cpuset_group, rate=4.0, burst=1)
        async with served(config, qemu.dir / "agent.sock") as (service, guest):
            # A hostile guest: garbage on the channel, an unknown vCPU, then a storm.
            assert guest._writer is not None
            guest._writer.write(b"\xe5PVF garbage \xff" * 100)
            bogus = await guest.update(1, [7])
            assert "unknown vCPU 7" in (bogus.placements[0].refused or "")
            storm = 60
            for seq in range(2, 2 + storm):
                guest.send(AffinityUpdate(seq=seq, wanted=[1] if seq % 2 else [0]))
            answered: dict[int, AffinityResult] = {}
            async with asyncio.timeout(10):
                while len(answered) < storm:
                    result = await guest.expect(AffinityResult)
                    assert isinstance(result, AffinityResult)
                    answered[result.seq] = result
            assert set(answered) == set(range(2, 2 + storm))
            last = answered[1 + storm].placements
            assert [(p.vcpu, p.pcpu) for p in last] == [(1, 1)]
            # Coalesced: far fewer placements applied than updates received.
            assert service.metrics.requests_of("t") <= 5
            assert thread_allowed_cpus(tids[1]) == {1}
            assert thread_allowed_cpus(tids[0]) == before[0]

    asyncio.run(scenario())
    assert {v: thread_allowed_cpus(t) for v, t in tids.items()} == before


def test_vm_found_in_runtime_dir_and_undone_when_it_goes(
    tmp_path: Path, qemu: VirtualMachine, cpuset_group: str
) -> None:
    tid = qemu.vcpu_threads()[1].tid
    before = (thread_allowed_cpus(tid), thread_cpuset(tid))
    config = service_config(tmp_path, qemu, cpuset_group)
    config = config.model_copy(update={"vms": {}})
    runtime = config.service.runtime_dir

    async def scenario() -> None:
        async with served(config, qemu.dir / "agent.sock", connect=False) as (service, guest):
            assert service.sessions == {}
            # The launcher's layout: /run/extpv/vms/<name>/{qmp.sock,agent.sock}.
            (runtime / "t").symlink_to(qemu.dir, target_is_directory=True)
            await guest.connected()
            result = await guest.update(1, [1])
            assert result.placements[0].pcpu == 1
            assert thread_allowed_cpus(tid) == {1}
            (runtime / "t").unlink()  # the VM's directory goes away: everything is undone
            async with asyncio.timeout(5):  # listed until undone (issue #13: it was not)
                while "t" in service.sessions:
                    await asyncio.sleep(0.02)
            assert (thread_allowed_cpus(tid), thread_cpuset(tid)) == before
            assert not (CPUSET / cpuset_group / "vm-t").exists()

    asyncio.run(scenario())


def test_stop_while_a_vanished_vm_is_being_undone_leaves_nothing(
    tmp_path: Path, qemu: VirtualMachine, cpuset_group: str
) -> None:
    """The VM's directory goes and pvhost is stopped at once, while that VM's undo is still
    running in the background: stop must wait for it and remove every cgroup it made.

    Regression (issue #13): stop() only undid the VMs still listed, so a VM whose undo had
    begun was skipped and the backend's teardown ran beside it and kept the base cgroup."""
    tid = qemu.vcpu_threads()[1].tid
    before = (thread_allowed_cpus(tid), thread_cpuset(tid))
    config = service_config(tmp_path, qemu, cpuset_group).model_copy(update={"vms": {}})
    runtime = config.service.runtime_dir

    async def scenario() -> None:
        async with served(config, qemu.dir / "agent.sock", connect=False) as (service, guest):
            (runtime / "t").symlink_to(qemu.dir, target_is_directory=True)
            await guest.connected()
            result = await guest.update(1, [1])
            assert result.placements[0].pcpu == 1
            (runtime / "t").unlink()
            async with asyncio.timeout(5):  # the watcher has seen it: the close is under way
                while service.vms["t"].closing is None:
                    await asyncio.sleep(0.001)
        assert (thread_allowed_cpus(tid), thread_cpuset(tid)) == before
        assert not (CPUSET / cpuset_group).exists(), "stop() left extpv's cgroup behind"

    asyncio.run(scenario())


def test_hot_plugged_vcpu_is_found_and_pinned(tmp_path: Path, cpuset_group: str) -> None:
    qemu = start(VMSpec.empty("hp", tmp_path / "vm", smp=1, maxcpus=3))
    try:

        async def scenario() -> None:
            async with served(
                service_config(tmp_path, qemu, cpuset_group), qemu.dir / "agent.sock", vcpus=1
            ) as (service, guest):
                result = await guest.update(1, [1])
                assert "unknown vCPU 1" in (result.placements[0].refused or "")
                tid = qemu.hot_plug_vcpu().tid
                before = thread_allowed_cpus(tid)
                result = await guest.update(2, [1])
                assert [(p.vcpu, p.pcpu) for p in result.placements] == [(1, 1)]
                assert thread_allowed_cpus(tid) == {1}
                assert service.status()["vms"]["t"]["vcpus"]["1"]["tid"] == tid
                await guest.update(3, [])
                assert thread_allowed_cpus(tid) == before

        asyncio.run(scenario())
    finally:
        qemu.kill()
        qemu.stop()


def test_a_vcpu_the_guest_acks_hot_plugging_is_placed_without_a_new_request(
    tmp_path: Path, cpuset_group: str
) -> None:
    """The guest wants vCPU 1 before it exists (refused); the host hot-plugs it and the guest
    acknowledges (real guest code writing _OST: QEMU emits ACPI_DEVICE_OST). pvhost re-reads
    the vCPU map on that event and places the guest's standing wish with no new request."""
    spec = VMSpec.empty("hp", tmp_path / "vm", smp=1, maxcpus=3, boot_code=ACPI_OST_PERIODIC)
    qemu = start(spec)
    try:

        async def scenario() -> None:
            config = service_config(tmp_path, qemu, cpuset_group)
            async with served(config, qemu.dir / "agent.sock", vcpus=1) as (service, guest):
                result = await guest.update(1, [1])
                assert "unknown vCPU 1" in (result.placements[0].refused or "")
                tid = qemu.hot_plug_vcpu().tid
                replanned = await guest.expect(AffinityResult, timeout=15)
                assert isinstance(replanned, AffinityResult)
                assert replanned.seq == 1, "an answer to the standing request, not a new one"
                assert [(p.vcpu, p.pcpu) for p in replanned.placements] == [(1, 1)]
                assert thread_allowed_cpus(tid) == {1}
                assert service.status()["vms"]["t"]["vcpus"]["1"]["tid"] == tid

        asyncio.run(asyncio.wait_for(scenario(), 60))
    finally:
        qemu.kill()
        qemu.stop()
