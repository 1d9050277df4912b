"""The protocol session both daemons run on a channel: Hello, negotiation, liveness, errors.

One :class:`PeerSession` lives as long as one byte-stream connection. It knows nothing of
programs or placements; the host service and the guest agent extend it with what they do
once the peer is known (:meth:`PeerSession.on_ready`) and with every other message
(:meth:`PeerSession.on_message`).

States and what moves between them (``docs/session.md`` draws them)::

    awaiting-hello ──peer Hello, a version in common──► ready
          ▲                                              │ peer Hello again (it restarted):
          └────────── reset() (the peer's end closed) ───┤ answer with our Hello, stay ready
          └──────── peer speaks no common version ───────┴──► closed (Error "unsupported")

* Our Hello goes out first, encoded in the lowest version we speak, so a peer of any
  version can read it. After the peer's Hello every frame is written in the *negotiated*
  version: the highest both sides speak.
* A Hello in any state restarts the handshake: a peer that restarted while the byte
  stream stayed up (a virtio-serial port reopened behind QEMU's socket chardev) announces
  itself with a Hello, and the side that was already ``ready`` answers with its own, so
  both sides agree a Hello has happened. Only a ``ready`` side answers, and only when no
  Hello of its own sent within ``ANSWER_S`` is unanswered (else the peer's Hello *is* the
  answer), so two Hellos never answer each other forever, even when a stale Hello was
  still in the stream; an older unanswered Hello of ours does not count (the peer may have
  taken it as the answer to its own), so a peer that comes later is always greeted.
* Before the peer's Hello only Hello, Ping, Pong and Error are acted on; anything else is
  answered with ``Error{bad-request}`` and dropped, and, since a peer that talks as if
  ready has missed our Hello, we greet again (rate-limited like restarts). While our Hello
  is younger than ``REGREET_S`` the greeting waits until it is that old (the peer's frames
  may just predate it), and goes out then if the peer has still not said Hello: a peer that
  took our Hello for the answer to a stale one of its own says nothing more, and would
  otherwise never be greeted again.
* A frame that does not decode is answered with ``Error{bad-frame}`` and the session goes
  on with the next frame.
* Peer restarts are acted on at most ``RESTART_BURST`` at once and ``RESTART_RATE`` per
  second after that; a Hello beyond is answered with ``Error{rate-limited}`` and ignored.
* Frames: a session given a ``frames`` budget (a token bucket) acts on the peer's frames at
  its rate and reads nothing more while it is spent, so a peer that floods
  blocks on its own writes; every session yields to the event loop every ``YIELD_EVERY``
  frames, so a chunk full of small frames never holds the loop other sessions share.
* Liveness: :meth:`PeerSession.keepalive` pings a *ready* peer and raises
  :class:`PeerSilent` when it has sent nothing for a deadline. A peer that has not said
  Hello yet is not silent, only absent (a VM without an agent, a port nobody opened).
* :meth:`PeerSession.reset` forgets the peer (its end of the channel closed while the
  byte stream stayed up) and :meth:`PeerSession.greet` sends our Hello again: the host
  calls them when QEMU reports the guest closing and opening the port.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import time
from collections.abc import Iterable
from typing import ClassVar, Generic, Literal, TypeVar

from pvproto.errors import FrameTooLarge, ProtocolError, VersionMismatch
from pvproto.framing import FrameDecoder, encode
from pvproto.messages import BaseMessage, Error, ErrorCode, Hello, Ping, Pong
from pvproto.ratelimit import TokenBucket
from pvproto.version import SUPPORTED_VERSIONS, negotiate

__all__ = ["PeerSession", "PeerSilent", "SessionClosed", "SessionState"]

#: Bytes read from the stream at a time.
_CHUNK = 65536
#: Longest message text copied into an Error frame.
_MAX_ERROR_TEXT = 4096


class SessionState(enum.Enum):
    AWAITING_HELLO = "awaiting-hello"
    READY = "ready"
    CLOSED = "closed"


class SessionClosed(ProtocolError):
    """The session cannot go on (the two sides share no protocol version)."""


class PeerSilent(ProtocolError):
    """The peer sent nothing, not even a Pong, within the liveness deadline."""


#: What a session serves: the guest agent, or the host's session of one VM.
OwnerT = TypeVar("OwnerT")


class PeerSession(Generic[OwnerT]):
    """One connection's protocol session; subclasses add what their daemon does.

    ``run(reader, writer)`` sends our Hello, then reads until the stream ends; a subclass
    overrides :meth:`hello` (capabilities, topology), :meth:`on_ready`, :meth:`on_message`
    and, to log them, :meth:`on_peer_error` and :meth:`on_bad_frame`.
    """

    #: Our side of the channel; the peer must be the other one.
    ROLE: ClassVar[Literal["host", "guest"]]
    #: A droppable message is dropped while this much is waiting for a slow peer.
    MAX_BACKLOG: ClassVar[int] = 1 << 20
    #: Peer restarts (a Hello while ready) acted on: this many at once, then this many per s.
    RESTART_BURST: ClassVar[int] = 5
    RESTART_RATE: ClassVar[float] = 1.0
    #: A Hello of ours younger than this is still on its way: frames before the peer's
    #: Hello do not make us greet again yet.
    REGREET_S: ClassVar[float] = 1.0
    #: A peer Hello this soon after an unanswered one of ours is its answer; later, ours is
    #: stale (the peer took it as the answer to its own, or lost it) and the peer is new.
    ANSWER_S: ClassVar[float] = 3.0
    #: Frames acted on between two yields to the event loop (a 64 KiB chunk holds ~1,300
    #: small frames: acting on all of them at once delayed every other VM's placement).
    YIELD_EVERY: ClassVar[int] = 32

    def __init__(
        self,
        owner: OwnerT,
        *,
        versions: Iterable[int] = SUPPORTED_VERSIONS,
        readable: Iterable[int] | None = None,
        frames: TokenBucket | None = None,
    ) -> None:
        #: What this session serves; the hooks of a subclass act on it.
        self.owner = owner
        self.versions = tuple(sorted(set(versions)))
        #: Frame versions this side reads, and writes before a version is negotiated (its
        #: Hello in the lowest): ``versions`` unless wider. A side that negotiates fewer
        #: versions than it can read still reads any peer's Hello, and is read by it, so a
        #: mismatch ends in ``Error{unsupported}``, not in frames neither side can read.
        self.frame_versions = tuple(sorted(set(readable or ()) | set(self.versions)))
        self.state = SessionState.AWAITING_HELLO
        #: The negotiated protocol version, once the peer's Hello arrived.
        self.version: int | None = None
        #: The peer's latest Hello.
        self.peer: Hello | None = None
        #: Peer Hellos after the first: restarts of the peer on this connection.
        self.peer_restarts = 0
        self._ids = itertools.count(1)
        self._writer: asyncio.StreamWriter | None = None
        self._heard = time.monotonic()
        self._decoder = FrameDecoder(versions=self.frame_versions)
        self._restarts = TokenBucket(self.RESTART_RATE, self.RESTART_BURST)
        #: The budget of the peer's frames acted on (None: as fast as they come). Passed in,
        #: so that it outlives a connection: a peer that reconnects gets no fresh burst.
        self._frames = frames
        #: Frames acted on since the last yield to the event loop.
        self._since_yield = 0
        #: When we sent a Hello the peer has not answered yet (None: no such Hello).
        self._greeted_at: float | None = None
        #: A greeting put off until our last Hello is REGREET_S old (see _regreet).
        self._regreet_later: asyncio.TimerHandle | None = None

    # -- hooks -------------------------------------------------------------------------------
    def hello(self) -> Hello:
        """Our Hello; a subclass adds its software version, capabilities and topology."""
        raise NotImplementedError

    async def on_ready(self, peer: Hello, *, restarted: bool) -> None:
        """The peer's Hello was accepted (``restarted``: not its first on this connection)."""

    async def on_message(self, message: BaseMessage) -> None:
        """Any message other than Hello/Ping/Pong/Error, once the session is ready."""
        self.reply_error(message, "bad-request", f"{type(message).__name__} is not for this side")

    def on_peer_error(self, error: Error) -> None:
        """The peer reports it could not act on something we sent."""

    def on_bad_frame(self, error: ProtocolError) -> None:
        """A frame from the peer did not decode (it has been answered already)."""

    # -- sending -----------------------------------------------------------------------------
    def next_id(self) -> int:
        """A request id for a message this side starts (replies echo the peer's)."""
        return next(self._ids)

    def send(self, message: BaseMessage, *, droppable: bool = False) -> bool:
        """Queue ``message`` in the negotiated version; False if it was not queued.

        A droppable message is dropped while more than :attr:`MAX_BACKLOG` bytes wait for a
        peer that does not read; a closed stream drops everything.
        """
        writer = self._writer
        if writer is None or writer.is_closing():
            return False
        if droppable and writer.transport.get_write_buffer_size() > self.MAX_BACKLOG:
            return False
        try:
            writer.write(encode(message, version=self.version or self.frame_versions[0]))
        except (FrameTooLarge, OSError):
            return False
        return True

    def reply_error(self, to: BaseMessage | None, code: ErrorCode, text: str) -> None:
        """Answer the frame ``to`` (None: no request id known) with an Error."""
        self.send(
            Error(
                code=code,
                message=text[:_MAX_ERROR_TEXT],
                request_id=to.request_id if to is not None else 0,
            )
        )

    @property
    def connected(self) -> bool:
        return self._writer is not None and not self._writer.is_closing()

    # -- the peer's end opening and closing (seen out of band, e.g. QEMU's port events) -------
    def reset(self) -> None:
        """The peer's end closed while the stream stayed up: wait for a Hello again.

        Nothing is sent: the next peer on this stream greets first, or is greeted by
        :meth:`greet`. A session already waiting keeps waiting; a closed one stays closed.
        """
        if self.state is SessionState.READY:
            self.state = SessionState.AWAITING_HELLO
            self.peer = None
        # The next peer may speak an older version than the last one (an agent downgraded in
        # place): until its Hello, write in the lowest frame version, which every peer reads.
        self.version = None
        self._greeted_at = None

    def greet(self) -> None:
        """Send our Hello (the peer's end just opened); the session waits for the answer.

        A ready session is reset first: whoever opened the port is a new peer.
        """
        self.reset()
        self._send_hello()

    def _send_hello(self) -> None:
        if self.send(self.hello()):
            self._greeted_at = time.monotonic()

    # -- the loop ----------------------------------------------------------------------------
    async def run(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Greet the peer, then act on every frame until the stream ends.

        Returns at end of stream; raises :class:`SessionClosed` when the session cannot go
        on, and lets ``OSError`` from the stream through. Never raises for a bad frame.
        """
        self._writer = writer
        self._heard = time.monotonic()
        self._send_hello()
        try:
            while chunk := await reader.read(_CHUNK):
                self._heard = time.monotonic()
                await self.feed_chunk(chunk)
                await writer.drain()
        finally:
            self.state = SessionState.CLOSED
            if self._regreet_later is not None:
                self._regreet_later.cancel()
                self._regreet_later = None

    async def feed_chunk(self, chunk: bytes) -> None:
        """Decode ``chunk`` and act on every frame in it, in stream order (within ``frames``)."""
        for item in self._decoder.feed(chunk):
            await self._pace()
            if isinstance(item, ProtocolError):
                self.send(
                    Error(
                        code="bad-frame",
                        message=str(item)[:_MAX_ERROR_TEXT],
                        request_id=item.request_id or 0,
                    )
                )
                self.on_bad_frame(item)
            else:
                await self._dispatch(item)

    async def _pace(self) -> None:
        """Wait for the frame budget (the peer's writes block meanwhile), and let the event
        loop run every YIELD_EVERY frames."""
        if self._frames is not None:
            await self._frames.take()
        self._since_yield += 1
        if self._since_yield >= self.YIELD_EVERY:
            self._since_yield = 0
            await asyncio.sleep(0)

    async def _dispatch(self, message: BaseMessage) -> None:
        if isinstance(message, Hello):
            await self._on_hello(message)
        elif isinstance(message, Ping):
            self.send(Pong(nonce=message.nonce, request_id=message.request_id))
            self._regreet()
        elif isinstance(message, Pong):
            pass  # hearing anything is liveness enough
        elif isinstance(message, Error):
            self.on_peer_error(message)
        elif self.state is not SessionState.READY:
            self.reply_error(message, "bad-request", "send Hello first")
            self._regreet()
        else:
            await self.on_message(message)

    def _regreet(self) -> None:
        """The peer talks as if ready while we wait for its Hello: it missed ours, greet again.

        That happens when our Hello went to a peer that died before answering, or when our
        side reset while the peer's Hello was already behind us. Not while a Hello of ours is
        young (the peer's frames may just predate it), and rate-limited like restarts.
        """
        if self.state is not SessionState.AWAITING_HELLO:
            return
        if self._greeted_at is not None:
            young = self.REGREET_S - (time.monotonic() - self._greeted_at)
            if young > 0:
                if self._regreet_later is None:
                    self._regreet_later = asyncio.get_running_loop().call_later(
                        young, self._regreet_now
                    )
                return
        if self._restart_allowed():
            self._send_hello()

    def _regreet_now(self) -> None:
        self._regreet_later = None
        if self.connected:
            self._regreet()

    async def _on_hello(self, hello: Hello) -> None:
        if hello.role == self.ROLE:
            # A confused peer (or a loop-back): say so and ignore it; the session goes on.
            other = "guest" if self.ROLE == "host" else "host"
            self.reply_error(hello, "bad-request", f"a {self.ROLE} talks to a {other}")
            return
        try:
            version = negotiate(self.versions, hello.protocol_versions)
        except VersionMismatch as err:
            self.reply_error(hello, "unsupported", str(err))
            self.state = SessionState.CLOSED
            raise SessionClosed(str(err)) from err
        restarted = self.state is SessionState.READY
        if restarted and not self._restart_allowed():
            # Each restart costs the other side work (the host re-injects its programs): a
            # peer that says Hello in a loop is told so and ignored until it slows down.
            self.reply_error(hello, "rate-limited", "too many Hellos; slow down")
            return
        answers_ours = (
            self._greeted_at is not None and time.monotonic() - self._greeted_at < self.ANSWER_S
        )
        if restarted and not answers_ours:
            # The peer restarted behind a stream that stayed up: it waits for our Hello.
            self.peer_restarts += 1
            self._send_hello()
        else:
            # Our Hello is answered. (In ready, this Hello answers one we sent while ready:
            # answering it again would make two Hellos answer each other for ever.)
            self._greeted_at = None
        self.version = version
        self.peer = hello
        self.state = SessionState.READY
        self._heard = time.monotonic()
        await self.on_ready(hello, restarted=restarted)

    def _restart_allowed(self) -> bool:
        """Token bucket over peer restarts: ``RESTART_BURST``, refilled ``RESTART_RATE`` per s."""
        return self._restarts.try_take()

    async def keepalive(self, interval: float, deadline: float) -> None:
        """Ping a ready peer every ``interval`` s; :class:`PeerSilent` after ``deadline`` s.

        Silence counts only while the session is ready: before the peer's Hello there is no
        peer to wait for (nobody opened the port yet), and each Hello starts the count anew.
        Runs beside :meth:`run` (the caller cancels it when the stream ends).
        """
        nonce = itertools.count(1)
        tick = time.monotonic()
        while True:
            await asyncio.sleep(interval)
            now, last = time.monotonic(), tick
            tick = now
            if now - last > 2 * interval:
                # We were not running (stopped, starved): what the peer sent meanwhile is
                # still unread, so its silence cannot be judged; it gets a deadline from now.
                self._heard = max(self._heard, now)
            if self.state is not SessionState.READY:
                continue
            silent = now - self._heard
            if silent > deadline:
                raise PeerSilent(f"the peer sent nothing for {silent:.1f} s")
            # Droppable: a peer that does not read must not grow our buffer with Pings.
            self.send(Ping(nonce=next(nonce), request_id=self.next_id()), droppable=True)
