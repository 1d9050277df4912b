"""The host side of the channel session with a real pvhost service and a real QEMU: an agent
that restarts while QEMU's chardev stays connected is greeted again and served again."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from pvhost.config import Config
from pvhost.errors import ChannelError
from pvhost.qmp import QmpMonitor
from pvproto import (
    GuestTopology,
    Hello,
    LoadProgram,
    MapContents,
    MapEntry,
    ReadMap,
)
from pvproto.messages import MAX_MAP_ENTRIES
from tests.integration.hostrun import served, service_config
from vmlab import VirtualMachine
from vmlab.guestpeer import TRACKING_AGENT_VERSIONS

pytestmark = [pytest.mark.root, pytest.mark.vm]


def test_agent_restart_behind_a_live_chardev_is_greeted_and_served_again(
    tmp_path: Path, qemu: VirtualMachine, cpuset_group: str
) -> None:
    async def scenario() -> None:
        config = service_config(tmp_path, qemu, cpuset_group)
        async with served(config, qemu.dir / "agent.sock") as (service, guest):
            await guest.expect(Hello)
            await guest.expect(LoadProgram)
            assert (await guest.update(1, [1])).placements[0].pcpu == 1
            # The agent restarts: same byte stream (the socket to QEMU never closed), a new
            # process that knows nothing of the old Hello and greets first.
            guest.send(
                Hello(
                    role="guest",
                    # It tracks affinity itself (protocols 2/3: AffinityUpdate), as before.
                    protocol_versions=list(TRACKING_AGENT_VERSIONS),
                    software_version="test-guest (restarted)",
                    topology=GuestTopology(online_vcpus=[0, 1, 2]),
                )
            )
            hello = await guest.expect(Hello, timeout=5)  # without it the agent waits for ever
            assert hello.role == "host"
            await guest.expect(LoadProgram, timeout=5)  # the program is injected again
            result = await guest.update(1, [1])  # a fresh agent counts from 1 again
            assert result.placements[0].pcpu == 1
            status = service.status()["vms"]["t"]
            assert status["guest"] == "test-guest (restarted)"
            assert status["channel"] == "connected"

    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_a_silent_agent_is_found_by_the_keepalive_and_greeted_on_a_new_connection(
    tmp_path: Path, qemu: VirtualMachine, cpuset_group: str
) -> None:
    """A peer that said Hello and then stops answering (a SIGSTOPped agent): the host's
    keepalive (on by default; short here) drops the connection and starts a new session."""

    async def scenario() -> None:
        config = service_config(tmp_path, qemu, cpuset_group)
        service_part = config.service.model_copy(
            update={"keepalive_interval": 0.2, "keepalive_deadline": 1.0}
        )
        config = config.model_copy(update={"service": service_part})
        async with served(config, qemu.dir / "agent.sock") as (service, guest):
            await guest.expect(LoadProgram)
            await asyncio.sleep(2.0)  # Pongs keep a live peer's session: nothing resets
            assert guest.connections == 1
            guest.answer_pings = False  # hung
            async with asyncio.timeout(5):
                while guest.connections < 2:
                    await asyncio.sleep(0.05)
            assert service.status()["vms"]["t"]["resets"] >= 1
            guest.answer_pings = True
            await guest.expect(LoadProgram, timeout=5)  # served again on the new connection
            assert (await guest.update(1, [1])).placements[0].pcpu == 1
            assert guest.connections == 2

    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_keepalive_is_on_by_default() -> None:
    assert Config().service.keepalive == (5.0, 15.0)


@pytest.mark.root
def test_the_port_state_is_read_from_qemu_at_connect(qemu: VirtualMachine) -> None:
    """A pvhost that starts after the guest opened its port gets no VSERPORT_CHANGE: it asks
    QEMU (``query-chardev``'s ``frontend-open``). No guest here has the port open."""

    async def body() -> None:
        monitor = QmpMonitor(qemu.qmp_socket, "t")
        await monitor.connect()
        try:
            assert await monitor.port_open(qemu.dir / "qemu-agent.sock") is False
            assert await monitor.port_open(qemu.dir / "no-such.sock") is None
        finally:
            await monitor.close()

    asyncio.run(body())


def test_a_map_read_answered_beyond_what_was_asked_is_refused_and_the_channel_stays_up(
    tmp_path: Path, qemu: VirtualMachine, cpuset_group: str
) -> None:
    """A hostile guest answers ReadMap with more entries than asked (or another map): the
    host's reader gets a clear error, the session keeps serving, nothing is kept."""

    async def scenario() -> None:
        config = service_config(tmp_path, qemu, cpuset_group)
        async with served(config, qemu.dir / "agent.sock") as (service, guest):
            await guest.expect(LoadProgram)
            session = service.sessions["t"]

            async def answer(entries: int, map_name: str = "tracked") -> None:
                ask = await guest.expect(ReadMap)
                assert isinstance(ask, ReadMap)
                guest.send(
                    MapContents(
                        program_id=ask.program_id,
                        map=map_name,
                        entries=[MapEntry(key=bytes([i % 256, i // 256]), value=b"\x01")
                                 for i in range(entries)],
                        request_id=ask.request_id,
                    )
                )  # fmt: skip

            for entries, map_name, error in (
                (MAX_MAP_ENTRIES, "tracked", "1024 entries of affinity/tracked, more than the 4"),
                (1, "other", "answered another map than asked"),
            ):
                guest_task = asyncio.create_task(answer(entries, map_name))
                with pytest.raises(ChannelError, match=error):
                    await session.read_map("affinity", "tracked", max_entries=4)
                await guest_task
            guest_task = asyncio.create_task(answer(4))
            contents = await session.read_map("affinity", "tracked", max_entries=4)
            await guest_task
            assert len(contents.entries) == 4
            assert (await guest.update(1, [1])).placements[0].pcpu == 1  # still served
            assert guest.connections == 1

    asyncio.run(asyncio.wait_for(scenario(), 60))
