"""One VM's session: QMP for its vCPU threads, and the guest channel over the chardev socket.

The session owns the VM's connections and their I/O, and nothing of placement: it tells the
service what the guest wants (``applier``), when the vCPU map changed (``on_vcpus_changed``),
when its monitor has read the vCPU threads (``on_vcpus_found``) and when the VM went away
(``on_gone``), and offers the operations the service needs
(``vcpus``, ``refresh_vcpus``, ``send_result``, program load/unload, ``describe``).

Channel protocol (docs/interfaces.md, docs/session.md): the shared
:class:`pvproto.session.PeerSession` does Hello, negotiation, liveness and error replies;
on every guest Hello the host injects what the guest should run (``LoadProgram``): the
programs of the services enabled for this VM (:mod:`pvhost.services`; affinity by default),
and every program the operator loaded into this VM (``pvctl program load``) and did not
unload — the operator's program replaces the default under the same id, so a guest that
recorded the operator's newer version is never sent the older one again (which it would
refuse as a replay). The host answers every ``AffinityUpdate`` (from agents of protocol 2
and 3, which track affinity in the guest; for a generic agent of protocol 4 the affinity
service's tracker submits them, :meth:`VmSession.submit_update`, and the answer goes to the
guest as the ``placement`` ``GuestDocument``) with an ``AffinityResult`` of the same
``seq``. Updates are applied at most ``rate`` per second (token bucket); updates that arrive
meanwhile coalesce to the newest, and each superseded one is answered compactly (its
``seq``, no placements: the newest one's answer follows), so a hostile guest can neither make
the host spin nor go unanswered. A request the host refuses as a whole (more vCPUs wanted than
the VM has) is answered with ``Error{bad-request}``. Records of the guest's programs
(``ProgramRecords`` batches from agents of protocol 3, ``ProgramEvent`` with one hex record
from agents of protocol 2) go to the service that owns the program, which decodes them
(:meth:`pvhost.services.ServiceManager.records`, bounded per VM). Only ``ProgramLoaded``
verdicts on programs the host sent are kept, and what the guest can
make the host log is rate-limited per VM (:mod:`pvhost.logthrottle`).

The guest's agent can go away and come back while QEMU's socket chardev stays connected
(docs/session.md draws what each side does): QEMU's ``VSERPORT_CHANGE`` events tell the
session the guest closed the port (the session forgets the peer and waits for a Hello) and
opened it (the host greets the new agent); a keepalive Ping with a deadline finds a peer that
stopped answering (a SIGSTOPped agent, a hung guest) and drops the connection, so the next
one starts a fresh handshake. Port changes are acted on at most ``PORT_RATE`` per second (a
guest opening and closing its port in a loop costs the host one Hello and one program
injection each); changes that come meanwhile coalesce to the newest
(:class:`pvhost.coalesce.Coalescer`, as the guest's ``TopologyUpdate``s do).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from extpv.aio import being_cancelled, cancel_and_wait
from extpv.vcpus import VcpuThread
from pvhost.coalesce import Coalescer
from pvhost.errors import ChannelError, GuestRequestError, QmpError
from pvhost.logthrottle import LogThrottle
from pvhost.programs import SignedProgram
from pvhost.qmp import QmpMonitor
from pvhost.services.affinity import GENERIC_PROTOCOL, placement_document
from pvhost.services.base import qmp_refusal
from pvhost.services.manager import ServiceManager
from pvproto import (
    SUPPORTED_VERSIONS,
    AffinityResult,
    AffinityUpdate,
    BaseMessage,
    Error,
    GuestTopology,
    Hello,
    MapContents,
    ProgramEvent,
    ProgramLoaded,
    ProgramRecords,
    ProtocolError,
    ReadMap,
    TopologyUpdate,
    UnloadProgram,
    format_cpulist,
)
from pvproto.messages import TOPOLOGY_UPDATE_VERSION
from pvproto.ratelimit import TokenBucket
from pvproto.session import PeerSession, PeerSilent, SessionClosed, SessionState

__all__ = ["DEFAULT_KEEPALIVE", "Backoff", "Monitor", "ProgramSource", "VmSession"]

_log = logging.getLogger(__name__)

SOFTWARE_VERSION = "pvhost 0.1.0"
#: A program to inject: (program id, kind, payload, signature).
ProgramSource = Callable[[], SignedProgram]
#: What a request to the guest gets back (ProgramLoaded, MapContents).
ReplyT = TypeVar("ReplyT")
#: Plans and enacts one guest request for the named VM; returns the answer (same seq).
Applier = Callable[[str, AffinityUpdate], Awaitable[AffinityResult]]
#: Told the VM's name when its vCPU map changed or when it went away.
VmCallback = Callable[[str], Awaitable[None]]
#: (Ping interval, silence deadline) in seconds; ``[service] keepalive_*`` in the config.
DEFAULT_KEEPALIVE = (5.0, 15.0)
#: Guest port open/close changes acted on: a burst, then this many per second.
PORT_BURST = 5
PORT_RATE = 1.0
#: The guest's CPU changes (``TopologyUpdate``) acted on: a burst, then this many per second;
#: the ones that come meanwhile coalesce to the newest (each carries the whole topology).
TOPOLOGY_BURST = 5
TOPOLOGY_RATE = 1.0
#: The guest agent's frames (``[service] max_frames_per_s``) may come this many seconds' worth
#: at once; after that pvhost stops reading the VM's channel until the bucket refills.
FRAME_BURST_S = 1.0


def _fold_port_changes(waiting: tuple[bool, int], newer: tuple[bool, int]) -> tuple[bool, int]:
    """The port's newest state, and every change folded into it (for the log line)."""
    return newer[0], waiting[1] + newer[1]


class Monitor(Protocol):
    """Where a session learns a VM's vCPU threads and that it went away (QMP, or libvirt)."""

    vcpus: dict[int, VcpuThread]
    on_change: Callable[[], Awaitable[None]] | None
    on_port: Callable[[bool, int], Awaitable[None]] | None

    async def connect(self, timeout: float = 5.0) -> None: ...
    async def refresh(self, timeout: float = 5.0) -> dict[int, VcpuThread]: ...
    async def wait_closed(self) -> None: ...
    async def close(self) -> None: ...
    async def port_open(self, socket_path: Path, timeout: float = 5.0) -> bool | None: ...


class Backoff:
    """Reconnection delays: 0.1 s doubling up to ``maximum``; reset after a success."""

    def __init__(self, maximum: float) -> None:
        self.maximum = maximum
        self._next = 0.1

    def reset(self) -> None:
        self._next = 0.1

    async def wait(self) -> None:
        delay, self._next = self._next, min(self._next * 2, self.maximum)
        await asyncio.sleep(delay)


@dataclass
class ChannelStatus:
    """What the session knows of its connections, for ``pvctl status``."""

    qmp: str = "connecting"
    channel: str = "connecting"
    #: The agent's port as QEMU last reported it: open, closed, or unknown (no event yet).
    port: str = "unknown"
    #: Times the session was reset (port closed, peer silent, connection lost).
    resets: int = 0
    guest_version: str = ""
    guest_topology: GuestTopology | None = None
    #: ``TopologyUpdate``s received from the guest, and those acted on (the rest coalesced,
    #: or said nothing new).
    topology_updates: int = 0
    topology_changes: int = 0
    protocol_version: int | None = None
    programs: dict[str, str] = field(default_factory=dict)


class _GuestChannel(PeerSession["VmSession"]):
    """The protocol session of one connection to the guest agent."""

    ROLE = "host"

    def hello(self) -> Hello:
        return Hello(
            role="host",
            protocol_versions=list(SUPPORTED_VERSIONS),
            software_version=SOFTWARE_VERSION,
            capabilities=["affinity"],
            request_id=self.next_id(),
        )

    async def on_ready(self, peer: Hello, *, restarted: bool) -> None:
        if restarted:
            _log.info("%s: the guest agent restarted (new Hello)", self.owner.name)
        self.owner.guest_ready(peer, self.version)

    async def on_message(self, message: BaseMessage) -> None:
        self.owner.guest_message(self, message)

    def on_peer_error(self, error: Error) -> None:
        # A guest picks how many Errors it sends and how long they are: lines are rate-limited
        # per VM and cut short.
        self.owner.guest_log.warning(
            "%s: guest error %s: %.200s", self.owner.name, error.code, error.message
        )

    def on_bad_frame(self, error: ProtocolError) -> None:
        self.owner.guest_log.warning("%s: bad frame from guest: %.200s", self.owner.name, error)


class VmSession:
    """Owns one VM's connections. The service drives placement through its callbacks."""

    def __init__(
        self,
        name: str,
        qmp_path: Path,
        agent_path: Path,
        *,
        applier: Applier,
        on_gone: VmCallback,
        on_vcpus_changed: VmCallback,
        program: ProgramSource | None,
        on_vcpus_found: VmCallback | None = None,
        rate: float,
        burst: int,
        max_backoff: float,
        keepalive: tuple[float, float] | None = DEFAULT_KEEPALIVE,
        max_frames_per_s: float | None = None,
        monitor: Callable[[], Monitor] | None = None,
        port_events: bool = True,
        services: ServiceManager | None = None,
    ) -> None:
        self.name = name
        #: The guest agent's frames acted on per second, over all its connections
        #: (config: service.max_frames_per_s; FRAME_BURST_S of them at once).
        self._frames = (
            None
            if max_frames_per_s is None
            else TokenBucket(max_frames_per_s, max(1, int(max_frames_per_s * FRAME_BURST_S)))
        )
        #: Makes the VM's monitor (a QMP connection unless told otherwise: libvirt domains).
        self._new_monitor = monitor or self._qmp_monitor
        #: Whether the monitor reports the guest opening/closing the agent's port (QMP does;
        #: libvirt has no such event for our channel, so the port's state stays unknown).
        self._port_events = port_events
        self.qmp_path = qmp_path
        self.agent_path = agent_path
        self.status = ChannelStatus()
        self._monitor: Monitor | None = None
        self._applier = applier
        self._on_gone = on_gone
        self._on_vcpus_changed = on_vcpus_changed
        #: Told each time the monitor (re)connects and has read the vCPU threads.
        self._on_vcpus_found = on_vcpus_found
        self._program = program
        #: The paravirtual services: what to inject, and who takes the guest's records.
        self._services = services
        self._bucket = TokenBucket(rate, burst)
        self._max_backoff = max_backoff
        self._channel: _GuestChannel | None = None
        self._pending: AffinityUpdate | None = None
        self._superseded: list[int] = []
        self._wake = asyncio.Event()
        self._waiters: dict[int, asyncio.Future[ProgramLoaded]] = {}
        #: ReadMap requests waiting for their MapContents, by request id.
        self._map_waiters: dict[int, asyncio.Future[MapContents]] = {}
        #: Programs the operator loaded into this VM, by id: re-injected at every Hello.
        self._operator_programs: dict[str, SignedProgram] = {}
        self._keepalive = keepalive
        #: The guest's port changes (opened, how many changes) and CPU changes, acted on at
        #: a bounded rate, the newest winning.
        self._port_pacer: Coalescer[tuple[bool, int]] = Coalescer(
            PORT_RATE, PORT_BURST, self._act_on_port, merge=_fold_port_changes
        )
        self._topology_pacer: Coalescer[GuestTopology] = Coalescer(
            TOPOLOGY_RATE, TOPOLOGY_BURST, self._apply_topology
        )
        #: What the guest can make the host log, rate-limited for this VM.
        self.guest_log = LogThrottle(_log, name)

    # -- what the service uses ------------------------------------------------------------
    @property
    def vcpus(self) -> dict[int, VcpuThread]:
        """The VM's vCPU map as last read from QEMU (empty while QMP is down)."""
        return self._monitor.vcpus if self._monitor is not None else {}

    async def refresh_vcpus(self) -> dict[int, VcpuThread]:
        """Ask QEMU again (a vCPU may have been hot-plugged); the map is unchanged on error."""
        if self._monitor is not None:
            with contextlib.suppress(QmpError):
                await self._monitor.refresh()
        return self.vcpus

    @property
    def topology(self) -> GuestTopology | None:
        """The guest's CPUs as its agent last said (a service's view of the VM)."""
        return self.status.guest_topology

    @property
    def protocol_version(self) -> int | None:
        """The version negotiated with the agent now (None: no agent ready)."""
        channel = self._channel
        if channel is None or channel.state is not SessionState.READY:
            return None
        return channel.version

    def send(self, message: BaseMessage) -> None:
        if self._channel is None or not self._channel.send(message):
            raise ChannelError(f"VM {self.name}: the guest channel is not connected")

    def send_result(self, result: AffinityResult) -> None:
        """Send an answer if the guest is there to read it; a guest gone will ask again.

        A generic agent (protocol 4) asked nothing: the host's affinity service tracked its
        wish. It gets the answer as the ``placement`` document it publishes in the guest."""
        version = self.protocol_version
        message: BaseMessage = result
        if version is not None and version >= GENERIC_PROTOCOL:
            message = placement_document(result)
        with contextlib.suppress(ChannelError):
            self.send(message)

    def submit_update(self, update: AffinityUpdate) -> None:
        """The guest's whole wish (its own ``AffinityUpdate``, or the host-side tracker's for
        a generic agent) → the placement path: applied at most ``rate`` per second, the
        newest one wins, every one answered."""
        if self._pending is not None:
            self._superseded.append(self._pending.seq)
        self._pending = update
        self._wake.set()

    def describe(self) -> dict[str, Any]:
        st = self.status
        return {
            "qmp": st.qmp,
            "channel": st.channel,
            "session": self._channel.state.value if self._channel is not None else "none",
            "port": st.port,
            "resets": st.resets,
            "guest": st.guest_version,
            "protocol_version": st.protocol_version,
            "guest_online": (
                list(st.guest_topology.online_vcpus) if st.guest_topology is not None else None
            ),
            "topology_updates": st.topology_updates,
            "topology_changes": st.topology_changes,
            "vcpus": {
                str(i): {"tid": v.tid, "socket": v.socket, "core": v.core, "thread": v.thread}
                for i, v in sorted(self.vcpus.items())
            },
            "programs": dict(st.programs),
        }

    # -- lifecycle ---------------------------------------------------------------------------
    def _qmp_monitor(self) -> Monitor:
        return QmpMonitor(self.qmp_path, self.name)

    async def run(self, monitor: Monitor | None = None) -> None:
        """Until cancelled (the VM's directory went away): QMP up → channel; QMP down → undo."""
        backoff = Backoff(self._max_backoff)
        worker = asyncio.create_task(self._apply_loop(), name=f"apply-{self.name}")
        try:
            while True:
                if monitor is None:
                    monitor = self._new_monitor()
                    monitor.on_change = self._vcpus_changed
                    monitor.on_port = self._port_changed
                    try:
                        await monitor.connect()
                    except QmpError as err:
                        self.status.qmp = f"unreachable: {err}"
                        monitor = None
                        await backoff.wait()
                        continue
                else:
                    monitor.on_change = self._vcpus_changed
                    monitor.on_port = self._port_changed
                backoff.reset()
                self._monitor = monitor
                self.status.qmp = "connected"
                if self._on_vcpus_found is not None:
                    await self._on_vcpus_found(self.name)
                channel: asyncio.Task[None] | None = None
                try:
                    # The port's state now (an event says only what changes from here on).
                    opened = await monitor.port_open(self.agent_path)
                    if opened is not None:
                        self.status.port = "open" if opened else "closed"
                    channel = asyncio.create_task(self._channel_loop(), name=f"channel-{self.name}")
                    await monitor.wait_closed()
                finally:
                    # A port change not acted on yet was this monitor's: it says nothing of
                    # the next connection's port.
                    self._port_pacer.drop()
                    # Cancelled (pvhost stops, the VM's directory went): cancel_and_wait
                    # re-raises our cancellation, and the monitor must be closed all the same
                    # (QEMU serves one QMP client: a connection left open locks out the next).
                    try:
                        if channel is not None:
                            await cancel_and_wait(channel)
                    finally:
                        await monitor.close()
                # QEMU closed its monitor: the VM is gone (or restarting). Undo its placements.
                self.status.qmp = "closed"
                self.status.port = "unknown"
                self._monitor = None
                monitor = None
                await self._on_gone(self.name)
                await backoff.wait()
        finally:
            try:
                await cancel_and_wait(worker)
            finally:
                self._monitor = None  # closed above, on every way out of the loop

    async def _vcpus_changed(self) -> None:
        await self._on_vcpus_changed(self.name)

    async def _port_changed(self, opened: bool, changes: int) -> None:
        """QEMU: the guest opened or closed the agent's port (``changes`` coalesced)."""
        self._port_pacer.submit((opened, changes))

    def _act_on_port(self, change: tuple[bool, int]) -> None:
        opened, changes = change
        self.status.port = "open" if opened else "closed"
        _log.info(
            "%s: the guest %s the agent's port%s",
            self.name,
            "opened" if opened else "closed",
            f" ({changes} changes)" if changes > 1 else "",
        )
        channel = self._channel
        if channel is None:
            return  # the next connection greets whoever is there
        self._forget_peer()
        if opened:
            channel.greet()  # a new agent: it waits for our Hello (and greets us too)
        else:
            channel.reset()

    def _forget_peer(self) -> None:
        """The agent we talked to is gone: nothing it acked holds for the next one."""
        self.status.resets += 1
        self.status.programs.clear()
        self._topology_pacer.drop()
        for waiter in self._waiters.values():
            waiter.cancel()
        for map_waiter in self._map_waiters.values():
            map_waiter.cancel()
        self._waiters.clear()
        self._map_waiters.clear()

    async def _channel_loop(self) -> None:
        backoff = Backoff(self._max_backoff)
        while True:
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_unix_connection(str(self.agent_path)), 5
                )
            except (OSError, TimeoutError) as err:
                self.status.channel = f"unreachable: {err}"
                await backoff.wait()
                continue
            channel = _GuestChannel(self, frames=self._frames)
            self._channel = channel
            self.status.channel = "connected"
            try:
                await self._converse(channel, reader, writer)
                ended = "the guest closed the channel"
            except (ChannelError, SessionClosed, PeerSilent, OSError) as err:
                ended = str(err)
            finally:
                self._channel = None
                self._forget_peer()
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
            self.status.channel = f"closed: {ended}"
            _log.info("%s: channel: %s", self.name, ended)
            if channel.peer is not None:
                backoff.reset()  # it was a healthy conversation: reconnect quickly
            await backoff.wait()

    async def _converse(
        self, channel: _GuestChannel, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Run the session, and beside it the keepalive (PeerSilent ends both)."""
        if self._keepalive is None:
            await channel.run(reader, writer)
            return
        tasks = {
            asyncio.create_task(channel.run(reader, writer), name=f"session-{self.name}"),
            asyncio.create_task(channel.keepalive(*self._keepalive), name=f"alive-{self.name}"),
            asyncio.create_task(self._greet_unanswered(channel), name=f"greet-{self.name}"),
        }
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for task in done:
            task.result()  # what ended the conversation, for the caller

    async def _greet_unanswered(self, channel: _GuestChannel) -> None:
        """While the port is open and no Hello comes, greet again every keepalive deadline.

        An agent that is there (the port is open) but took an earlier Hello of ours for the
        end of its handshake says nothing until asked; the keepalive cannot ask a session
        that is not ready. One Hello per deadline, only to an open port (QEMU reads it); where
        the monitor reports no port changes (libvirt domains), to whatever is there.
        """
        assert self._keepalive is not None
        while True:
            await asyncio.sleep(self._keepalive[1])
            port_open = self.status.port == "open" or not self._port_events
            if channel.state is SessionState.AWAITING_HELLO and port_open:
                _log.info("%s: no Hello from the open port's agent: greeting again", self.name)
                channel.greet()

    # -- what the guest says ---------------------------------------------------------------
    def guest_ready(self, hello: Hello, version: int | None) -> None:
        self.status.guest_version = hello.software_version
        self.status.guest_topology = hello.topology
        self._topology_pacer.drop()  # the Hello's CPUs are newer than any pending update
        self.status.protocol_version = version
        for program in self._programs_to_inject():
            with contextlib.suppress(ChannelError):
                self.inject(program)
        if self._services is not None:
            self._services.ready(self.name)

    def _programs_to_inject(self) -> list[SignedProgram]:
        """What the guest should run: the default program and the enabled services'
        programs, each unless the operator replaced it under its id."""
        programs: dict[str, SignedProgram] = {}
        if self._program is not None:
            try:
                default = self._program()
                programs[default.program_id] = default
            except Exception as err:
                self.status.programs["affinity"] = f"not injected: {err}"
        if self._services is not None:
            programs.update((p.program_id, p) for p in self._services.programs(self.name))
        programs.update(self._operator_programs)
        return list(programs.values())

    def guest_message(self, channel: _GuestChannel, message: BaseMessage) -> None:
        if isinstance(message, AffinityUpdate):
            version = self.protocol_version
            if version is not None and version >= GENERIC_PROTOCOL:
                # Its wish is the host's tracker's (from the program's records): a second
                # source would fight it.
                channel.reply_error(
                    message,
                    "bad-request",
                    f"an agent of protocol {version} reports affinity as its program's records",
                )
                return
            self.submit_update(message)
        elif isinstance(message, ProgramLoaded):
            if message.program_id not in self.status.programs:
                # Not a program the host sent: keeping it would let a guest grow the host's
                # memory (and `pvctl status`) with every fresh id it makes up.
                self.guest_log.warning(
                    "%s: ignored a verdict on program %r, which the host never sent",
                    self.name,
                    message.program_id,
                )
                return
            verdict = "loaded" if message.ok else f"refused: {message.reason[:200]}"
            self.status.programs[message.program_id] = verdict
            waiter = self._waiters.pop(message.request_id, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(message)
            if message.ok and self._services is not None:
                self._services.loaded(self.name, message.program_id)
        elif isinstance(message, ProgramRecords):
            if self._services is not None:
                if message.lost:
                    self._services.lost_records(self.name, message.lost, message.program_id)
                self._services.records(self.name, message.program_id, message.records)
        elif isinstance(message, ProgramEvent):
            self._program_event(message)
        elif isinstance(message, TopologyUpdate):
            self._topology_update(channel, message)
        elif isinstance(message, MapContents):
            map_waiter = self._map_waiters.pop(message.request_id, None)
            if map_waiter is not None and not map_waiter.done():
                map_waiter.set_result(message)
        elif self._services is not None and self._services.message(self.name, message):
            pass  # a service takes it
        else:
            channel.reply_error(
                message, "bad-request", f"{type(message).__name__} is not for the host"
            )

    def _topology_update(self, channel: _GuestChannel, message: TopologyUpdate) -> None:
        """The guest's CPUs changed (hot-plug): acted on at most ``TOPOLOGY_RATE`` per second
        after a burst of ``TOPOLOGY_BURST``; meanwhile the newest one waits, alone (a guest
        sending them in a loop costs one stored topology and one service call per second)."""
        version = self.protocol_version
        if version is None or version < TOPOLOGY_UPDATE_VERSION:
            channel.reply_error(
                message,
                "bad-request",
                f"TopologyUpdate needs protocol {TOPOLOGY_UPDATE_VERSION}; "
                f"this session speaks {version}",
            )
            return
        self.status.topology_updates += 1
        self._topology_pacer.submit(message.topology)

    def _apply_topology(self, topology: GuestTopology) -> None:
        if topology == self.status.guest_topology:
            return
        old = self.status.guest_topology
        self.status.guest_topology = topology
        self.status.topology_changes += 1
        self.guest_log.log(
            logging.INFO,
            "%s: the guest's online CPUs changed: %s -> %s",
            self.name,
            format_cpulist(old.online_vcpus) if old is not None else "?",
            format_cpulist(topology.online_vcpus),
        )
        if self._services is not None:
            self._services.topology_changed(self.name)

    def _program_event(self, event: ProgramEvent) -> None:
        """A protocol-2 agent's record: ``data = {"raw": HEX}`` (the agent's routing rule)."""
        if self._services is None:
            return
        raw = event.data.get("raw")
        record = None
        # A protocol-2 agent cuts records at 4096 bytes: anything longer is not its.
        if isinstance(raw, str) and len(event.data) == 1 and len(raw) <= 2 * 4096:
            with contextlib.suppress(ValueError):
                record = bytes.fromhex(raw)
        if record is None:
            self._services.bad_records(self.name)
        else:
            self._services.records(self.name, event.program_id, [record])

    def _next_id(self) -> int:
        if self._channel is None:
            raise ChannelError(f"VM {self.name}: the guest channel is not connected")
        return self._channel.next_id()

    async def _apply_loop(self) -> None:
        while True:
            await self._wake.wait()
            await self._bucket.take()  # excess updates coalesce while this waits
            self._wake.clear()
            update, self._pending = self._pending, None
            superseded, self._superseded = self._superseded, []
            if update is None:
                continue
            result: AffinityResult | None = None
            try:
                result = await self._applier(self.name, update)
            except GuestRequestError as err:
                refused = err
            # A superseded update is answered with its seq alone: a full copy per update
            # would let a guest make the host send (and hold) its largest answer again and
            # again. The newest one's answer, right after, says where things stand. (A
            # generic agent asked nothing: it gets the newest placement document only.)
            version = self.protocol_version
            generic = version is not None and version >= GENERIC_PROTOCOL
            for seq in [] if generic else superseded:
                self.send_result(AffinityResult(seq=seq, placements=[]))
            if result is not None:
                self.send_result(result)
            else:
                self.guest_log.warning("%s: refused request: %s", self.name, refused)
                if self._channel is not None and not generic:
                    self._channel.reply_error(update, "bad-request", str(refused))

    # -- programs ----------------------------------------------------------------------------
    async def load_program(self, program: SignedProgram, timeout: float) -> ProgramLoaded:
        program_id = program.program_id
        request_id = self._next_id()
        self.status.programs[program_id] = "loading"

        def send() -> None:
            self.send(program.message(request_id=request_id))
            # The operator's wish from now on, also for a guest that reconnects before it answers.
            self._operator_programs[program_id] = program

        verdict = await self._request(
            self._waiters,
            request_id,
            send,
            timeout=timeout,
            awaited=f"ProgramLoaded for {program_id}",
            doing="loading",
        )
        if not verdict.ok and self._operator_programs.get(program_id) is program:
            del self._operator_programs[program_id]  # refused: not worth sending again
        return verdict

    async def qmp(self, command: str, arguments: Mapping[str, Any] | None = None) -> object:
        """One of the QMP commands a service may send (``qmp_refusal``), to this VM's QEMU."""
        refusal = qmp_refusal(command, arguments or {})
        if refusal is not None:
            raise ChannelError(refusal)
        monitor = self._monitor
        if not isinstance(monitor, QmpMonitor):
            raise ChannelError(f"VM {self.name}: no QMP monitor (not connected, or libvirt)")
        return await monitor.execute(command, dict(arguments or {}))

    async def read_map(
        self, program_id: str, map_name: str, *, max_entries: int = 1024, timeout: float = 5.0
    ) -> MapContents:
        """The entries of map ``map_name`` of a program loaded in the guest (protocol 3)."""
        version = self.protocol_version
        if version is None or version < 3:
            raise ChannelError(
                f"VM {self.name}: the guest agent speaks protocol {version}; reading a "
                "program's map needs protocol 3"
            )
        request_id = self._next_id()
        message = ReadMap(
            program_id=program_id, map=map_name, max_entries=max_entries, request_id=request_id
        )
        contents = await self._request(
            self._map_waiters,
            request_id,
            lambda: self.send(message),
            timeout=timeout,
            awaited=f"MapContents for {program_id}/{map_name}",
            doing="reading a map",
        )
        if contents.program_id != program_id or contents.map != map_name:
            raise ChannelError(f"VM {self.name}: the guest answered another map than asked")
        if len(contents.entries) > max_entries:
            # A service sizes its work by what it asked for; the guest does not get to decide.
            raise ChannelError(
                f"VM {self.name}: the guest answered {len(contents.entries)} entries of "
                f"{program_id}/{map_name}, more than the {max_entries} asked"
            )
        return contents

    async def _request(
        self,
        waiters: dict[int, asyncio.Future[ReplyT]],
        request_id: int,
        send: Callable[[], None],
        *,
        timeout: float,
        awaited: str,
        doing: str,
    ) -> ReplyT:
        """Send a request (``send``) and wait for the guest's reply filed under ``request_id``.

        The reply's future is registered before sending (an answer may come back at once) and
        always removed after; a timeout or a channel that closes meanwhile is a ChannelError.
        """
        waiter: asyncio.Future[ReplyT] = asyncio.get_running_loop().create_future()
        waiters[request_id] = waiter
        try:
            send()
            async with asyncio.timeout(timeout):
                return await waiter
        except TimeoutError as err:
            raise ChannelError(f"VM {self.name}: no {awaited} within {timeout:g} s") from err
        except asyncio.CancelledError as err:
            if being_cancelled():  # our own task is being cancelled: never turn that into an error
                raise
            raise ChannelError(f"VM {self.name}: the channel closed while {doing}") from err
        finally:
            waiters.pop(request_id, None)

    def inject(self, program: SignedProgram) -> None:
        """Send ``program`` to the guest, shown as ``loading`` until its verdict: a verdict
        on a program not marked so is one on a program the host never sent (dropped)."""
        self.status.programs[program.program_id] = "loading"
        self.send(program.message(request_id=self._next_id()))

    def unload_program(self, program_id: str) -> None:
        self.send(UnloadProgram(program_id=program_id, request_id=self._next_id()))
        self.status.programs.pop(program_id, None)
        self._operator_programs.pop(program_id, None)
