"""The generic agent (issue #12): any program's ring-buffer records go to the host undecoded,
in batches as bytes, and the host can read a program's map back. A host of protocol 2 or 3
(one that expects the agent to track affinity) is told the versions do not match. Real
agent, real eBPF in the real kernel, the host played
on a socketpair (vmlab.hostpeer)."""

from __future__ import annotations

import asyncio
import os
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from pvagent.agent import Agent
from pvagent.trust import TrustPolicy
from pvhost import signing
from pvhost.programs import sign_program
from pvproto import (
    Error,
    GuestTopology,
    Hello,
    MapContents,
    ProgramLoaded,
    ProgramRecords,
    ReadMap,
)
from tests import plugindist
from vmlab.hostpeer import HostEnd

pytestmark = [pytest.mark.root, pytest.mark.ebpf]

TOPOLOGY = GuestTopology(online_vcpus=sorted(os.sched_getaffinity(0)))

CALLS = 600


@pytest.fixture(scope="module")
def echo(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, Path, Path]:
    """(the echo object, the host's private key, the guest's trusted.d)."""
    root = tmp_path_factory.mktemp("echo")
    obj = plugindist.build_echo(root, os.getpid())
    private, public = signing.generate_keypair(root / "host")
    trusted = root / "trusted.d"
    trusted.mkdir()
    (trusted / "host.pem").write_bytes(public.read_bytes())
    return obj.read_bytes(), private, trusted


def run(
    echo: tuple[bytes, Path, Path], versions: list[int], body: Callable[[HostEnd], Awaitable[None]]
) -> None:
    """The real agent and a host speaking ``versions``, the echo program loaded, ``body``."""
    obj, private, trusted = echo

    async def main() -> None:
        agent = Agent(TOPOLOGY, TrustPolicy.from_config(trusted))
        host, reader, writer = await HostEnd.pair()
        task = asyncio.create_task(agent.serve(reader, writer))
        try:
            await host.expect(Hello)
            host.hello(versions)
            host.send(sign_program("echo", "bpf-object", obj, private).message(request_id=1))
            verdict = await host.expect(ProgramLoaded, timeout=60)
            assert verdict.ok, verdict
            await asyncio.wait_for(body(host), 60)
        finally:
            host.close()
            await task
            agent.close()

    asyncio.run(main())


async def getppid_calls(count: int) -> None:
    """``count`` getppid() calls, in bursts that yield to the agent's loop between them."""
    for start in range(0, count, 100):
        for _ in range(min(100, count - start)):
            os.getppid()
        await asyncio.sleep(0)


def test_records_come_in_batches_of_bytes_and_a_map_reads_back(
    echo: tuple[bytes, Path, Path],
) -> None:
    batches: list[ProgramRecords] = []

    async def body(host: HostEnd) -> None:
        await getppid_calls(CALLS)
        while sum(len(b.records) for b in batches) < CALLS:
            batches.append(await host.expect(ProgramRecords))
        values = [struct.unpack("<Q", r)[0] for b in batches for r in b.records]
        assert values == list(range(1, CALLS + 1))
        assert {(b.program_id, b.ringbuf, b.lost) for b in batches} == {("echo", "pv_echo", 0)}
        # Numbered per ring buffer with no gap; far fewer frames than records.
        firsts = [b.first_seq for b in batches]
        assert firsts == [sum(len(b.records) for b in batches[:i]) for i in range(len(batches))]
        assert len(batches) <= CALLS // 50, [len(b.records) for b in batches]

        host.send(ReadMap(program_id="echo", map="pv_count", request_id=7))
        contents = await host.expect(MapContents)
        assert contents.request_id == 7 and not contents.truncated
        assert [(e.key, e.value) for e in contents.entries] == [
            (struct.pack("<I", 0), struct.pack("<Q", CALLS))
        ]
        host.send(ReadMap(program_id="echo", map="pv_nosuch", request_id=8))
        error = await host.expect(Error)
        assert (error.request_id, error.code) == (8, "bad-request")
        assert "has no map 'pv_nosuch'" in error.message

    run(echo, [2, 3, 4], body)


def test_a_host_of_protocol_3_is_told_the_versions_do_not_match(
    echo: tuple[bytes, Path, Path],
) -> None:
    """Protocol 2 and 3 meant "the agent tracks affinity"; this one does not, so it says so
    (an old pvhost with a new guest image: a clear error, not a silent loss of pins)."""

    async def main() -> None:
        agent = Agent(TOPOLOGY, TrustPolicy.from_config(echo[2]))
        host, reader, writer = await HostEnd.pair()
        task = asyncio.create_task(agent.serve(reader, writer))
        try:
            await host.expect(Hello)
            host.hello([2, 3])
            error = await host.expect(Error)
            assert error.code == "unsupported" and "[4, 5]" in error.message
            assert await host.closed()
        finally:
            host.close()
            await task
            agent.close()

    asyncio.run(main())
