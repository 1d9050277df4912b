"""The agent's core: programs loaded on the host's behalf, the affinity tracker, and the
protocol session with the host over any byte stream (virtio-serial port, unix socket).

One :class:`Agent` lives as long as the daemon; :meth:`Agent.serve` runs one connection.
Programs and tracker state outlive connections, so a host that reconnects gets a fresh
``Hello`` and the whole current ``AffinityUpdate`` again (docs/interfaces.md).

Routing rule (the contract): a ring buffer named ``pv_affinity`` carries
``struct pv_affinity_event`` and feeds the tracker; any other ring buffer's records are
forwarded verbatim, undecoded (the host's service for the program knows their layout): in
batches as ``ProgramRecords`` (bytes) to a host of protocol 3, one
``ProgramEvent{data: {"raw": <hex>}}`` each to a host of protocol 2. The host may read any map
of a program it loaded (``ReadMap`` → ``MapContents``, protocol 3) to resynchronise.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import logging
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

from pvagent import libbpf_ctypes
from pvagent.affinity_event import MASK_BYTES, TRACKED, EventError, decode, mask_cpus
from pvagent.errors import AgentError, LoadFailed, TrustRefused
from pvagent.loaders import load
from pvagent.procscan import pinned_threads
from pvagent.program import EventSink, LoadedProgram
from pvagent.replay import VersionBook
from pvagent.tracker import AffinityTracker
from pvagent.trust import TrustPolicy
from pvproto import (
    SUPPORTED_VERSIONS,
    AffinityResult,
    AffinityUpdate,
    BaseMessage,
    Error,
    GuestTopology,
    Hello,
    LoadProgram,
    MapContents,
    MapEntry,
    ProgramEvent,
    ProgramLoaded,
    ProgramRecords,
    ProtocolError,
    ReadMap,
    UnloadProgram,
)
from pvproto.messages import MAX_MAP_KEY_BYTES, MAX_MAP_VALUE_BYTES, MAX_RECORD_BYTES, MAX_RECORDS
from pvproto.session import PeerSession, SessionClosed, SessionState

__all__ = ["AFFINITY_RINGBUF", "Agent", "ProgramLimits"]

log = logging.getLogger(__name__)

AFFINITY_RINGBUF = "pv_affinity"
_TRACKED_MAP = "pv_tracked"
_STATE_MAP = "pv_state"
_STATE_LOST = 1
_MAX_RAW_EVENT = 4096  # bytes of a forwarded record (hex doubles it)
#: Delay of the ring-buffer loss check after events arrive (one map read per interval).
_LOST_CHECK_S = 0.010
#: Records in one wake-up that mean "storm": the reader then pauses _STORM_PAUSE_S.
_STORM_BATCH = 32
_STORM_PAUSE_S = 0.002
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_SOFTWARE_VERSION = "pvagent 0.1.0"


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
    lost_seen: int = 0
    lost_check_due: bool = False
    #: Records waiting for the end of this wake-up, per ring buffer (protocol 3).
    batches: dict[str, list[bytes]] = field(default_factory=dict)
    #: Records taken from each ring buffer so far (the next batch's ``first_seq``).
    taken: dict[str, int] = field(default_factory=dict)
    #: Records dropped since the last batch that went out (no host, or the host lagging).
    lost: int = 0


class _HostSession(PeerSession["Agent"]):
    """The protocol session of one host connection; the agent acts on what it carries."""

    ROLE = "guest"

    def hello(self) -> Hello:
        return self.owner.hello()

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
        self.send(self.owner.tracker.update())  # the whole state, after every host Hello

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
    """Loads trusted programs, tracks affinity, talks to the host (see module docstring)."""

    def __init__(
        self,
        topology: GuestTopology,
        policy: TrustPolicy,
        *,
        coalesce_s: float = 0.020,
        bcc_cache_dir: Path | None = None,
        placement_file: Path | None = None,
        limits: ProgramLimits | None = None,
        versions_file: Path | None = None,
    ) -> None:
        self.topology = topology
        self.limits = limits or ProgramLimits()
        #: Newest version accepted per program id: an older one is a replay.
        self.versions = VersionBook(versions_file)
        self.placement_file = placement_file
        self.policy = policy
        self.bcc_cache_dir = bcc_cache_dir
        self.tracker = AffinityTracker(topology.online_vcpus, self._publish, window=coalesce_s)
        self.programs: dict[str, _Running] = {}
        self._conn: _HostSession | None = None
        self._load_lock = asyncio.Lock()
        self._event_seq = 0
        self.bad_events = 0
        self._records = 0  # ring-buffer records received, all programs
        #: ProgramEvents not forwarded (no host connected, or the host lagging).
        self.dropped_events = 0

    # -- connection -----------------------------------------------------------------
    def hello(self) -> Hello:
        caps = ["bpf-object"]
        if importlib.util.find_spec("bcc") is not None:
            caps.append("bcc-source")
        return Hello(
            role="guest",
            protocol_versions=list(SUPPORTED_VERSIONS),
            software_version=_SOFTWARE_VERSION,
            capabilities=caps,
            topology=self.topology,
        )

    def _record_placement(self, result: AffinityResult) -> None:
        """Make the host's answer visible in the guest: the log, and ``placement_file``."""
        for p in result.placements:
            if p.refused:
                log.warning("host refused vCPU %d: %s", p.vcpu, p.refused)
            else:
                log.info("host placed vCPU %d on pCPU %s (%s)", p.vcpu, p.pcpu, result.policy)
        if self.placement_file is None:
            return
        doc = result.model_dump(mode="json", exclude={"type"})
        try:
            _write_atomically(self.placement_file, json.dumps(doc, indent=1) + "\n")
        except OSError as err:
            log.warning("cannot write %s: %s", self.placement_file, err)

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
            writer.transport.abort()

    async def handle(self, session: PeerSession[Agent], message: BaseMessage) -> None:
        """Act on one message of a ready session (Hello, Ping and Error are the session's)."""
        rid = message.request_id
        if isinstance(message, AffinityResult):
            self._record_placement(message)
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

    def _publish(self, update: AffinityUpdate) -> None:
        if self._conn is not None and self._conn.ready:
            self._conn.send(update)

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
            keep = self.tracker.threads if running is not None else {}
            if running is not None:
                self._close(pid, clear=False)
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
                if keep:
                    self.tracker.clear()
                if isinstance(err, TrustRefused):
                    return ProgramLoaded(program_id=pid, ok=False, reason=f"untrusted: {err}")
                return ProgramLoaded(
                    program_id=pid, ok=False, reason=str(err)[:4096], log=err.log[-65536:]
                )
            except Exception as err:  # a loader bug must not end the agent: report it
                log.exception("program %s: unexpected loader failure", pid)
                if keep:
                    self.tracker.clear()
                return ProgramLoaded(
                    program_id=pid, ok=False, reason=f"internal error: {err}"[:4096]
                )
            used = sum(r.program.memory_bytes for r in self.programs.values())
            if used + program.memory_bytes > self.limits.max_memory_bytes:
                program.close()
                if keep:
                    self.tracker.clear()
                reason = (
                    f"program {pid} needs {_mib(program.memory_bytes)} of kernel memory; with "
                    f"{_mib(used)} loaded that exceeds the cap of "
                    f"{_mib(self.limits.max_memory_bytes)} (max_program_memory_mib)"
                )
                log.warning("refused program %s: %s", pid, reason)
                return ProgramLoaded(program_id=pid, ok=False, reason=reason)
            self._start(pid, program, message.sha256)
            if AFFINITY_RINGBUF in program.ringbufs:
                if running is None:
                    # A fresh agent (started, restarted, after a crash): threads pinned
                    # before it are still the guest's wish; the tracker keeps the requests.
                    found = await asyncio.to_thread(pinned_threads)
                    keep = {t: c for t, c in found.items() if self.tracker.request_of(c)}
                self._seed(program, keep)
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
            if ringbuf == AFFINITY_RINGBUF:
                try:
                    self.tracker.handle(decode(record))
                except EventError as err:
                    self.bad_events += 1
                    if self.bad_events == 1:
                        log.warning("program %s: %s", pid, err)
                return
            self._event_seq += 1
            running = self.programs.get(pid)
            conn = self._conn
            if running is None or conn is None or not conn.ready:
                self.dropped_events += 1
                if running is not None:
                    running.lost += 1
            elif (conn.version or 0) >= 3:
                # Batched until the end of this wake-up (_drain flushes), as bytes.
                batch = running.batches.setdefault(ringbuf, [])
                batch.append(record[:MAX_RECORD_BYTES])
                if len(batch) >= MAX_RECORDS:
                    self._flush(running)
            else:
                event = ProgramEvent(
                    program_id=pid, seq=self._event_seq, data={"raw": record[:_MAX_RAW_EVENT].hex()}
                )
                if not conn.send(event, droppable=True):
                    self.dropped_events += 1

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
        if AFFINITY_RINGBUF in running.program.ringbufs and not running.lost_check_due:
            # At most one loss check per interval, however many wake-ups a storm causes.
            running.lost_check_due = True
            asyncio.get_running_loop().call_later(_LOST_CHECK_S, self._check_lost, running)

    def _flush(self, running: _Running) -> None:
        """Send the records gathered per ring buffer as ``ProgramRecords`` (protocol 3)."""
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

    def _check_lost(self, running: _Running) -> None:
        """If the ring buffer overflowed, rebuild the tracker from the kernel's own table."""
        running.lost_check_due = False
        if all(r is not running for r in self.programs.values()):
            return  # unloaded meanwhile
        fd = running.program.map_fd(_STATE_MAP)
        if fd is None:
            return
        try:
            raw = libbpf_ctypes.map_lookup(fd, _U32.pack(_STATE_LOST), _U64.size)
        except (OSError, AgentError) as err:
            log.debug("cannot read %s: %s", _STATE_MAP, err)
            return
        lost = _U64.unpack(raw)[0] if raw else 0
        if lost == running.lost_seen:
            return
        log.warning(
            "%d affinity event(s) lost (ring buffer full): resynchronising",
            lost - running.lost_seen,
        )
        running.lost_seen = lost
        self.resync(running.program)

    def resync(self, program: LoadedProgram) -> None:
        """Replace the tracker's table by the kernel's tracked map (tid → last mask)."""
        fd = program.map_fd(_TRACKED_MAP)
        if fd is None:
            return
        masks: dict[int, frozenset[int]] = {}
        for key in libbpf_ctypes.map_keys(fd, _U32.size, limit=1 << 16):
            value = libbpf_ctypes.map_lookup(fd, key, TRACKED.size)
            if value is not None:
                nbytes, _pad, mask = TRACKED.unpack(value)
                masks[_U32.unpack(key)[0]] = mask_cpus(mask[:nbytes])
        self.tracker.replace_all(masks)

    def _seed(self, program: LoadedProgram, keep: dict[int, frozenset[int]]) -> None:
        """Hand the requests known before a program replacement to the new program's table,
        so their threads' exits are still reported; requests of dead threads are dropped."""
        live = {tid: cpus for tid, cpus in keep.items() if os.path.exists(f"/proc/{tid}")}
        fd = program.map_fd(_TRACKED_MAP)
        if fd is not None:
            for tid, cpus in live.items():
                mask = sum(1 << c for c in cpus).to_bytes(MASK_BYTES, "little")
                try:
                    libbpf_ctypes.map_update(fd, _U32.pack(tid), TRACKED.pack(MASK_BYTES, 0, mask))
                except OSError as err:
                    log.warning("cannot carry thread %d over to the new program: %s", tid, err)
        self.tracker.replace_all(live)

    def unload(self, pid: str) -> None:
        """Detach and free a program; forget the requests it reported."""
        self._close(pid, clear=True)

    def _close(self, pid: str, *, clear: bool) -> None:
        running = self.programs.pop(pid, None)
        if running is None:
            return
        program = running.program
        asyncio.get_running_loop().remove_reader(program.fileno())
        program.close()
        if clear and AFFINITY_RINGBUF in program.ringbufs:
            self.tracker.clear()
        log.info("program %s unloaded", pid)

    def close(self) -> None:
        for pid in list(self.programs):
            self._close(pid, clear=False)
        self.tracker.close()
