"""A host *peer* for tests and benchmarks: plays pvhost against a real guest agent.

pvproto framing over a real socket (a socketpair, or a VM's ``agent.sock``); messages are
kept in order and picked by type, so a test waits for what it expects and sees the rest.
"""

from __future__ import annotations

import asyncio
import socket
from typing import TypeVar

from pvproto import SUPPORTED_VERSIONS, BaseMessage, FrameDecoder, Hello, ProtocolError, encode

__all__ = ["HostEnd"]

M = TypeVar("M", bound=BaseMessage)


class HostEnd:
    """Speaks pvproto as the host on one end of a socketpair."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.decoder = FrameDecoder()
        self.inbox: list[BaseMessage | ProtocolError] = []

    @classmethod
    async def pair(cls) -> tuple[HostEnd, asyncio.StreamReader, asyncio.StreamWriter]:
        """A host end and the (reader, writer) to give to ``Agent.serve``."""
        host_sock, agent_sock = socket.socketpair()
        host = cls(*await asyncio.open_connection(sock=host_sock))
        agent_reader, agent_writer = await asyncio.open_connection(sock=agent_sock)
        return host, agent_reader, agent_writer

    def send(self, message: BaseMessage) -> None:
        self.writer.write(encode(message))

    def send_raw(self, data: bytes) -> None:
        self.writer.write(data)

    def hello(self, versions: list[int] | None = None) -> None:
        self.send(
            Hello(
                role="host",
                protocol_versions=versions or list(SUPPORTED_VERSIONS),
                software_version="test-host",
            )
        )

    async def expect(self, kind: type[M], timeout: float = 5.0, *, skip_others: bool = True) -> M:
        """The next message of type ``kind`` (others are kept in ``inbox``)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            for index, item in enumerate(self.inbox):
                if isinstance(item, kind):
                    del self.inbox[index]
                    return item
                if not skip_others:
                    raise AssertionError(f"expected {kind.__name__}, got {item!r}")
            left = deadline - loop.time()
            if left <= 0:
                raise AssertionError(f"no {kind.__name__} within {timeout} s; got {self.inbox!r}")
            try:
                chunk = await asyncio.wait_for(self.reader.read(65536), left)
            except TimeoutError:
                continue
            if not chunk:
                raise AssertionError(f"connection closed while waiting for {kind.__name__}")
            self.inbox += self.decoder.feed(chunk)

    async def closed(self, timeout: float = 5.0) -> bool:
        """True once the agent closed its end (EOF)."""
        try:
            while chunk := await asyncio.wait_for(self.reader.read(65536), timeout):
                self.inbox += self.decoder.feed(chunk)
        except TimeoutError:
            return False
        return True

    def close(self) -> None:
        self.writer.close()
