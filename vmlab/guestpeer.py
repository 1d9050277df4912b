"""A fake guest *peer*: tests and benchmarks play the guest agent on a VM's channel socket.

With an empty machine (``VMSpec.empty``) there is no guest OS, so nothing could answer on the
virtio side of the agent port; a test driver serves ``agent.sock`` instead, as QEMU's chardev
would, and speaks pvproto as the guest. pvhost connects to it exactly as to a real VM.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

from pvproto import (
    AffinityResult,
    AffinityUpdate,
    BaseMessage,
    FrameDecoder,
    GuestTopology,
    Hello,
    LoadProgram,
    Ping,
    Pong,
    ProgramLoaded,
    ProtocolError,
    encode,
)

#: Protocol versions of agents that track affinity in the guest (AffinityUpdate/Result).
TRACKING_AGENT_VERSIONS = (2, 3)

__all__ = ["TRACKING_AGENT_VERSIONS", "FakeGuestChannel"]


class FakeGuestChannel:
    """Serves ``agent.sock`` like QEMU's chardev would, and speaks as the guest agent.

    Named a fake on purpose: without a guest OS nothing can answer on the virtio side; this is
    the guest *peer* (test driver), not a stand-in for any host component under test.
    """

    def __init__(self, path: Path, vcpus: int = 3, accept_programs: bool = True) -> None:
        self.path = path
        self.vcpus = vcpus
        self.accept_programs = accept_programs
        self.connections = 0
        #: Host Hellos received, all connections (one per connection when nothing resets).
        self.hellos = 0
        #: Answer the host's keepalive Pings (False: play a silent, hung agent).
        self.answer_pings = True
        self.received: asyncio.Queue[BaseMessage] = asyncio.Queue()
        self.programs: list[LoadProgram] = []
        #: Frames from the host that did not decode (a test asserts there are none).
        self.bad_frames: list[ProtocolError] = []
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
                    # An agent that tracks affinity itself and sends AffinityUpdate (the
                    # protocols before the generic agent's 4): pvhost serves those too.
                    protocol_versions=list(TRACKING_AGENT_VERSIONS),
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

    async def update(self, seq: int, wanted: list[int], timeout: float = 10) -> AffinityResult:
        """Send an AffinityUpdate and wait for the AffinityResult with its seq."""
        self.send(AffinityUpdate(seq=seq, wanted=wanted))
        async with asyncio.timeout(timeout):
            while True:
                result = await self.expect(AffinityResult, timeout)
                assert isinstance(result, AffinityResult)
                if result.seq == seq:
                    return result
