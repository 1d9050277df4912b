"""The host side of the channel session with a real pvhost service and a real QEMU: an agent
that restarts while QEMU's chardev stays connected is greeted again and served again."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from pvhost.config import Config
from pvhost.service import Service
from pvproto import GuestTopology, Hello, LoadProgram
from vmlab import VirtualMachine
from vmlab.guestpeer import FakeGuestChannel

pytestmark = [pytest.mark.root, pytest.mark.vm]


def _config(tmp_path: Path, qemu: VirtualMachine, group: str, **service: object) -> Config:
    program = tmp_path / "affinity.bpf.o"
    program.write_bytes(b"\x7fELF test payload: the guest is played by the test")
    return Config.model_validate(
        {
            "service": {
                "runtime_dir": str(tmp_path / "runtime"),
                "state_dir": str(tmp_path / "state"),
                "control_socket": str(tmp_path / "pvhost.sock"),
                "signing_key": str(tmp_path / "no-key"),
                "affinity_program": str(program),
                "max_backoff": 0.5,
                **service,
            },
            "placement": {"backend": "cgroup1", "group": group, "housekeeping": ""},
            "vms": {"t": {"qmp": str(qemu.qmp_socket), "agent": str(qemu.dir / "agent.sock")}},
        }
    )


def test_agent_restart_behind_a_live_chardev_is_greeted_and_served_again(
    tmp_path: Path, qemu: VirtualMachine, cpuset_group: str
) -> None:
    async def scenario() -> None:
        guest = FakeGuestChannel(qemu.dir / "agent.sock")
        await guest.start()
        service = Service(_config(tmp_path, qemu, cpuset_group))
        await service.start()
        try:
            await guest.connected()
            await guest.expect(Hello)
            await guest.expect(LoadProgram)
            assert (await guest.update(1, [1])).placements[0].pcpu == 1
            # The agent restarts: same byte stream (the socket to QEMU never closed), a new
            # process that knows nothing of the old Hello and greets first.
            guest.send(
                Hello(
                    role="guest",
                    protocol_versions=[1],
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
        finally:
            await service.stop()
            await guest.close()

    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_a_silent_agent_is_found_by_the_keepalive_and_greeted_on_a_new_connection(
    tmp_path: Path, qemu: VirtualMachine, cpuset_group: str
) -> None:
    """A peer that said Hello and then stops answering (a SIGSTOPped agent): the host's
    keepalive (on by default; short here) drops the connection and starts a new session."""

    async def scenario() -> None:
        guest = FakeGuestChannel(qemu.dir / "agent.sock")
        await guest.start()
        config = _config(
            tmp_path, qemu, cpuset_group, keepalive_interval=0.2, keepalive_deadline=1.0
        )
        service = Service(config)
        await service.start()
        try:
            await guest.connected()
            await guest.expect(LoadProgram)
            await asyncio.sleep(2.0)  # Pongs keep a live peer's session: nothing resets
            assert guest.connections == 1
            guest.answer_pings = False  # hung
            async with asyncio.timeout(5):
                while guest.connections < 2:
                    await asyncio.sleep(0.05)
            assert "sent nothing" in service.status()["vms"]["t"]["channel"] or (
                service.status()["vms"]["t"]["resets"] >= 1
            )
            guest.answer_pings = True
            await guest.expect(LoadProgram, timeout=5)  # served again on the new connection
            assert (await guest.update(1, [1])).placements[0].pcpu == 1
        finally:
            await service.stop()
            await guest.close()

    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_keepalive_is_on_by_default() -> None:
    assert Config().service.keepalive == (5.0, 15.0)
