"""The agent with real programs in the real kernel: signed load, pins, widening and exits
reaching the host's affinity service (which decodes the records and tracks them, protocol 4),
resynchronisation from the program's map, threads pinned before the agent started, and the
verifier's log on a load failure.

Where the host is pvhost's own (``with_host``) it is the real :class:`pvhost.service.Service`
with a real QEMU (its vCPU threads are what gets placed) and the agent served on the VM's
channel socket; the guest's threads are this machine's (the agent tracks the whole system,
as in a guest)."""

from __future__ import annotations

import asyncio
import os
import queue
import struct
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from pvagent import bpfobj
from pvagent.agent import Agent
from pvagent.elf import program_sections
from pvagent.trust import TrustPolicy
from pvhost import signing
from pvhost.config import Config
from pvhost.service import Service
from pvhost.services.affinity import AffinityService
from pvproto import GuestTopology, Hello, LoadProgram, Ping, Pong, ProgramLoaded, ReadMap
from pvproto.messages import MapContents
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


def host_config(
    tmp_path: Path, qemu: VirtualMachine, group: str, private: Path, program: Path | None = None
) -> Config:
    """pvhost injecting the built affinity object (or ``program``), signed with ``private``."""
    base = service_config(tmp_path, qemu, group)
    return base.model_copy(
        update={
            "service": base.service.model_copy(
                update={"signing_key": private, "affinity_program": program}
            )
        }
    )


class Host:
    """The real pvhost Service and the real agent it talks to over the VM's socket: one agent
    across connections, as the guest's daemon (``new_agent`` plays its restart)."""

    def __init__(self, config: Config, trusted: Path, qemu: VirtualMachine) -> None:
        self.config, self.trusted, self.qemu = config, trusted, qemu
        self.service: Service | None = None
        self.agents: list[Agent] = []
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.agents:
            self.agents.append(Agent(TOPOLOGY, TrustPolicy.from_config(self.trusted)))
        self.writers.append(writer)
        await self.agents[-1].serve(reader, writer)

    def new_agent(self) -> None:
        """The agent restarts: its programs go with it; the next connection meets a new one."""
        self.agents[-1].close()
        self.agents.append(Agent(TOPOLOGY, TrustPolicy.from_config(self.trusted)))
        self.writers[-1].close()

    async def start_agent_socket(self) -> None:
        path = str(self.qemu.dir / "agent.sock")
        self.server = await asyncio.start_unix_server(self.serve, path=path)

    async def start_service(self) -> Service:
        self.service = Service(self.config)
        await self.service.start()
        return self.service

    async def stop_service(self) -> None:
        if self.service is not None:
            await self.service.stop()
            self.service = None

    @property
    def affinity(self) -> AffinityService:
        assert self.service is not None
        plugin = self.service.services.plugins["affinity"]
        assert isinstance(plugin, AffinityService)
        return plugin

    async def until(
        self, has: dict[int, list[int]] | None = None, lacks: set[int] | None = None
    ) -> None:
        """Until the host's tracker says threads ``has`` request those vCPUs (wanted, in the
        VM's record: the placement path got them) and threads ``lacks`` request nothing."""
        has, lacks = has or {}, lacks or set()
        while True:
            threads = self.affinity.threads("t") if self.service is not None else None
            if threads is not None and self.service is not None:
                wanted = set(self.service.vms["t"].wanted)
                if all(
                    threads.get(tid) == set(cpus) and set(cpus) <= wanted
                    for tid, cpus in has.items()
                ) and not (lacks & threads.keys()):
                    return
            await asyncio.sleep(0.05)

    async def loaded(self, count: int) -> Agent:
        while not (len(self.agents) >= count and "affinity" in self.agents[-1].programs):
            await asyncio.sleep(0.05)
        return self.agents[-1]

    async def close(self) -> None:
        await self.stop_service()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
        for agent in self.agents:
            agent.close()


def with_host(
    config: Config, trusted: Path, qemu: VirtualMachine, body: Callable[[Host], Awaitable[None]]
) -> None:
    async def main() -> None:
        host = Host(config, trusted, qemu)
        await host.start_agent_socket()
        await host.start_service()
        try:
            await asyncio.wait_for(body(host), 60)
        finally:
            await host.close()

    asyncio.run(main())


def with_agent(policy: TrustPolicy, body: Callable[[Agent], Awaitable[None]]) -> None:
    async def main() -> None:
        agent = Agent(TOPOLOGY, policy)
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
    host.send(Ping(nonce=1))
    await host.expect(Pong)
    return host, task


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
def test_pins_reach_the_host_tracker_and_release(
    keys: tuple[Path, Path], tmp_path: Path, qemu: VirtualMachine, cpuset_group: str, kind: str
) -> None:
    """Pin, widen, exit → the host's tracker and the VM's wish; pvhost restarts and finds the
    pin again in the program's map (the agent keeps its program: nothing to re-run)."""
    private, trusted = keys
    program = None
    if kind == "bcc-source":
        program = tmp_path / "affinity.bcc.c"
        program.write_bytes(bpfobj.read("affinity.bcc.c"))
    config = host_config(tmp_path, qemu, cpuset_group, private, program)

    async def body(host: Host) -> None:
        await host.loaded(1)
        first = Pinned({ONLINE[-1]})
        await host.until({first.tid: [ONLINE[-1]]})
        second = Pinned({ONLINE[0]})
        await host.until({first.tid: [ONLINE[-1]], second.tid: [ONLINE[0]]})
        second.widen()  # widening back to every CPU releases its vCPU (thread still alive)
        await host.until({first.tid: [ONLINE[-1]]}, {second.tid})
        second.release()
        # pvhost restarts: the new one's tracker is empty; it reads pv_tracked back.
        await host.stop_service()
        await host.start_service()
        await host.until({first.tid: [ONLINE[-1]]})
        assert len(host.agents) == 1  # the same agent, its program kept
        first.release()  # thread exit releases its vCPU
        await host.until(lacks={first.tid})

    with_host(config, trusted, qemu, body)


def test_threads_pinned_before_the_agent_started_are_found(
    keys: tuple[Path, Path], tmp_path: Path, qemu: VirtualMachine, cpuset_group: str
) -> None:
    """A thread pinned before any agent ran (a restart, a crash, an upgrade): the object's
    task iterator, run once by the agent after load, puts it in pv_tracked; the host reads it
    there. Then a new agent (restart) finds it again, and its exit is still reported."""
    private, trusted = keys
    config = host_config(tmp_path, qemu, cpuset_group, private)
    early = Pinned({ONLINE[-1]})
    try:

        async def body(host: Host) -> None:
            agent = await host.loaded(1)
            # Through the iterator: the kernel's own table has it right after the load.
            answer = agent.read_map(ReadMap(program_id="affinity", map="pv_tracked"))
            assert isinstance(answer, MapContents)
            assert struct.pack("<I", early.tid) in {e.key for e in answer.entries}
            await host.until({early.tid: [ONLINE[-1]]})
            host.new_agent()  # the agent goes; a new one comes and loads afresh
            await host.loaded(2)
            await host.until({early.tid: [ONLINE[-1]]})
            early.release()
            await host.until(lacks={early.tid})

        with_host(config, trusted, qemu, body)
    finally:
        if early.thread.is_alive():
            early.release()


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


def test_lost_records_resynchronise_from_the_kernel_table(
    keys: tuple[Path, Path], tmp_path: Path, qemu: VirtualMachine, cpuset_group: str
) -> None:
    """After lost records the host re-reads pv_tracked; here the loss is simulated by wiping
    the host's table and reporting a loss (a ring buffer that overflows cannot be forced
    cheaply; the pvhost bound that drops records calls the same hook)."""
    private, trusted = keys
    config = host_config(tmp_path, qemu, cpuset_group, private)

    async def body(host: Host) -> None:
        await host.loaded(1)
        pinned = Pinned({ONLINE[-1]})
        await host.until({pinned.tid: [ONLINE[-1]]})
        assert host.service is not None
        guest = host.affinity._guests["t"]
        guest.tracker.replace_all({})
        await host.until(lacks={pinned.tid})
        host.affinity.on_records_lost(host.service.vms["t"].session, "affinity", 3)
        await host.until({pinned.tid: [ONLINE[-1]]})  # back, from the kernel's table
        pinned.release()
        await host.until(lacks={pinned.tid})

    with_host(config, trusted, qemu, body)


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
        agent = Agent(TOPOLOGY, policy, versions_file=versions)
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
