"""pvhost's QMP event summary: a guest flooding port or hot-plug events costs bounded memory."""

from __future__ import annotations

import asyncio

from qemu.qmp.message import Message

from pvhost.qmp import _MAX_PORTS, _EventSummary


def _port(port: str, opened: bool) -> Message:
    return Message({"event": "VSERPORT_CHANGE", "data": {"id": port, "open": opened}})


def test_port_changes_coalesce_to_the_latest_state_and_a_count() -> None:
    async def body() -> None:
        summary = _EventSummary()
        for i in range(100):  # a guest opening and closing its port in a loop
            await summary.put(_port("pvport0", i % 2 == 0))
        await summary.put(Message({"event": "DEVICE_DELETED", "data": {"device": "cpu1"}}))
        await summary.put(Message({"event": "STOP"}))  # not ours: ignored
        hotplug, ports = await summary.take()
        assert hotplug == "DEVICE_DELETED"
        assert ports == {"pvport0": (False, 100)}
        assert not summary.flooded
        # Taken: nothing is waiting any more.
        await summary.put(_port("pvport0", True))
        assert await summary.take() == ("", {"pvport0": (True, 1)})

    asyncio.run(body())


def test_ports_remembered_are_capped_and_malformed_events_are_dropped() -> None:
    async def body() -> None:
        summary = _EventSummary()
        for i in range(150):
            await summary.put(_port(f"p{i}", True))
        await summary.put(Message({"event": "VSERPORT_CHANGE", "data": {"id": 5, "open": "x"}}))
        await summary.put(Message({"event": "VSERPORT_CHANGE", "data": None}))
        _, ports = await summary.take()
        assert len(ports) == _MAX_PORTS

    asyncio.run(body())


def test_a_flood_of_port_events_is_a_flood() -> None:
    async def body() -> None:
        summary = _EventSummary()
        for i in range(10_000):
            await summary.put(_port("pvport0", i % 2 == 0))
        assert summary.flooded  # the monitor hangs up on it (pvhost.qmp.FLOOD_HOLDOFF_S)

    asyncio.run(body())
