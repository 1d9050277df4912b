"""The guest's CPUs change after its Hello (vCPU hot-plug): ``TopologyUpdate`` (protocol 5) on
the real pvhost daemon, with a real QEMU and real cgroup v1 cpusets; the guest played on the
channel socket (vmlab.guestpeer, the named fake peer). The same on a real guest and a real
hot-plug: tests/libvirt/test_libvirt_domains.py::test_g_*.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from pvhost.session import TOPOLOGY_BURST, TOPOLOGY_RATE
from pvproto import (
    AffinityResult,
    Error,
    GuestDocument,
    GuestTopology,
    LoadProgram,
    TopologyUpdate,
)
from tests.integration.hostrun import Daemon, daemon_and_guest, free_port, write_config
from vmlab import VirtualMachine
from vmlab.guestpeer import FakeGuestChannel

pytestmark = [pytest.mark.root, pytest.mark.vm]

ONE = GuestTopology(online_vcpus=[0])
TWO = GuestTopology(online_vcpus=[0, 1])
THREE = GuestTopology(online_vcpus=[0, 1, 2])


async def _status(daemon: Daemon) -> dict[str, Any]:
    rc, out = await daemon.pvctl("status", "--json")
    assert rc == 0, out
    return json.loads(out)["vms"]["t"]  # type: ignore[no-any-return]


async def _until(daemon: Daemon, what: str, check: Any, timeout: float = 15) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        status = await _status(daemon)
        if check(status):
            return status
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}; status {status}")
        await asyncio.sleep(0.1)


async def _loaded(daemon: Daemon, guest: FakeGuestChannel) -> None:
    await guest.expect(LoadProgram)
    await _until(daemon, "affinity loaded", lambda s: s["programs"].get("affinity") == "loaded")


def _served(
    tmp_path: Path,
    qemu: VirtualMachine,
    cpuset_group: str,
    body: Callable[[Daemon, FakeGuestChannel], Awaitable[None]],
    *,
    vcpus: int,
    versions: tuple[int, ...] | None = None,
) -> None:
    """``body(daemon, guest)`` with the real daemon serving ``qemu`` and the generic agent
    played on its channel (its Hello: ``vcpus`` CPUs online, ``versions`` offered), once the
    affinity program is loaded; then the daemon stopped, cleanly."""
    config = write_config(tmp_path, qemu, cpuset_group, free_port())

    async def scenario() -> None:
        agent = qemu.dir / "agent.sock"
        async with daemon_and_guest(
            tmp_path, config, agent, generic=True, vcpus=vcpus, versions=versions
        ) as (daemon, guest):
            await _loaded(daemon, guest)
            await body(daemon, guest)
            await daemon.stop()
            assert daemon.returncode == 0, daemon.log()

    asyncio.run(scenario())


async def _placement(guest: FakeGuestChannel, vcpu: int, timeout: float = 15) -> AffinityResult:
    """The next ``placement`` document that places ``vcpu``."""
    async with asyncio.timeout(timeout):
        while True:
            doc = await guest.expect(GuestDocument, timeout)
            assert isinstance(doc, GuestDocument)
            if doc.name == "placement":
                result = AffinityResult.model_validate(json.loads(doc.content))
                if any(p.vcpu == vcpu and p.pcpu is not None for p in result.placements):
                    return result


def test_a_cpu_the_agent_says_came_online_is_followed_without_a_new_hello(
    tmp_path: Path, qemu: VirtualMachine, cpuset_group: str
) -> None:
    """The guest's Hello says CPU 0 is online (its vCPUs 1 and 2 not yet): a thread pinned to
    vCPU 1 is no request. The agent's ``TopologyUpdate`` (CPUs 0-1) reaches the host's
    affinity tracker with no handshake: the tracker is rebuilt from the guest program's
    ``pv_tracked`` and the pin to vCPU 1 is placed; no Hello, no program re-injected."""

    async def body(daemon: Daemon, guest: FakeGuestChannel) -> None:
        status = await _status(daemon)
        assert (status["protocol_version"], status["guest_online"]) == (5, [0]), status
        hellos, loads = guest.hellos, len(guest.programs)
        with pytest.raises(TimeoutError):  # CPU 1 is not online as far as the host knows
            await guest.update(1, [1], timeout=2)
        assert (await _status(daemon))["placements"] == {}
        t0 = time.monotonic()
        guest.send(TopologyUpdate(topology=TWO))
        result = await _placement(guest, 1)
        print(f"\n[topology] TopologyUpdate → vCPU 1 placed: {time.monotonic() - t0:.2f} s")
        assert [p.vcpu for p in result.placements] == [1], result
        status = await _status(daemon)
        assert status["guest_online"] == [0, 1], status
        assert (status["topology_updates"], status["topology_changes"]) == (1, 1), status
        assert list(status["placements"]) == ["1"], status
        assert status["resets"] == 0 and status["session"] == "ready", status
        assert (guest.hellos, len(guest.programs)) == (hellos, loads), "no new handshake"
        assert "the guest's online CPUs changed: 0 -> 0-1" in daemon.log()
        await guest.update(2, [])
        await _until(daemon, "released", lambda s: s["placements"] == {})

    _served(tmp_path, qemu, cpuset_group, body, vcpus=1)


@pytest.mark.security
def test_a_guest_flooding_topology_updates_is_rate_limited_and_the_newest_wins(
    tmp_path: Path, qemu: VirtualMachine, cpuset_group: str
) -> None:
    """A hostile guest sends thousands of ``TopologyUpdate``s, each a change: the host acts on
    at most ``TOPOLOGY_BURST`` then ``TOPOLOGY_RATE`` per second (one stored topology while it
    waits), ends on the newest, and the session and the placements stay as they were."""

    async def body(daemon: Daemon, guest: FakeGuestChannel) -> None:
        guest.send(TopologyUpdate(topology=TWO))
        result = await guest.update(1, [1])
        assert [p.vcpu for p in result.placements] == [1], result
        flood = 3000
        t0 = time.monotonic()
        for i in range(flood):
            guest.send(TopologyUpdate(topology=THREE if i % 2 else ONE))
        guest.send(TopologyUpdate(topology=TWO))  # the newest: back where it was
        await _until(
            daemon,
            "every update received, the newest acted on, vCPU 1 placed again",
            lambda s: (
                s["topology_updates"] == flood + 2
                and s["guest_online"] == [0, 1]
                and list(s["placements"]) == ["1"]
            ),
            timeout=30,
        )
        elapsed = time.monotonic() - t0
        await asyncio.sleep(1.5)  # nothing more is acted on after the newest
        status = await _status(daemon)
        allowed = 1 + TOPOLOGY_BURST + elapsed * TOPOLOGY_RATE + 1
        print(f"\n[topology] {flood + 1} updates in {elapsed:.1f} s → "
              f"{status['topology_changes'] - 1} acted on (allowed {allowed:.0f})")  # fmt: skip
        assert status["topology_changes"] <= allowed, status
        assert status["guest_online"] == [0, 1], "the newest topology wins"
        assert status["resets"] == 0 and status["session"] == "ready", status
        assert list(status["placements"]) == ["1"], "vCPU 1 still placed"
        # Each change resynchronised at most once: map reads stay bounded too.
        assert guest.map_reads <= 2 * allowed + 8, guest.map_reads

    _served(tmp_path, qemu, cpuset_group, body, vcpus=1)


def test_an_agent_of_protocol_4_keeps_the_hellos_cpus_and_cannot_send_an_update(
    tmp_path: Path, qemu: VirtualMachine, cpuset_group: str
) -> None:
    """An agent image of protocol 4 never sends the update (its Hello's CPUs stand until its
    next Hello, as before); one that sends it anyway gets ``Error{bad-request}``."""

    async def body(daemon: Daemon, guest: FakeGuestChannel) -> None:
        guest.send(update := TopologyUpdate(topology=THREE, request_id=77))
        error = await guest.expect(Error)
        assert isinstance(error, Error), error
        assert (error.code, error.request_id) == ("bad-request", update.request_id)
        assert "TopologyUpdate needs protocol 5; this session speaks 4" in error.message
        status = await _status(daemon)
        assert (status["protocol_version"], status["guest_online"]) == (4, [0, 1]), status
        assert status["topology_updates"] == 0, status
        result = await guest.update(1, [1])  # the session serves it as before
        assert [p.vcpu for p in result.placements] == [1], result

    _served(tmp_path, qemu, cpuset_group, body, vcpus=2, versions=(4,))
