"""A fake guest *peer*: tests and benchmarks play the guest agent on a VM's channel socket.

With an empty machine (``VMSpec.empty``) there is no guest OS, so nothing could answer on the
virtio side of the agent port; a test driver serves ``agent.sock`` instead, as QEMU's chardev
would, and speaks pvproto as the guest. pvhost connects to it exactly as to a real VM.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import struct
import time
from pathlib import Path

from pvproto import (
    AGENT_VERSIONS,
    AffinityResult,
    AffinityUpdate,
    BaseMessage,
    FrameDecoder,
    GuestDocument,
    GuestTopology,
    Hello,
    LoadProgram,
    MapContents,
    MapEntry,
    Ping,
    Pong,
    ProgramLoaded,
    ProgramRecords,
    ProtocolError,
    ReadMap,
    encode,
)

#: Protocol versions of agents that track affinity in the guest (AffinityUpdate/Result).
TRACKING_AGENT_VERSIONS = (2, 3)
#: Protocol versions of the generic agent: it forwards the affinity program's records and
#: publishes the host's ``placement`` document (5: and says when its CPUs change).
GENERIC_AGENT_VERSIONS = AGENT_VERSIONS

# The guest program's layouts (bpf/affinity.h), written here as the guest's kernel would:
# struct pv_affinity_event (kind tgid tid target mask_bytes flags ktime_ns, 128-byte mask)
# and struct pv_affinity_tracked (mask_bytes, pad, mask), keyed by tid.
_EVENT = struct.Struct("<IIIIIIQ128s")
_TRACKED = struct.Struct("<II128s")
_SET, _EXIT = 1, 2
#: The made-up tid of the guest thread that pins itself to vCPU n.
_TID_BASE = 100_000

__all__ = ["GENERIC_AGENT_VERSIONS", "TRACKING_AGENT_VERSIONS", "FakeGuestChannel"]


class FakeGuestChannel:
    """Serves ``agent.sock`` like QEMU's chardev would, and speaks as the guest agent.

    Named a fake on purpose: without a guest OS nothing can answer on the virtio side; this is
    the guest *peer* (test driver), not a stand-in for any host component under test.
    """

    def __init__(
        self,
        path: Path,
        vcpus: int = 3,
        accept_programs: bool = True,
        *,
        generic: bool = False,
        versions: tuple[int, ...] | None = None,
    ) -> None:
        self.path = path
        self.vcpus = vcpus
        self.accept_programs = accept_programs
        #: Play the generic agent (protocol 4): a pin is the affinity program's records, the
        #: answer the ``placement`` document; else an agent that tracks (2, 3).
        self.generic = generic
        #: The versions its Hello offers (default: those of the agent it plays).
        self.versions = versions or (GENERIC_AGENT_VERSIONS if generic else TRACKING_AGENT_VERSIONS)
        #: Generic: the affinity program's pv_tracked table (tid → its one vCPU).
        self.tracked: dict[int, int] = {}
        self._record_seq = 0
        self.connections = 0
        #: Host Hellos received, all connections (one per connection when nothing resets).
        self.hellos = 0
        #: Answer the host's keepalive Pings (False: play a silent, hung agent).
        self.answer_pings = True
        self.received: asyncio.Queue[BaseMessage] = asyncio.Queue()
        self.programs: list[LoadProgram] = []
        #: Frames from the host that did not decode (a test asserts there are none).
        self.bad_frames: list[ProtocolError] = []
        #: ReadMap requests received, all connections (a test bounds the host's resyncs).
        self.map_reads = 0
        self._writer: asyncio.StreamWriter | None = None
        self._connected = asyncio.Event()
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._serve, str(self.path))

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writer = writer
        writer.write(
            encode(
                Hello(
                    role="guest",
                    # By default an agent that tracks affinity itself and sends
                    # AffinityUpdate (the protocols before the generic agent's 4): pvhost
                    # serves those too.
                    protocol_versions=list(self.versions),
                    software_version="test-guest",
                    topology=GuestTopology(online_vcpus=list(range(self.vcpus))),
                )
            )
        )
        self._connected.set()
        decoder = FrameDecoder()
        with contextlib.suppress(OSError):
            while chunk := await reader.read(65536):
                for item in decoder.feed(chunk):
                    if isinstance(item, ProtocolError):
                        self.bad_frames.append(item)
                        continue
                    if isinstance(item, Hello):
                        self.hellos += 1
                    elif isinstance(item, Ping) and self.answer_pings:
                        writer.write(encode(Pong(nonce=item.nonce, request_id=item.request_id)))
                    if isinstance(item, LoadProgram):
                        self.programs.append(item)
                        reason = "" if self.accept_programs else "untrusted"
                        writer.write(encode(ProgramLoaded(
                            program_id=item.program_id, ok=self.accept_programs,
                            reason=reason, request_id=item.request_id)))  # fmt: skip
                    if isinstance(item, ReadMap):
                        self.map_reads += 1
                    if isinstance(item, ReadMap) and self.generic:
                        writer.write(encode(self._map(item)))  # (a test answers otherwise)
                    await self.received.put(item)
        self._connected.clear()

    async def connected(self, timeout: float = 10) -> None:
        async with asyncio.timeout(timeout):
            await self._connected.wait()

    def send(self, message: BaseMessage) -> None:
        assert self._writer is not None, "the host is not connected"
        self._writer.write(encode(message))

    async def expect(self, kind: type[BaseMessage], timeout: float = 10) -> BaseMessage:
        """The next message of ``kind`` from the host (others are skipped)."""
        async with asyncio.timeout(timeout):
            while True:
                message = await self.received.get()
                if isinstance(message, kind):
                    return message

    def _map(self, request: ReadMap) -> MapContents:
        """The generic agent's answer: pv_tracked as the guest program keeps it; others empty."""
        entries = []
        if request.program_id == "affinity" and request.map == "pv_tracked":
            entries = [
                MapEntry(key=tid.to_bytes(4, "little"), value=_TRACKED.pack(128, 0, _mask(v)))
                for tid, v in sorted(self.tracked.items())
            ][: request.max_entries]
        return MapContents(
            program_id=request.program_id, map=request.map, entries=entries,
            request_id=request.request_id,
        )  # fmt: skip

    async def update(self, seq: int, wanted: list[int], timeout: float = 10) -> AffinityResult:
        """Pin one guest thread to each vCPU of ``wanted`` (and end the others): an
        AffinityUpdate, and the AffinityResult with its seq. Generic (protocol 4): the
        affinity program's records instead, and the ``placement`` document whose placements
        are for exactly ``wanted`` (its seq is the host's)."""
        if self.generic:
            return await self._pin(wanted, timeout)
        self.send(AffinityUpdate(seq=seq, wanted=wanted))
        async with asyncio.timeout(timeout):
            while True:
                result = await self.expect(AffinityResult, timeout)
                assert isinstance(result, AffinityResult)
                if result.seq == seq:
                    return result

    async def _pin(self, wanted: list[int], timeout: float) -> AffinityResult:
        now = time.monotonic_ns()
        records = []
        for tid, vcpu in sorted(self.tracked.items()):
            if vcpu not in wanted:
                del self.tracked[tid]
                records.append(_EVENT.pack(_EXIT, tid, tid, 0, 0, 0, now, bytes(128)))
        for vcpu in wanted:
            tid = _TID_BASE + vcpu
            if tid not in self.tracked:
                self.tracked[tid] = vcpu
                records.append(_EVENT.pack(_SET, tid, tid, 0, 128, 0, now, _mask(vcpu)))
        if records:
            self.send(ProgramRecords(
                program_id="affinity", ringbuf="pv_affinity", first_seq=self._record_seq,
                records=records,
            ))  # fmt: skip
            self._record_seq += len(records)
        async with asyncio.timeout(timeout):
            while True:
                doc = await self.expect(GuestDocument, timeout)
                assert isinstance(doc, GuestDocument)
                if doc.name != "placement":
                    continue
                result = AffinityResult.model_validate(json.loads(doc.content))
                if sorted(p.vcpu for p in result.placements) == sorted(wanted):
                    return result


def _mask(vcpu: int) -> bytes:
    """A 128-byte little-endian CPU bitmap with bit ``vcpu`` set."""
    return (1 << vcpu).to_bytes(128, "little")
