"""The agent's core: programs loaded on the host's behalf, and the protocol session with the
host over any byte stream (virtio-serial port, unix socket). It holds no service logic.

One :class:`Agent` lives as long as the daemon; :meth:`Agent.serve` runs one connection.
Programs outlive connections; a host that reconnects gets a fresh ``Hello``, and its
services read the programs' maps to learn what they missed.

The contract (protocol 4, docs/services.md): every ring buffer's records are forwarded
verbatim, undecoded, in batches as ``ProgramRecords`` (the host's service for the program
knows their layout); an object's iterator programs run once after it is attached, before the
load is answered (:mod:`pvagent.loaders.libbpf`); the host may read any map of a program it
loaded (``ReadMap`` → ``MapContents``) and asks the agent to publish documents in the guest
(``GuestDocument`` → ``<documents_dir>/NAME.json``).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
from dataclasses import dataclass, field
from pathlib import Path

from pvagent import libbpf_ctypes
from pvagent.errors import AgentError, LoadFailed, TrustRefused
from pvagent.loaders import load
from pvagent.program import EventSink, LoadedProgram
from pvagent.replay import VersionBook
from pvagent.trust import TrustPolicy
from pvproto import (
    AGENT_VERSIONS,
    SUPPORTED_VERSIONS,
    BaseMessage,
    Error,
    GuestDocument,
    GuestTopology,
    Hello,
    LoadProgram,
    MapContents,
    MapEntry,
    ProgramLoaded,
    ProgramRecords,
    ProtocolError,
    ReadMap,
    TopologyUpdate,
    UnloadProgram,
)
from pvproto.messages import (
    MAX_MAP_KEY_BYTES,
    MAX_MAP_VALUE_BYTES,
    MAX_RECORD_BYTES,
    MAX_RECORDS,
    TOPOLOGY_UPDATE_VERSION,
)
from pvproto.session import PeerSession, SessionClosed, SessionState

__all__ = ["MAX_DOCUMENTS", "Agent", "ProgramLimits"]

log = logging.getLogger(__name__)

#: Records in one wake-up that mean "storm": the reader then pauses _STORM_PAUSE_S.
_STORM_BATCH = 32
_STORM_PAUSE_S = 0.002
#: Distinct documents the host may publish in the guest (each at most 64 KiB).
MAX_DOCUMENTS = 16
_SOFTWARE_VERSION = "pvagent 0.2.0"


@dataclass(frozen=True)
class ProgramLimits:
    """Per-guest caps on what programs the host may keep loaded in this guest."""

    #: Programs loaded at once (all ids; replacing a program under its id does not count).
    max_programs: int = 8
    #: Kernel memory (fdinfo ``memlock``) of all loaded programs and their maps, bytes.
    max_memory_bytes: int = 64 << 20


def _mib(size: int) -> str:
    return f"{size / (1 << 20):.1f} MiB"


@dataclass
class _Running:
    program: LoadedProgram
    sha256: str
    #: Records waiting for the end of this wake-up, per ring buffer (protocol 3).
    batches: dict[str, list[bytes]] = field(default_factory=dict)
    #: Records taken from each ring buffer so far (the next batch's ``first_seq``).
    taken: dict[str, int] = field(default_factory=dict)
    #: Records dropped since the last batch that went out (no host, or the host lagging).
    lost: int = 0


class _HostSession(PeerSession["Agent"]):
    """The protocol session of one host connection; the agent acts on what it carries."""

    ROLE = "guest"

    def __init__(self, owner: Agent) -> None:
        # Negotiates protocol 4 only, but reads (and greets in) every version pvproto knows:
        # a host's Hello is written in its lowest version, and an older host must be able
        # to read ours to answer ``unsupported``.
        super().__init__(owner, versions=AGENT_VERSIONS, readable=SUPPORTED_VERSIONS)
        #: The topology this host was last told (in our Hello, or a TopologyUpdate).
        self.told: GuestTopology | None = None

    def hello(self) -> Hello:
        hello = self.owner.hello()
        self.told = hello.topology
        return hello

    def tell_topology(self) -> None:
        """Tell a ready host of protocol 5+ the guest's CPUs if they changed since it was last
        told (an older host learns them at the next Hello only)."""
        topology = self.owner.topology
        if (
            self.ready
            and self.version is not None
            and self.version >= TOPOLOGY_UPDATE_VERSION
            and topology != self.told
            and self.send(TopologyUpdate(topology=topology))
        ):
            self.told = topology
            log.info("told the host: online CPUs now %s", topology.online_vcpus)

    @property
    def ready(self) -> bool:
        return self.state is SessionState.READY

    async def on_ready(self, peer: Hello, *, restarted: bool) -> None:
        log.info(
            "host said hello (%s, protocol %s%s)",
            peer.software_version,
            self.version,
            ", again" if restarted else "",
        )
        self.owner._conn = self
        self.tell_topology()  # the CPUs changed between our Hello and the host's answer

    async def on_message(self, message: BaseMessage) -> None:
        await self.owner.handle(self, message)

    def on_peer_error(self, error: Error) -> None:
        log.warning(
            "host reports an error (request %d): %s: %s",
            error.request_id,
            error.code,
            error.message,
        )

    def on_bad_frame(self, error: ProtocolError) -> None:
        log.warning("bad frame from the host: %s", error)


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


class Agent:
    """Loads trusted programs, forwards their records, talks to the host (module docstring)."""

    def __init__(
        self,
        topology: GuestTopology,
        policy: TrustPolicy,
        *,
        bcc_cache_dir: Path | None = None,
        documents_dir: Path | None = None,
        limits: ProgramLimits | None = None,
        versions_file: Path | None = None,
    ) -> None:
        self.topology = topology
        self.limits = limits or ProgramLimits()
        #: Newest version accepted per program id: an older one is a replay.
        self.versions = VersionBook(versions_file)
        #: Where the host's documents are published (None: nowhere).
        self.documents_dir = documents_dir
        self._documents: set[str] = set()
        self.policy = policy
        self.bcc_cache_dir = bcc_cache_dir
        self.programs: dict[str, _Running] = {}
        self._conn: _HostSession | None = None
        self._load_lock = asyncio.Lock()
        self._records = 0  # ring-buffer records received, all programs
        #: Records not forwarded (no host connected, or the host lagging).
        self.dropped_events = 0

    # -- connection -----------------------------------------------------------------
    def hello(self) -> Hello:
        caps = ["bpf-object"]
        if importlib.util.find_spec("bcc") is not None:
            caps.append("bcc-source")
        return Hello(
            role="guest",
            protocol_versions=list(AGENT_VERSIONS),
            software_version=_SOFTWARE_VERSION,
            capabilities=caps,
            topology=self.topology,
        )

    def set_topology(self, topology: GuestTopology) -> bool:
        """The guest's CPUs as read now (``pvagent.cpuwatch``): kept for the next Hello, and
        told to a connected host of protocol 5+ at once. True if they changed."""
        if topology == self.topology:
            return False
        log.info("online CPUs changed: %s -> %s", self.topology.online_vcpus, topology.online_vcpus)
        self.topology = topology
        conn = self._conn
        if conn is not None:
            conn.tell_topology()
        return True

    def publish(self, document: GuestDocument) -> str | None:
        """Write a host document to ``documents_dir/NAME.json``; None, or why not.

        Its name was checked by the message model (no separator, no leading dot), its
        content is JSON of at most 64 KiB; at most :data:`MAX_DOCUMENTS` distinct names."""
        if self.documents_dir is None:
            return None  # publishing is off: nothing to refuse
        name = document.name
        if name not in self._documents and len(self._documents) >= MAX_DOCUMENTS:
            return f"at most {MAX_DOCUMENTS} documents; {name!r} would be one more"
        path = self.documents_dir / f"{name}.json"
        try:
            _write_atomically(path, document.content.rstrip("\n") + "\n")
        except OSError as err:
            log.warning("cannot write %s: %s", path, err)
            return f"cannot write {name}.json: {err.strerror}"
        self._documents.add(name)
        log.info("published %s", path)
        return None

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Run one host connection until it closes. Never raises for bad peer input."""
        session = _HostSession(self)
        try:
            await session.run(reader, writer)
        except SessionClosed as err:
            log.warning("host session closed: %s", err)
        except (ConnectionError, OSError) as err:
            log.info("host connection lost: %s", err)
        finally:
            if self._conn is session:
                self._conn = None
            # Give queued replies (an Error before closing) a moment, then drop the rest:
            # a vanished host would never read it, and a virtio port would block on it.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.drain(), 1.0)
            # Not when it closed itself (a write failed: the port was unplugged, the host
            # closed): asyncio's pipe transport has let go of its loop by then, and abort()
            # raises AttributeError, which ended the agent (seen on a port replug).
            if not writer.transport.is_closing():
                writer.transport.abort()

    async def handle(self, session: PeerSession[Agent], message: BaseMessage) -> None:
        """Act on one message of a ready session (Hello, Ping and Error are the session's)."""
        rid = message.request_id
        if isinstance(message, GuestDocument):
            why = self.publish(message)
            if why is not None:
                session.reply_error(message, "bad-request", why)
        elif isinstance(message, LoadProgram):
            reply = await self.load_program(message)
            session.send(reply.model_copy(update={"request_id": rid}))
        elif isinstance(message, ReadMap):
            answer = self.read_map(message)
            if isinstance(answer, str):
                session.reply_error(message, "bad-request", answer)
            else:
                session.send(answer.model_copy(update={"request_id": rid}))
        elif isinstance(message, UnloadProgram):
            if message.program_id not in self.programs:
                session.reply_error(
                    message, "bad-request", f"no program {message.program_id!r} is loaded"
                )
            else:
                self.unload(message.program_id)
        else:
            session.reply_error(
                message, "bad-request", f"{type(message).__name__} is not sent to a guest"
            )

    # -- programs -------------------------------------------------------------------
    async def load_program(self, message: LoadProgram) -> ProgramLoaded:
        """Trust check, caps, then vet, load and attach; the verdict for the host."""
        pid = message.program_id
        try:
            self.policy.check(message)
            self.versions.check(pid, message.version)
        except TrustRefused as err:
            log.warning("refused program %s: %s", pid, err)
            return ProgramLoaded(program_id=pid, ok=False, reason=f"untrusted: {err}")
        async with self._load_lock:
            running = self.programs.get(pid)
            if running is not None and running.sha256 == message.sha256:
                self.versions.record(pid, message.version)
                return ProgramLoaded(
                    program_id=pid, ok=True, log="identical program already loaded"
                )
            if running is None and len(self.programs) >= self.limits.max_programs:
                reason = (
                    f"too many programs: {len(self.programs)} loaded, the cap is "
                    f"{self.limits.max_programs} (max_programs); unload one first"
                )
                log.warning("refused program %s: %s", pid, reason)
                return ProgramLoaded(program_id=pid, ok=False, reason=reason)
            self.versions.record(pid, message.version)
            if running is not None:
                self._close(pid)
            try:
                program = await asyncio.to_thread(
                    load,
                    pid,
                    message.kind,
                    message.payload,
                    self._sink_for(pid),
                    vet=self.policy.vet,
                    bcc_cache_dir=self.bcc_cache_dir,
                )
            except (LoadFailed, TrustRefused) as err:
                log.warning("program %s failed to load: %s", pid, err)
                if isinstance(err, TrustRefused):
                    return ProgramLoaded(program_id=pid, ok=False, reason=f"untrusted: {err}")
                return ProgramLoaded(
                    program_id=pid, ok=False, reason=str(err)[:4096], log=err.log[-65536:]
                )
            except Exception as err:  # a loader bug must not end the agent: report it
                log.exception("program %s: unexpected loader failure", pid)
                return ProgramLoaded(
                    program_id=pid, ok=False, reason=f"internal error: {err}"[:4096]
                )
            used = sum(r.program.memory_bytes for r in self.programs.values())
            if used + program.memory_bytes > self.limits.max_memory_bytes:
                program.close()
                reason = (
                    f"program {pid} needs {_mib(program.memory_bytes)} of kernel memory; with "
                    f"{_mib(used)} loaded that exceeds the cap of "
                    f"{_mib(self.limits.max_memory_bytes)} (max_program_memory_mib)"
                )
                log.warning("refused program %s: %s", pid, reason)
                return ProgramLoaded(program_id=pid, ok=False, reason=reason)
            self._start(pid, program, message.sha256)
        log.info(
            "program %s attached at %s (%s)",
            pid,
            ", ".join(program.attach_points),
            _mib(program.memory_bytes),
        )
        return ProgramLoaded(program_id=pid, ok=True)

    def _start(self, pid: str, program: LoadedProgram, sha256: str) -> None:
        self.programs[pid] = _Running(program, sha256)
        asyncio.get_running_loop().add_reader(program.fileno(), self._drain, pid)

    def _sink_for(self, pid: str) -> EventSink:
        def sink(ringbuf: str, record: bytes) -> None:
            self._records += 1
            running = self.programs.get(pid)
            conn = self._conn
            if running is None or conn is None or not conn.ready:
                self.dropped_events += 1
                if running is not None:
                    running.lost += 1
            else:
                # Batched until the end of this wake-up (_drain flushes), as bytes.
                batch = running.batches.setdefault(ringbuf, [])
                batch.append(record[:MAX_RECORD_BYTES])
                if len(batch) >= MAX_RECORDS:
                    self._flush(running)

        return sink

    def _drain(self, pid: str) -> None:
        running = self.programs.get(pid)
        if running is None:
            return
        before = self._records
        try:
            running.program.consume()
        except Exception:
            log.exception("program %s: event handling failed", pid)
        self._flush(running)
        if self._records - before >= _STORM_BATCH:
            # A storm: stop waking up per record; let them gather for a moment (the ring
            # buffer holds seconds of them), then take them in one batch. Bounded delay.
            loop = asyncio.get_running_loop()
            loop.remove_reader(running.program.fileno())
            loop.call_later(_STORM_PAUSE_S, self._resume, pid, running)

    def _flush(self, running: _Running) -> None:
        """Send the records gathered per ring buffer as ``ProgramRecords``."""
        conn = self._conn
        for ringbuf, records in running.batches.items():
            if not records:
                continue
            first = running.taken.get(ringbuf, 0)
            running.taken[ringbuf] = first + len(records)
            batch = ProgramRecords(
                program_id=running.program.program_id,
                ringbuf=ringbuf,
                first_seq=first,
                records=records,
                lost=running.lost,
            )
            if conn is not None and conn.ready and conn.send(batch, droppable=True):
                running.lost = 0
            else:
                self.dropped_events += len(records)
                running.lost += len(records)
        running.batches.clear()

    def read_map(self, request: ReadMap) -> MapContents | str:
        """The entries of one map of a loaded program (for the host to resynchronise), or why
        not. Hash and array maps with keys and values of at most 256 bytes."""
        running = self.programs.get(request.program_id)
        if running is None:
            return f"no program {request.program_id!r} is loaded"
        fd = running.program.map_fd(request.map)
        if fd is None:
            return f"program {request.program_id!r} has no map {request.map!r}"
        info = libbpf_ctypes.fdinfo(fd)
        try:
            key_size, value_size = int(info["key_size"]), int(info["value_size"])
        except (KeyError, ValueError):
            return f"map {request.map!r} cannot be described (no fdinfo)"
        if not 0 < key_size <= MAX_MAP_KEY_BYTES or not 0 < value_size <= MAX_MAP_VALUE_BYTES:
            return (
                f"map {request.map!r} has {key_size}-byte keys and {value_size}-byte values; "
                f"at most {MAX_MAP_KEY_BYTES} and {MAX_MAP_VALUE_BYTES} can be read"
            )
        try:
            keys = libbpf_ctypes.map_keys(fd, key_size, limit=request.max_entries + 1)
            entries = []
            for key in keys[: request.max_entries]:
                value = libbpf_ctypes.map_lookup(fd, key, value_size)
                if value is not None:  # deleted meanwhile
                    entries.append(MapEntry(key=key, value=value))
        except (OSError, AgentError) as err:
            return f"cannot read map {request.map!r}: {err}"
        return MapContents(
            program_id=request.program_id,
            map=request.map,
            entries=entries,
            truncated=len(keys) > request.max_entries,
        )

    def _resume(self, pid: str, running: _Running) -> None:
        if self.programs.get(pid) is not running:
            return  # unloaded or replaced meanwhile
        asyncio.get_running_loop().add_reader(running.program.fileno(), self._drain, pid)
        self._drain(pid)

    def unload(self, pid: str) -> None:
        """Detach and free a program."""
        self._close(pid)

    def _close(self, pid: str) -> None:
        running = self.programs.pop(pid, None)
        if running is None:
            return
        program = running.program
        asyncio.get_running_loop().remove_reader(program.fileno())
        program.close()
        log.info("program %s unloaded", pid)

    def close(self) -> None:
        for pid in list(self.programs):
            self._close(pid)
