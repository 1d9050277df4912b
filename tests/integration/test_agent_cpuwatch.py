"""The agent follows the guest's online CPUs through the kernel's uevents (pvagent.cpuwatch).

A real kernel uevent on the real netlink socket: the test asks the kernel for a synthetic
``change`` event of this machine's ``cpu0`` (writing ``change`` to its ``uevent`` file changes
nothing else); the CPUs are read from a sysfs-like directory of the test's, so this machine's
CPUs are never touched. The same in a real guest with a real hot-plug:
tests/libvirt/test_libvirt_domains.py::test_g_*.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from pvagent import cpuwatch
from pvagent.agent import Agent
from pvagent.trust import TrustPolicy
from pvproto import GuestTopology

pytestmark = pytest.mark.root

CPU0_UEVENT = Path("/sys/devices/system/cpu/cpu0/uevent")


def test_a_cpu_uevent_makes_the_agent_reread_its_cpus_and_nothing_else_does(
    tmp_path: Path,
) -> None:
    (tmp_path / "online").write_text("0\n")

    async def body() -> None:
        agent = Agent(
            GuestTopology(online_vcpus=[0]), TrustPolicy.from_config(Path("/nonexistent"))
        )
        watch = asyncio.create_task(cpuwatch.watch_cpus(agent, root=tmp_path))
        try:
            await asyncio.sleep(0.2)  # listening
            (tmp_path / "online").write_text("0-3\n")
            await asyncio.sleep(4 * cpuwatch.SETTLE_S)
            assert agent.topology.online_vcpus == [0], "no event, no read: it does not poll"
            t0 = time.monotonic()
            await asyncio.to_thread(CPU0_UEVENT.write_text, "change")
            async with asyncio.timeout(5):
                while agent.topology.online_vcpus != [0, 1, 2, 3]:
                    await asyncio.sleep(0.005)
            print(f"\n[cpuwatch] uevent → topology re-read: {time.monotonic() - t0:.3f} s")
            assert not watch.done()
        finally:
            watch.cancel()
            agent.close()

    asyncio.run(body())
