"""The memory service under a hostile guest (issue #12): real QEMU with a virtio-balloon
device, the real host service, the guest played on the channel socket (vmlab.guestpeer, the
named fake peer: a storm of reclaim records a real guest could send just as well).

The host's MemAvailable is read from a file of the test's (``[services.memory] meminfo``):
taking the real host near its floor is a fault that cannot be produced safely for real.
"""

from __future__ import annotations

import asyncio
import itertools
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pvhost.config import ServicesConfig
from pvhost.services.memory_event import EVENT_FORMAT
from pvproto import LoadProgram, ProgramEvent
from tests.integration.hostrun import served, service_config
from vmlab import VirtualMachine, VMSpec, start

pytestmark = [pytest.mark.root, pytest.mark.vm, pytest.mark.memory]

MIB_KB = 1024
FLOOR = 1000
MAX_RATE = 2.0


@pytest.fixture
def big_qemu(tmp_path: Path) -> Iterator[VirtualMachine]:
    """An empty QEMU of 1024 MiB with a balloon device (no guest: QEMU takes the commands)."""
    vm = start(VMSpec(name="t", image=None, smp=1, memory_mib=1024, runtime_dir=tmp_path / "vm"))
    try:
        yield vm
    finally:
        vm.kill()
        vm.stop()


def _reclaim(seq: int, stall_ms: float = 5.0) -> ProgramEvent:
    raw = struct.pack(EVENT_FORMAT, 1, 1234, seq, int(stall_ms * 1e6), 32)
    return ProgramEvent(program_id="memory", seq=seq, data={"raw": raw.hex()})


async def _until(condition: Callable[[], bool], timeout: float = 20) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.02)


def test_a_reclaim_storm_is_rate_limited_and_respects_max_and_host_floor(
    tmp_path: Path, big_qemu: VirtualMachine, cpuset_group: str
) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(f"MemAvailable: {FLOOR * MIB_KB} kB\n")  # at the floor: nothing to give
    services = ServicesConfig.model_validate(
        {
            "enabled": ["memory"],
            "memory": {
                "min_mib": 256,
                "max_mib": 768,
                "step_mib": 128,
                "host_floor_mib": FLOOR,
                "quiet_s": 1.0,
                "window_s": 0.1,
                "max_changes_per_s": MAX_RATE,
                "meminfo": str(meminfo),
                # No guest, so no balloon driver to report statistics: the operator's
                # explicit choice for such guests (the default is tested below).
                "inflate_without_guest_stats": True,
            },
        }
    )
    config = service_config(tmp_path, big_qemu, cpuset_group).model_copy(
        update={"services": services}
    )

    async def scenario() -> None:
        async with served(config, big_qemu.dir / "agent.sock") as (service, guest):

            def memory() -> dict[str, Any]:
                return service.status()["vms"]["t"]["services"]["memory"]["status"]  # type: ignore[no-any-return]

            def dropped() -> dict[str, int]:
                return service.status()["vms"]["t"]["services"].get("_dropped", {})  # type: ignore[no-any-return]

            load = await guest.expect(LoadProgram)
            assert isinstance(load, LoadProgram) and load.program_id == "memory"
            await _until(lambda: memory().get("configured_mib") == 1024)
            assert (memory()["min_mib"], memory()["max_mib"]) == (256, 768)
            # Quiet from the start: over its maximum at once, then step by step to the minimum.
            await _until(lambda: memory()["target_mib"] == 256)
            inflations = [d for d in memory()["decisions"] if d["action"] == "inflate"]
            assert [d["target_mib"] for d in inflations] == [768, 640, 512, 384, 256]

            # Pressure, but the host is at its floor: refused, said once, nothing given.
            for seq in range(200):
                guest.send(_reclaim(seq))
            await _until(lambda: memory()["reclaims"] == 200)
            assert memory()["target_mib"] == 256
            refusals = [d for d in memory()["decisions"] if d["action"] == "hold"]
            assert len(refusals) == 1 and "floor 1000 MiB" in refusals[0]["reason"], refusals

            # Room on the host: a storm of 5000 records in 3 s deflates at most MAX_RATE
            # steps a second, and never past the VM's maximum.
            meminfo.write_text(f"MemAvailable: {(FLOOR + 10_000) * MIB_KB} kB\n")
            await asyncio.sleep(1 / MAX_RATE)  # the last inflation's rate limit has passed
            begin = time.monotonic()
            seq = 1000
            while time.monotonic() - begin < 3.0:
                for _ in range(50):
                    guest.send(_reclaim(seq := seq + 1))
                await asyncio.sleep(0.03)
                assert memory()["target_mib"] <= 768
            elapsed = time.monotonic() - begin
            sent = 200 + (seq - 1000)
            # Each record is accounted for: taken by the service, or dropped by the VM's
            # bound on queued calls (``max_queued``: a slower host drops part of the storm).
            try:
                await _until(lambda: memory()["reclaims"] + dropped().get("backlog", 0) >= sent)
            except TimeoutError:
                raise AssertionError(
                    f"{sent} records sent, {memory()['reclaims']} taken, dropped {dropped()}"
                ) from None
            assert set(dropped()) <= {"backlog"}, dropped()
            assert memory()["reclaims"] + dropped().get("backlog", 0) == sent
            print(f"storm: {sent} records, {dropped().get('backlog', 0)} dropped (backlog)")
            deflations = [d for d in memory()["decisions"] if d["action"] == "deflate"]
            assert 1 <= len(deflations) <= elapsed * MAX_RATE + 1, deflations
            times = [d["at"] for d in deflations]
            assert all(b - a >= 1 / MAX_RATE - 0.05 for a, b in itertools.pairwise(times))
            assert memory()["target_mib"] == min(768, 256 + 128 * len(deflations))
            assert "problem" not in memory(), memory()  # QEMU took every balloon command
            assert memory()["reaction_ms"] is not None and memory()["reaction_ms"] < 250
            print(f"reaction (first pressure record → balloon set): {memory()['reaction_ms']} ms")

            # The service is disabled: the balloon goes back to the VM's configured size.
            plugin = service.services.plugins["memory"]
            await service.services.disable("t", "memory")
            assert plugin.counts["restore"] == 1  # type: ignore[attr-defined]
            metrics = plugin.metrics()
            assert metrics["deflate"] == len(deflations) and metrics["inflate"] == 5

    asyncio.run(scenario())


def test_without_the_guests_statistics_quiet_never_inflates_and_polling_is_undone(
    tmp_path: Path, big_qemu: VirtualMachine, cpuset_group: str
) -> None:
    """The default: an inflation needs the guest's MemAvailable from its balloon driver. QEMU
    is asked to poll it (found in the QOM tree); with no driver there is none, and quiet
    inflates nothing past the VM's maximum. Disabling the service stops the polling."""
    services = ServicesConfig.model_validate(
        {
            "enabled": ["memory"],
            "memory": {"min_mib": 256, "max_mib": 768, "quiet_s": 0.2, "window_s": 0.1,
                       "max_changes_per_s": 20.0},
        }
    )  # fmt: skip
    config = service_config(tmp_path, big_qemu, cpuset_group).model_copy(
        update={"services": services}
    )
    interval = {"path": "/machine/peripheral/balloon0", "property": "guest-stats-polling-interval"}

    async def scenario() -> None:
        async with served(config, big_qemu.dir / "agent.sock") as (service, guest):

            def memory() -> dict[str, Any]:
                return service.status()["vms"]["t"]["services"]["memory"]["status"]  # type: ignore[no-any-return]

            await guest.expect(LoadProgram)
            await _until(lambda: memory().get("target_mib") == 768)  # over its maximum
            assert await asyncio.to_thread(big_qemu.qmp, "qom-get", interval) == 1
            plugin = service.services.plugins["memory"]
            await _until(lambda: plugin.metrics().get("decisions_guest-stats", 0) >= 10)
            assert memory()["target_mib"] == 768, memory()["decisions"]
            assert "reported none yet" in memory()["guest_stats"], memory()
            assert memory()["guest_available_mib"] is None
            await service.services.disable("t", "memory")
            assert await asyncio.to_thread(big_qemu.qmp, "qom-get", interval) == 0

    asyncio.run(scenario())
