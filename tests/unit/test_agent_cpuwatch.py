"""The agent follows the guest's online CPUs without a uevent socket: the fallback poll."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from pvagent import cpuwatch
from pvagent.agent import Agent
from pvagent.trust import TrustPolicy
from pvproto import GuestTopology


def _agent() -> Agent:
    return Agent(GuestTopology(online_vcpus=[0]), TrustPolicy.from_config(Path("/nonexistent")))


def test_without_uevents_the_online_cpus_are_polled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No pyudev or no uevent socket: ``online`` is re-read every ``POLL_S``; an unreadable
    one keeps the CPUs known so far."""
    monkeypatch.setattr(cpuwatch, "POLL_S", 0.02)
    (tmp_path / "online").write_text("0\n")

    async def body() -> None:
        agent = _agent()
        watch = asyncio.create_task(
            cpuwatch.watch_cpus(agent, root=tmp_path, monitor_factory=lambda: None)
        )
        try:
            (tmp_path / "online").write_text("0-2\n")
            async with asyncio.timeout(5):
                while agent.topology.online_vcpus != [0, 1, 2]:
                    await asyncio.sleep(0.01)
            (tmp_path / "online").unlink()
            await asyncio.sleep(0.1)
            assert agent.topology.online_vcpus == [0, 1, 2]
            assert not watch.done()
        finally:
            watch.cancel()
            agent.close()

    asyncio.run(body())
