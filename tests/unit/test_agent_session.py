"""Agent ↔ host over a real socketpair with pvproto framing (no eBPF needed here)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path

import pytest

from pvagent import bpfobj
from pvagent.agent import Agent
from pvagent.trust import TrustPolicy
from pvhost import signing
from pvhost.programs import sign_program
from pvproto import (
    SUPPORTED_VERSIONS,
    AffinityResult,
    AffinityUpdate,
    Error,
    GuestTopology,
    Hello,
    LoadProgram,
    Ping,
    Pong,
    ProgramLoaded,
    UnloadProgram,
    VcpuPlacement,
    encode,
)
from vmlab.hostpeer import HostEnd

TOPOLOGY = GuestTopology(online_vcpus=[0, 1, 2, 3], sibling_groups=[[0, 1], [2, 3]])


def with_agent(body: Callable[[Agent], Awaitable[None]], policy: TrustPolicy | None = None) -> None:
    async def main() -> None:
        no_keys = TrustPolicy.from_config(Path("/nonexistent/trusted.d"))  # refuses everything
        agent = Agent(TOPOLOGY, policy or no_keys, coalesce_s=0.0)
        try:
            await asyncio.wait_for(body(agent), 20)
        finally:
            agent.close()

    asyncio.run(main())


async def connect(agent: Agent) -> tuple[HostEnd, asyncio.Task[None]]:
    host, reader, writer = await HostEnd.pair()
    return host, asyncio.create_task(agent.serve(reader, writer))


def test_hello_state_ping_and_refusals() -> None:
    async def body(agent: Agent) -> None:
        host, task = await connect(agent)
        hello = await host.expect(Hello)
        assert hello.role == "guest" and hello.topology == TOPOLOGY
        host.send(LoadProgram.for_payload("early", "bpf-object", b"x", request_id=3))
        assert (await host.expect(Error)).code == "bad-request"  # Hello first
        host.hello()
        update = await host.expect(AffinityUpdate)  # the whole state after every host Hello
        assert update.wanted == []
        host.send(Ping(nonce=42, request_id=7))
        pong = await host.expect(Pong)
        assert (pong.nonce, pong.request_id) == (42, 7)
        # No trusted key: refused with the reason, request id echoed.
        payload = bpfobj.read("affinity.bpf.o")
        host.send(LoadProgram.for_payload("affinity", "bpf-object", payload, request_id=9))
        verdict = await host.expect(ProgramLoaded)
        assert (verdict.ok, verdict.request_id) == (False, 9)
        assert "no trusted key" in verdict.reason
        host.send(UnloadProgram(program_id="nothing", request_id=11))
        assert (await host.expect(Error)).request_id == 11
        host.close()
        await task

    with_agent(body)


def test_bad_frames_are_answered_and_the_session_goes_on() -> None:
    async def body(agent: Agent) -> None:
        host, task = await connect(agent)
        await host.expect(Hello)
        host.hello()
        await host.expect(AffinityUpdate)
        frame = bytearray(encode(Ping(nonce=1, request_id=5)))
        frame[-3] = ord("{")  # invalid JSON body, valid header
        host.send_raw(bytes(frame) + b"garbage" * 10)
        error = await host.expect(Error)
        assert error.code == "bad-frame" and error.request_id == 5
        host.send(
            Hello(
                role="guest",
                protocol_versions=list(SUPPORTED_VERSIONS),
                software_version="x",
                topology=TOPOLOGY,
            )
        )
        # The garbage is reported once the next header shows where it ended.
        assert "skipped 70 byte(s)" in (await host.expect(Error)).message
        assert "guest talks to a host" in (await host.expect(Error)).message
        host.send(Ping(nonce=2))
        assert (await host.expect(Pong)).nonce == 2
        host.close()
        await task

    with_agent(body)


def test_version_mismatch_closes_with_unsupported() -> None:
    async def body(agent: Agent) -> None:
        host, task = await connect(agent)
        await host.expect(Hello)
        host.hello(versions=[9])
        assert (await host.expect(Error)).code == "unsupported"
        assert await host.closed()
        await task
        host.close()

    with_agent(body)


def test_reconnect_rehello_and_resend_state() -> None:
    async def body(agent: Agent) -> None:
        host, task = await connect(agent)
        await host.expect(Hello)
        host.hello()
        await host.expect(AffinityUpdate)
        agent.tracker.set_mask(1234, {2})  # as if a thread pinned itself
        live = await host.expect(AffinityUpdate)
        assert live.wanted == [2]
        host.close()
        await task
        # While disconnected, the state changes; nothing is lost.
        agent.tracker.set_mask(1235, {3})
        await asyncio.sleep(0.01)
        host2, task2 = await connect(agent)
        assert (await host2.expect(Hello)).topology == TOPOLOGY
        host2.hello()
        resent = await host2.expect(AffinityUpdate)
        assert resent.wanted == [2, 3] and resent.seq > live.seq
        host2.close()
        await task2

    with_agent(body)


@pytest.mark.parametrize("case", ["unsigned", "unknown key", "tampered", "disallowed attach point"])
def test_untrusted_programs_are_refused_over_the_protocol(tmp_path: Path, case: str) -> None:
    private, public = signing.generate_keypair(tmp_path / "host")
    stranger, _ = signing.generate_keypair(tmp_path / "stranger")
    trusted = tmp_path / "trusted.d"
    trusted.mkdir()
    (trusted / "host.pem").write_bytes(public.read_bytes())
    payload = bpfobj.read("affinity.bpf.o")
    signed = sign_program("affinity", "bpf-object", payload, private)
    expected = "does not verify"
    if case == "unsigned":
        signed, expected = replace(signed, signature=b""), "unsigned"
    elif case == "unknown key":
        signed = sign_program("affinity", "bpf-object", payload, stranger)
    elif case == "tampered":  # the digest is recomputed, as an attacker would
        signed = replace(signed, payload=payload.replace(b"Dual BSD/GPL", b"Dual BSD/GPX"))
    else:  # correctly signed by the trusted key, but a kprobe
        old = b"tracepoint/sched/sched_process_exit"
        payload = payload.replace(old + b"\0", b"kprobe/do_exit".ljust(len(old) + 1, b"\0"))
        signed = sign_program("affinity", "bpf-object", payload, private)
        expected = "'kprobe/do_exit' is not allowed"

    async def body(agent: Agent) -> None:
        host, task = await connect(agent)
        await host.expect(Hello)
        host.hello()
        await host.expect(AffinityUpdate)
        host.send(signed.message(request_id=21))
        verdict = await host.expect(ProgramLoaded)
        assert (verdict.ok, verdict.request_id) == (False, 21)
        assert verdict.reason.startswith("untrusted:") and expected in verdict.reason
        assert agent.programs == {}
        host.close()
        await task

    with_agent(body, TrustPolicy.from_config(trusted))


def test_host_answer_is_visible_in_the_guest(tmp_path: Path) -> None:
    """The host's AffinityResult lands in the placement file, refusals included, and what
    each pin achieved (protocol 4: isolated, or restricted and why)."""
    status = tmp_path / "run" / "placement.json"

    async def main() -> None:
        no_keys = TrustPolicy.from_config(Path("/nonexistent/trusted.d"))
        agent = Agent(TOPOLOGY, no_keys, coalesce_s=0.0, placement_file=status)
        try:
            host, task = await connect(agent)
            await host.expect(Hello)
            host.hello()
            await host.expect(AffinityUpdate)
            host.send(
                AffinityResult(
                    seq=4,
                    policy="identity",
                    backend="cgroup1",
                    placements=[
                        VcpuPlacement(vcpu=0, pcpu=2, isolation="isolated"),
                        VcpuPlacement(
                            vcpu=1, pcpu=3, isolation="restricted", isolation_reason="v1 root"
                        ),
                        VcpuPlacement(vcpu=3, refused="pool exhausted"),
                    ],
                )
            )
            host.send(Ping(nonce=1))
            await host.expect(Pong)  # the result before it has been handled
            host.close()
            await asyncio.wait_for(task, 5)
        finally:
            agent.close()

    asyncio.run(main())
    doc = json.loads(status.read_text())
    assert doc["seq"] == 4 and doc["backend"] == "cgroup1"
    none = {"isolation": None, "isolation_reason": None}
    assert doc["placements"] == [
        {"vcpu": 0, "pcpu": 2, "refused": None, **none, "isolation": "isolated"},
        {"vcpu": 1, "pcpu": 3, "refused": None, "isolation": "restricted",
         "isolation_reason": "v1 root"},
        {"vcpu": 3, "pcpu": None, "refused": "pool exhausted", **none},
    ]  # fmt: skip
