"""Bounds a hostile guest or a sloppy operator client meets without a VM (issue 16: D3, D6, D8).

The real-VM versions of these attacks are in tests/integration/test_security_guest.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import pytest

from pvhost.control import ControlServer
from pvhost.logthrottle import LogThrottle
from pvhost.session import TOPOLOGY_BURST, _GuestChannel
from pvproto import GuestTopology, Hello, ProgramLoaded, TopologyUpdate
from pvproto.session import SessionState
from tests.sessions import lone_session

pytestmark = pytest.mark.security


def test_a_log_flood_is_cut_to_the_burst_and_summarised_when_the_window_ends(
    caplog: pytest.LogCaptureFixture,
) -> None:
    logger = logging.getLogger("test.throttle")

    async def body() -> None:
        throttle = LogThrottle(logger, "vm1", burst=10, interval=0.3)
        for i in range(5000):
            throttle.warning("vm1: bad frame %d", i)
        assert len(caplog.records) == 10
        await asyncio.sleep(0.5)  # the window ends: one summary, though the guest fell silent
        assert caplog.records[-1].getMessage() == (
            "vm1: suppressed 4990 more guest-caused log line(s) in 0.3 s"
        )
        throttle.warning("vm1: again")  # a new window logs again
        assert caplog.records[-1].getMessage() == "vm1: again"

    with caplog.at_level(logging.WARNING, "test.throttle"):
        asyncio.run(body())
    assert len(caplog.records) == 12


class _Service:
    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    async def set_remap(self, name: str, on: bool) -> dict[str, Any]:
        self.calls.append(("remap", (name, on)))
        return {"vm": name, "remap": on}

    async def release(self, name: str) -> dict[str, Any]:
        self.calls.append(("release", name))
        return {"vm": name}


@pytest.mark.parametrize(
    ("request_", "error"),
    [
        ({"cmd": "remap", "vm": "v", "on": "false"}, "'on' must be true or false, not \"false\""),
        ({"cmd": "remap", "vm": "v", "on": 0}, "'on' must be true or false, not 0"),
        ({"cmd": "remap", "vm": "v"}, "'on' is missing"),
        ({"cmd": "release", "vm": 7}, "'vm' must be a string, not 7"),
        ({"cmd": "release", "vm": None}, "'vm' must be a string, not null"),
    ],
)
def test_control_fields_are_strict_json_types(request_: dict[str, Any], error: str) -> None:
    """``bool("false")`` is True: "off" sent as a string used to switch remapping on."""
    service = _Service()
    server = ControlServer(service, path=None)  # type: ignore[arg-type]
    reply = asyncio.run(server._handle(json.dumps(request_).encode()))
    assert reply == {"ok": False, "error": f"bad request: {error}"}
    assert service.calls == []


def test_control_takes_real_booleans() -> None:
    service = _Service()
    server = ControlServer(service, path=None)  # type: ignore[arg-type]
    reply = asyncio.run(server._handle(b'{"cmd": "remap", "vm": "v", "on": false}'))
    assert reply["ok"] and service.calls == [("remap", ("v", False))]


def test_verdicts_on_programs_the_host_never_sent_are_not_kept() -> None:
    """D3: each made-up program id used to be kept for ever (+200 MiB for 50 k messages)."""

    async def body() -> None:
        session = lone_session()
        session.status.programs["affinity"] = "loading"  # what the host sent
        for i in range(1000):
            session.guest_message(None, ProgramLoaded(program_id=f"p{i}", ok=True))  # type: ignore[arg-type]
        session.guest_message(None, ProgramLoaded(program_id="affinity", ok=True))  # type: ignore[arg-type]
        assert session.status.programs == {"affinity": "loaded"}
        assert session.guest_log.suppressed_total == 1000 - session.guest_log.burst

    asyncio.run(body())


def test_a_topology_update_flood_is_acted_on_at_the_rate_and_the_newest_wins() -> None:
    """A guest sending ``TopologyUpdate``s in a loop (protocol 5): the host acts on
    ``TOPOLOGY_BURST`` at once, then ``TOPOLOGY_RATE`` per second, holding only the newest
    meanwhile. (The same on the real daemon: tests/integration/test_host_topology_update.py.)"""

    async def body() -> None:
        session = lone_session()
        one, two = GuestTopology(online_vcpus=[0]), GuestTopology(online_vcpus=[0, 1])
        hello = Hello(role="guest", protocol_versions=[5], software_version="g", topology=one)
        channel = _GuestChannel(session)
        # A ready session of protocol 5, as after the agent's Hello (no socket needed here).
        channel.state, channel.version = SessionState.READY, 5
        session._channel = channel
        session.guest_ready(hello, 5)
        for i in range(20_000):
            session.guest_message(channel, TopologyUpdate(topology=two if i % 2 else one))
            if i % 1000 == 0:
                await asyncio.sleep(0)  # let due timers run, as a real stream would
        await asyncio.sleep(0.05)
        assert session.status.topology_changes <= TOPOLOGY_BURST
        await asyncio.sleep(1.2)
        assert session.status.topology_updates == 20_000
        assert session.status.topology_changes <= TOPOLOGY_BURST + 2
        assert session.status.guest_topology == two, "the newest wins"
        assert session.describe()["guest_online"] == [0, 1]

    asyncio.run(body())
