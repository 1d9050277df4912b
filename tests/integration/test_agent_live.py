"""The agent with real programs in the real kernel, talking to a test host over a
socketpair: signed load, AffinityUpdate on pin / widen / exit, reconnect, replacement,
and the verifier's log on a load failure."""

from __future__ import annotations

import asyncio
import os
import queue
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from pvagent import bpfobj
from pvagent.agent import Agent
from pvagent.elf import program_sections
from pvagent.trust import TrustPolicy
from pvhost import signing
from pvhost.programs import sign_program
from pvhost.service import Service
from pvproto import AffinityUpdate, GuestTopology, Hello, LoadProgram, ProgramLoaded
from tests.integration.hostrun import service_config
from vmlab import VirtualMachine
from vmlab.hostpeer import HostEnd

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


async def until(
    host: HostEnd, has: dict[int, list[int]] | None = None, lacks: set[int] | None = None
) -> AffinityUpdate:
    """The first AffinityUpdate in which threads ``has`` request those vCPUs (and are
    wanted) and threads ``lacks`` request nothing. Threads of other processes on this
    machine may appear too: the agent tracks the whole system, as in a guest."""
    has, lacks = has or {}, lacks or set()
    while True:
        update = await host.expect(AffinityUpdate)
        threads = {t.tid: t.vcpus for t in update.threads}
        if all(
            threads.get(tid) == cpus and set(cpus) <= set(update.wanted)
            for tid, cpus in has.items()
        ) and not (lacks & threads.keys()):
            return update


class Pinned:
    """A thread that pins itself, then widens or exits when told to."""

    def __init__(self, cpus: set[int]) -> None:
        self.cpus = cpus
        self.tid = 0
        self.ready = threading.Event()
        self.widened = threading.Event()
        self.commands: queue.Queue[str] = queue.Queue()
        self.thread = threading.Thread(target=self._run)
        self.thread.start()
        assert self.ready.wait(5)

    def _run(self) -> None:
        self.tid = threading.get_native_id()
        os.sched_setaffinity(0, self.cpus)
        self.ready.set()
        while self.commands.get(timeout=20) == "widen":
            os.sched_setaffinity(0, set(ONLINE))
            self.widened.set()

    def widen(self) -> None:
        self.commands.put("widen")
        assert self.widened.wait(5)

    def release(self) -> None:
        """Let the thread exit."""
        self.commands.put("exit")
        self.thread.join()


@pytest.mark.parametrize("kind", ["bpf-object", "bcc-source"], ids=["libbpf", "bcc"])
def test_signed_program_reports_pins_and_releases(keys: tuple[Path, Path], kind: str) -> None:
    private, trusted = keys
    payload = bpfobj.read("affinity.bpf.o" if kind == "bpf-object" else "affinity.bcc.c")

    signed = sign_program("affinity", kind, payload, private)  # type: ignore[arg-type]

    async def body(agent: Agent) -> None:
        host, task = await connect(agent)
        host.send(signed.message(request_id=4))
        verdict = await host.expect(ProgramLoaded, timeout=20)
        assert (verdict.ok, verdict.request_id, verdict.reason) == (True, 4, "")
        first = Pinned({ONLINE[-1]})
        await until(host, {first.tid: [ONLINE[-1]]})
        second = Pinned({ONLINE[0]})
        await until(host, {first.tid: [ONLINE[-1]], second.tid: [ONLINE[0]]})
        second.widen()  # widening back to every CPU releases its vCPU (thread still alive)
        await until(host, {first.tid: [ONLINE[-1]]}, {second.tid})
        second.release()
        # Host restart: a new connection gets Hello and the whole state again.
        host.close()
        await task
        host, task = await connect(agent)
        assert host is not None
        # connect() consumed the AffinityUpdate sent after Hello: check the tracker's state.
        assert agent.tracker.threads[first.tid] == {ONLINE[-1]}
        # The host re-sends the same program on reconnect: kept, state intact.
        host.send(signed.message(request_id=5))
        assert (await host.expect(ProgramLoaded, timeout=20)).ok
        first.release()  # thread exit releases its vCPU
        await until(host, lacks={first.tid})
        host.close()
        await task

    with_agent(TrustPolicy.from_config(trusted), body)


def test_replacement_carries_pins_over(keys: tuple[Path, Path]) -> None:
    private, trusted = keys
    obj, src = bpfobj.read("affinity.bpf.o"), bpfobj.read("affinity.bcc.c")

    async def body(agent: Agent) -> None:
        host, task = await connect(agent)
        host.send(sign_program("affinity", "bpf-object", obj, private).message())
        assert (await host.expect(ProgramLoaded)).ok
        pinned = Pinned({ONLINE[-1]})
        await until(host, {pinned.tid: [ONLINE[-1]]})
        # A different program replaces it; the pin must survive and its exit still count.
        host.send(sign_program("affinity", "bcc-source", src, private).message())
        assert (await host.expect(ProgramLoaded, timeout=20)).ok
        assert agent.tracker.threads[pinned.tid] == {ONLINE[-1]}
        pinned.release()
        await until(host, lacks={pinned.tid})
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


def test_resync_rebuilds_the_state_from_the_kernel_table() -> None:
    """After lost events the agent re-reads pv_tracked; here the loss is simulated by
    wiping the tracker's table (a ring buffer that overflows cannot be forced cheaply)."""
    obj = bpfobj.read("affinity.bpf.o")

    async def body(agent: Agent) -> None:
        host, task = await connect(agent)
        host.send(LoadProgram.for_payload("affinity", "bpf-object", obj))
        assert (await host.expect(ProgramLoaded)).ok
        pinned = Pinned({ONLINE[-1]})
        await until(host, {pinned.tid: [ONLINE[-1]]})
        agent.tracker.replace_all({})
        await until(host, lacks={pinned.tid})
        agent.resync(agent.programs["affinity"].program)
        await until(host, {pinned.tid: [ONLINE[-1]]})  # back, from the kernel's table
        pinned.release()
        await until(host, lacks={pinned.tid})
        host.close()
        await task

    with_agent(TrustPolicy(mode="any"), body)


def test_a_reconnecting_agent_is_sent_the_program_the_operator_loaded_not_an_older_one(
    keys: tuple[Path, Path], tmp_path: Path, qemu: VirtualMachine, cpuset_group: str
) -> None:
    """``pvctl program load`` signs a newer version; the agent records it (replay book) and
    would refuse the host's default, older version as a replay. A new agent on the same
    guest (restart, crash, reboot) must get the operator's program back and load it."""
    private, trusted = keys
    policy = TrustPolicy.from_config(trusted)
    versions = tmp_path / "versions.json"
    base = service_config(tmp_path, qemu, cpuset_group)
    config = base.model_copy(
        update={
            "service": base.service.model_copy(
                update={"signing_key": private, "affinity_program": None}
            )
        }
    )
    agents: list[Agent] = []
    writers: list[asyncio.StreamWriter] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        agent = Agent(TOPOLOGY, policy, coalesce_s=0.005, versions_file=versions)
        agents.append(agent)
        writers.append(writer)
        try:
            await agent.serve(reader, writer)
        finally:
            agent.close()

    async def loaded(count: int) -> None:
        while not (len(agents) == count and "affinity" in agents[-1].programs):
            await asyncio.sleep(0.05)

    async def main() -> None:
        server = await asyncio.start_unix_server(serve, path=str(qemu.dir / "agent.sock"))
        service = Service(config)
        await service.start()
        try:
            session = service.vms["t"].session
            await asyncio.wait_for(loaded(1), 30)
            verdict = await service.load_program("t", bpfobj.path("affinity.bpf.o"))
            assert verdict["ok"], verdict
            writers[0].close()  # the agent goes; a new one comes on the same guest
            await asyncio.wait_for(loaded(2), 30)
            assert session.status.programs["affinity"] == "loaded"
        finally:
            await service.stop()
            server.close()
            await server.wait_closed()

    asyncio.run(main())
