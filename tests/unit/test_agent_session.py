"""Agent ↔ host over a real socketpair with pvproto framing (no eBPF needed here)."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path

import pytest

from pvagent import bpfobj
from pvagent.agent import MAX_DOCUMENTS, Agent
from pvagent.port import open_stream
from pvagent.trust import TrustPolicy
from pvhost import signing
from pvhost.programs import sign_program
from pvhost.services.affinity import placement_document
from pvproto import (
    SUPPORTED_VERSIONS,
    AffinityResult,
    Error,
    GuestDocument,
    GuestTopology,
    Hello,
    LoadProgram,
    Ping,
    Pong,
    ProgramLoaded,
    TopologyUpdate,
    UnloadProgram,
    VcpuPlacement,
    encode,
)
from vmlab.hostpeer import HostEnd

TOPOLOGY = GuestTopology(online_vcpus=[0, 1, 2, 3], sibling_groups=[[0, 1], [2, 3]])


def with_agent(body: Callable[[Agent], Awaitable[None]], policy: TrustPolicy | None = None) -> None:
    async def main() -> None:
        no_keys = TrustPolicy.from_config(Path("/nonexistent/trusted.d"))  # refuses everything
        agent = Agent(TOPOLOGY, policy or no_keys)
        try:
            await asyncio.wait_for(body(agent), 20)
        finally:
            agent.close()

    asyncio.run(main())


async def connect(agent: Agent) -> tuple[HostEnd, asyncio.Task[None]]:
    host, reader, writer = await HostEnd.pair()
    return host, asyncio.create_task(agent.serve(reader, writer))


async def ready(host: HostEnd) -> None:
    """The agent took our Hello (a round trip; a generic agent sends no state of its own)."""
    host.send(Ping(nonce=99))
    assert (await host.expect(Pong)).nonce == 99


def test_hello_state_ping_and_refusals() -> None:
    async def body(agent: Agent) -> None:
        host, task = await connect(agent)
        hello = await host.expect(Hello)
        assert hello.role == "guest" and hello.topology == TOPOLOGY
        host.send(LoadProgram.for_payload("early", "bpf-object", b"x", request_id=3))
        assert (await host.expect(Error)).code == "bad-request"  # Hello first
        host.hello()
        await ready(host)
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
        await ready(host)
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


def test_protocol_4_and_5_only_and_no_affinity_messages() -> None:
    """The generic agent speaks protocols 4 and 5 only: a host that expects it to track
    affinity (protocol 2 or 3) gets ``unsupported``; affinity messages are not for it."""

    async def body(agent: Agent) -> None:
        assert agent.hello().protocol_versions == [4, 5]
        host, task = await connect(agent)
        await host.expect(Hello)
        # pvhost writes its Hello in its lowest version (2): the agent must read it.
        hello = Hello(role="host", protocol_versions=[2, 3, 4], software_version="pvhost")
        host.send_raw(encode(hello, version=2))
        await ready(host)
        host.send(AffinityResult(seq=1, placements=[], request_id=4))
        error = await host.expect(Error)
        assert (error.code, error.request_id) == ("bad-request", 4)
        host.close()
        await task
        old, task2 = await connect(agent)
        await old.expect(Hello)
        old.hello(versions=[2, 3])
        assert (await old.expect(Error)).code == "unsupported"
        assert await old.closed()
        await task2
        old.close()

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
        await ready(host)
        host.send(signed.message(request_id=21))
        verdict = await host.expect(ProgramLoaded)
        assert (verdict.ok, verdict.request_id) == (False, 21)
        assert verdict.reason.startswith("untrusted:") and expected in verdict.reason
        assert agent.programs == {}
        host.close()
        await task

    with_agent(body, TrustPolicy.from_config(trusted))


def test_host_documents_are_published_in_the_guest(tmp_path: Path) -> None:
    """A GuestDocument lands, whole, in documents_dir/NAME.json; at most MAX_DOCUMENTS names."""
    run = tmp_path / "run"
    placement = {"seq": 4, "placements": [{"vcpu": 3, "pcpu": None, "refused": "pool exhausted"}]}

    async def main() -> None:
        no_keys = TrustPolicy.from_config(Path("/nonexistent/trusted.d"))
        agent = Agent(TOPOLOGY, no_keys, documents_dir=run)
        try:
            host, task = await connect(agent)
            await host.expect(Hello)
            host.hello()
            await ready(host)
            host.send(GuestDocument(name="placement", content=json.dumps(placement)))
            for i in range(MAX_DOCUMENTS):  # one of them is one too many
                host.send(GuestDocument(name=f"doc{i}", content="[]", request_id=100 + i))
            error = await host.expect(Error)
            assert error.request_id == 100 + MAX_DOCUMENTS - 1
            assert f"at most {MAX_DOCUMENTS} documents" in error.message
            # A name with a path in it does not even decode: the frame is refused.
            frame = encode(GuestDocument(name="placement", content="1"))
            host.send_raw(frame.replace(b'"placement"', b'"../../etc"'))
            assert (await host.expect(Error)).code == "bad-frame"
            await ready(host)
            host.close()
            await asyncio.wait_for(task, 5)
        finally:
            agent.close()

    asyncio.run(main())
    assert json.loads((run / "placement.json").read_text()) == placement
    assert len(list(run.glob("*.json"))) == MAX_DOCUMENTS
    assert not (tmp_path / "etc.json").exists()


def test_the_placement_document_is_what_agents_wrote_with_what_each_pin_achieved(
    tmp_path: Path,
) -> None:
    """The host's answer to a generic agent (pvhost's placement document) lands in the guest
    as agents of protocol 2 and 3 wrote their AffinityResult (same keys, same layout), with
    what each pin achieved (protocol 4: isolated, or restricted and why)."""
    result = AffinityResult(
        seq=4,
        policy="identity",
        backend="cgroup1",
        placements=[
            VcpuPlacement(vcpu=0, pcpu=2, isolation="isolated"),
            VcpuPlacement(vcpu=1, pcpu=3, isolation="restricted", isolation_reason="v1 root"),
            VcpuPlacement(vcpu=3, refused="pool exhausted"),
        ],
    )
    run = tmp_path / "run"

    async def main() -> None:
        no_keys = TrustPolicy.from_config(Path("/nonexistent/trusted.d"))
        agent = Agent(TOPOLOGY, no_keys, documents_dir=run)
        try:
            host, task = await connect(agent)
            await host.expect(Hello)
            host.hello()
            await ready(host)
            host.send(placement_document(result))
            await ready(host)  # the document before it has been handled
            host.close()
            await asyncio.wait_for(task, 5)
        finally:
            agent.close()

    asyncio.run(main())
    text = (run / "placement.json").read_text()
    # What the agents before protocol 4 wrote from a result (pvagent of 9e66cc4 and before).
    assert text == json.dumps(result.model_dump(mode="json", exclude={"type"}), indent=1) + "\n"
    doc = json.loads(text)
    assert doc["seq"] == 4 and doc["backend"] == "cgroup1" and doc["policy"] == "identity"
    none = {"isolation": None, "isolation_reason": None}
    assert doc["placements"] == [
        {"vcpu": 0, "pcpu": 2, "refused": None, **none, "isolation": "isolated"},
        {"vcpu": 1, "pcpu": 3, "refused": None, "isolation": "restricted",
         "isolation_reason": "v1 root"},
        {"vcpu": 3, "pcpu": None, "refused": "pool exhausted", **none},
    ]  # fmt: skip


HOTPLUGGED = GuestTopology(online_vcpus=[0, 1, 2, 3, 4], sibling_groups=[[0, 1], [2, 3]])


async def nothing_sent(host: HostEnd) -> None:
    """The agent sent nothing before answering this Ping (frames keep their order)."""
    host.send(Ping(nonce=7))
    assert (await host.expect(Pong)).nonce == 7
    assert host.inbox == [], host.inbox


def test_a_cpu_change_is_told_to_a_host_of_protocol_5_once_and_never_as_a_hello() -> None:
    """vCPU hot-plug: the agent tells a ready host of protocol 5 its new CPUs in a
    ``TopologyUpdate`` (the session stays as it is: no Hello), once per change."""

    async def body(agent: Agent) -> None:
        host, task = await connect(agent)
        assert (await host.expect(Hello)).topology == TOPOLOGY
        host.hello()
        await ready(host)
        assert agent.set_topology(HOTPLUGGED)
        update = await host.expect(TopologyUpdate, skip_others=False)
        assert update.topology == HOTPLUGGED
        assert not agent.set_topology(HOTPLUGGED), "no change, nothing to tell"
        await nothing_sent(host)
        assert agent.set_topology(TOPOLOGY)  # the CPU went offline again
        assert (await host.expect(TopologyUpdate, skip_others=False)).topology == TOPOLOGY
        host.close()
        await task

    with_agent(body)


def test_a_host_of_protocol_4_gets_no_update_and_learns_the_cpus_at_the_next_hello() -> None:
    """An older host (protocol 4) reads no TopologyUpdate: it is not sent; the agent's next
    Hello carries the CPUs as they are then."""

    async def body(agent: Agent) -> None:
        host, task = await connect(agent)
        await host.expect(Hello)
        host.hello(versions=[2, 3, 4])
        await ready(host)
        assert agent.set_topology(HOTPLUGGED)
        await nothing_sent(host)
        host.close()
        await task
        again, task2 = await connect(agent)
        assert (await again.expect(Hello)).topology == HOTPLUGGED
        again.close()
        await task2

    with_agent(body)


def test_a_cpu_change_between_our_hello_and_the_hosts_is_told_once_ready() -> None:
    """The CPUs changed after the agent's Hello went out but before the host answered: the
    host's view is the Hello's, so the agent tells it the new one as soon as it is ready."""

    async def body(agent: Agent) -> None:
        host, task = await connect(agent)
        assert (await host.expect(Hello)).topology == TOPOLOGY
        assert agent.set_topology(HOTPLUGGED)  # not ready: nothing can be sent yet
        host.hello()
        assert (await host.expect(TopologyUpdate)).topology == HOTPLUGGED
        await nothing_sent(host)
        host.close()
        await task

    with_agent(body)


def test_the_host_end_closing_under_the_port_ends_the_session_and_the_agent_lives() -> None:
    """The port's own transport (``open_stream``: asyncio's pipe transports, as on a virtio
    port) closes itself when the other end goes (a port unplugged, the host gone). Ending the
    session must not fail on it: it did (AttributeError from the closed transport's abort()),
    and the agent exited on every port replug that raced it."""

    async def body(agent: Agent) -> None:
        ours, theirs = socket.socketpair()
        reader, writer, rtransport = await open_stream(ours.fileno())
        try:
            session = asyncio.create_task(agent.serve(reader, writer))
            theirs.setblocking(False)
            loop = asyncio.get_running_loop()
            assert await asyncio.wait_for(loop.sock_recv(theirs, 65536), 10)  # its Hello
            theirs.close()
            await asyncio.wait_for(session, 10)  # ends, and raises nothing
        finally:
            rtransport.close()
            ours.close()

    with_agent(body)
