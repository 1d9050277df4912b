"""The agent with real programs in the real kernel, talking to a test host over a
socketpair: signed load, AffinityUpdate on pin / widen / exit, reconnect, replacement,
and the verifier's log on a load failure."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from pvagent import bpfobj
from pvagent.agent import Agent
from pvagent.elf import program_sections
from pvagent.trust import TrustPolicy
from pvhost import signing
from pvproto import AffinityUpdate, GuestTopology, Hello, LoadProgram, ProgramLoaded
from tests.agent_host import HostEnd

pytestmark = [pytest.mark.root, pytest.mark.ebpf]

ONLINE = sorted(os.sched_getaffinity(0))  # this machine's CPUs, as a guest would see them
TOPOLOGY = GuestTopology(online_vcpus=ONLINE)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("keys")
    private, public = signing.generate_keypair(root / "host")
    trusted = root / "trusted.d"
    trusted.mkdir()
    (trusted / "host.pem").write_bytes(public.read_bytes())
    return private, trusted


def with_agent(policy: TrustPolicy, body: Callable[[Agent], Awaitable[None]]) -> None:
    async def main() -> None:
        agent = Agent(TOPOLOGY, policy, coalesce_s=0.005)
        try:
            await asyncio.wait_for(body(agent), 30)
        finally:
            agent.close()

    asyncio.run(main())


async def connect(agent: Agent) -> tuple[HostEnd, asyncio.Task[None]]:
    host, reader, writer = await HostEnd.pair()
    task = asyncio.create_task(agent.serve(reader, writer))
    await host.expect(Hello)
    host.hello()
    await host.expect(AffinityUpdate)
    return host, task


async def until(host: HostEnd, wanted: list[int], *, tid: int | None = None) -> AffinityUpdate:
    while True:
        update = await host.expect(AffinityUpdate)
        if update.wanted == wanted and (tid is None or tid in {t.tid for t in update.threads}):
            return update


class Pinned:
    """A thread that pins itself, then waits to be told to widen or exit."""

    def __init__(self, cpus: set[int]) -> None:
        self.cpus = cpus
        self.tid = 0
        self.ready = threading.Event()
        self.go = threading.Event()
        self.widen = False
        self.thread = threading.Thread(target=self._run)
        self.thread.start()
        self.ready.wait(5)

    def _run(self) -> None:
        self.tid = threading.get_native_id()
        os.sched_setaffinity(0, self.cpus)
        self.ready.set()
        self.go.wait(10)
        if self.widen:
            os.sched_setaffinity(0, set(ONLINE))
            self.ready.clear()
            self.ready.set()

    def release(self, *, widen: bool = False) -> None:
        self.widen = widen
        self.go.set()
        if not widen:
            self.thread.join()


@pytest.mark.parametrize("kind", ["bpf-object", "bcc-source"], ids=["libbpf", "bcc"])
def test_signed_program_reports_pins_and_releases(keys: tuple[Path, Path], kind: str) -> None:
    private, trusted = keys
    payload = bpfobj.read("affinity.bpf.o" if kind == "bpf-object" else "affinity.bcc.c")

    async def body(agent: Agent) -> None:
        host, task = await connect(agent)
        host.send(
            LoadProgram.for_payload(
                "affinity", kind, payload, signing.sign(payload, private), request_id=4
            )
        )
        verdict = await host.expect(ProgramLoaded, timeout=20)
        assert (verdict.ok, verdict.request_id, verdict.reason) == (True, 4, "")
        first = Pinned({ONLINE[-1]})
        await until(host, [ONLINE[-1]], tid=first.tid)
        second = Pinned({ONLINE[0]})
        await until(host, sorted({ONLINE[0], ONLINE[-1]}))
        second.release(widen=True)  # widening back to every CPU releases its vCPU
        await until(host, [ONLINE[-1]])
        second.thread.join()
        # Host restart: a new connection gets Hello and the whole state again.
        host.close()
        await task
        host, task = await connect(agent)
        assert host is not None
        # connect() consumed the AffinityUpdate sent after Hello: check the tracker's state.
        assert agent.tracker.wanted() == {ONLINE[-1]}
        # The host re-sends the same program on reconnect: kept, state intact.
        host.send(
            LoadProgram.for_payload(
                "affinity", kind, payload, signing.sign(payload, private), request_id=5
            )
        )
        assert (await host.expect(ProgramLoaded, timeout=20)).ok
        first.release()  # thread exit releases the last vCPU
        await until(host, [])
        host.close()
        await task

    with_agent(TrustPolicy.from_config(trusted), body)


def test_replacement_carries_pins_over(keys: tuple[Path, Path]) -> None:
    private, trusted = keys
    obj, src = bpfobj.read("affinity.bpf.o"), bpfobj.read("affinity.bcc.c")

    async def body(agent: Agent) -> None:
        host, task = await connect(agent)
        host.send(
            LoadProgram.for_payload("affinity", "bpf-object", obj, signing.sign(obj, private))
        )
        assert (await host.expect(ProgramLoaded)).ok
        pinned = Pinned({ONLINE[-1]})
        await until(host, [ONLINE[-1]], tid=pinned.tid)
        # A different program replaces it; the pin must survive and its exit still count.
        host.send(
            LoadProgram.for_payload("affinity", "bcc-source", src, signing.sign(src, private))
        )
        assert (await host.expect(ProgramLoaded, timeout=20)).ok
        assert agent.tracker.wanted() == {ONLINE[-1]}
        pinned.release()
        await until(host, [])
        host.close()
        await task

    with_agent(TrustPolicy.from_config(trusted), body)


def test_load_failures_return_the_log() -> None:
    obj = bpfobj.read("affinity.bpf.o")
    code = program_sections(obj)[1].data
    broken = obj.replace(code, b"\xff" + code[1:])  # unknown opcode in the first instruction
    bad_source = (
        b"BPF_RINGBUF_OUTPUT(x, 1);\n"
        b"TRACEPOINT_PROBE(sched, sched_process_exit) { return *(int *)0; }"  # verifier says no
    )

    async def body(agent: Agent) -> None:
        host, task = await connect(agent)
        host.send(LoadProgram.for_payload("broken", "bpf-object", broken, request_id=1))
        verdict = await host.expect(ProgramLoaded)
        assert not verdict.ok and verdict.request_id == 1
        assert "verifier" in verdict.reason and "opcode" in verdict.log.lower()
        host.send(LoadProgram.for_payload("bad-bcc", "bcc-source", bad_source, request_id=2))
        verdict = await host.expect(ProgramLoaded, timeout=20)
        assert not verdict.ok and verdict.request_id == 2 and verdict.log
        assert agent.programs == {}
        host.close()
        await task

    with_agent(TrustPolicy(mode="any"), body)
