"""The shared peer session over a real socketpair: Hello gating, restarts, versions, liveness."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from collections.abc import Awaitable, Callable

import pytest

from pvproto import (
    PROTOCOL_VERSION,
    SUPPORTED_VERSIONS,
    AffinityUpdate,
    BaseMessage,
    FrameDecoder,
    GuestTopology,
    Hello,
    Ping,
    Pong,
    TokenBucket,
    encode,
)
from pvproto.session import PeerSession, PeerSilent, SessionClosed, SessionState

TOPOLOGY = GuestTopology(online_vcpus=[0, 1])


class Side(PeerSession[None]):
    """A session that records what it was told; its role is set per instance."""

    def __init__(
        self,
        role: str,
        versions: tuple[int, ...] = SUPPORTED_VERSIONS,
        frames: TokenBucket | None = None,
    ) -> None:
        super().__init__(None, versions=versions, frames=frames)
        self.role = role
        self.ready_calls: list[bool] = []
        self.messages: list[BaseMessage] = []
        self.hellos_sent = 0

    @property
    def ROLE(self) -> str:  # type: ignore[override]  # per instance in these tests
        return self.role

    def hello(self) -> Hello:
        self.hellos_sent += 1
        return Hello(
            role=self.role,  # type: ignore[arg-type]
            protocol_versions=list(self.versions),
            software_version=f"test-{self.role}",
            topology=TOPOLOGY if self.role == "guest" else None,
        )

    async def on_ready(self, peer: Hello, *, restarted: bool) -> None:
        self.ready_calls.append(restarted)

    async def on_message(self, message: BaseMessage) -> None:
        self.messages.append(message)


async def _streams() -> tuple[
    tuple[asyncio.StreamReader, asyncio.StreamWriter],
    tuple[asyncio.StreamReader, asyncio.StreamWriter],
]:
    a, b = socket.socketpair()
    return await asyncio.open_connection(sock=a), await asyncio.open_connection(sock=b)


async def _until(check: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.01)


def run(body: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(body(), 20))


def test_handshake_then_messages_flow_and_early_messages_are_refused() -> None:
    async def body() -> None:
        (hr, hw), (gr, gw) = await _streams()
        host, guest = Side("host"), Side("guest")
        # A message before any Hello is refused with bad-request, not acted on.
        gw.write(encode(AffinityUpdate(seq=1, wanted=[1], request_id=4)))
        tasks = [asyncio.create_task(host.run(hr, hw)), asyncio.create_task(guest.run(gr, gw))]
        await _until(lambda: host.state is guest.state is SessionState.READY)
        assert host.messages == [] and host.version == guest.version == PROTOCOL_VERSION
        assert host.ready_calls == guest.ready_calls == [False]
        guest.send(AffinityUpdate(seq=2, wanted=[1]))
        await _until(lambda: len(host.messages) == 1)
        assert isinstance(host.messages[0], AffinityUpdate) and host.messages[0].seq == 2
        for t in tasks:
            t.cancel()

    run(body)


def test_a_flooding_peer_is_acted_on_at_the_frame_rate_and_blocks_on_its_own_writes() -> None:
    """A peer writing frames in a loop gets ``frames``' burst, then its rate; meanwhile the
    session reads nothing more, so the flood backs up in the flooder's own write buffer."""

    async def body() -> None:
        (hr, hw), (gr, gw) = await _streams()
        host, guest = Side("host", frames=TokenBucket(200, 50)), Side("guest")
        tasks = [asyncio.create_task(host.run(hr, hw)), asyncio.create_task(guest.run(gr, gw))]
        await _until(lambda: host.state is guest.state is SessionState.READY)
        frame = encode(AffinityUpdate(seq=1, wanted=[1]), version=guest.version or PROTOCOL_VERSION)
        t0 = time.monotonic()
        gw.write(frame * 40_000)  # ~1.5 MB: more than the socket buffers hold
        await asyncio.sleep(1.0)
        took = time.monotonic() - t0
        assert 50 <= len(host.messages) <= 50 + 200 * took + 20, (len(host.messages), took)
        assert gw.transport.get_write_buffer_size() > 0, "the flood backs up at its sender"
        for t in tasks:
            t.cancel()

    run(body)


def test_a_chunk_of_many_frames_lets_the_event_loop_run_between_them() -> None:
    """A 64 KiB chunk holds ~1,300 small frames: other sessions on the loop must run while
    they are acted on, not after the last."""

    async def body() -> None:
        host = Side("host")
        host.state, host.version = SessionState.READY, PROTOCOL_VERSION
        chunk = encode(AffinityUpdate(seq=1, wanted=[1])) * 1500
        seen: list[int] = []

        async def other_session() -> None:
            while True:
                seen.append(len(host.messages))
                await asyncio.sleep(0)

        other = asyncio.create_task(other_session())
        await asyncio.sleep(0)
        await host.feed_chunk(chunk)
        other.cancel()
        assert len(host.messages) == 1500
        between = [n for n in seen if 0 < n < 1500]
        assert len(between) >= 1500 // PeerSession.YIELD_EVERY - 2, seen[:10]

    run(body)


def test_a_peer_restarting_behind_a_live_stream_gets_a_hello_back_once() -> None:
    """QEMU's chardev stays connected when the agent restarts: the new agent's Hello must make
    the host greet again (else the agent waits for a Hello for ever), and the answer must not
    start a Hello ping-pong."""

    async def body() -> None:
        (hr, hw), (gr, gw) = await _streams()
        host, guest = Side("host"), Side("guest")
        host_task = asyncio.create_task(host.run(hr, hw))
        guest_task = asyncio.create_task(guest.run(gr, gw))
        await _until(lambda: host.state is guest.state is SessionState.READY)
        guest_task.cancel()  # the agent dies; the byte stream stays up
        with contextlib.suppress(asyncio.CancelledError):
            await guest_task
        restarted = Side("guest")
        new_task = asyncio.create_task(restarted.run(gr, gw))
        await _until(lambda: restarted.state is SessionState.READY)
        await asyncio.sleep(0.3)  # room for a ping-pong, if there were one
        assert host.peer_restarts == 1 and host.ready_calls == [False, True]
        assert host.hellos_sent == 2 and restarted.hellos_sent == 1
        assert restarted.ready_calls == [False]
        for t in (host_task, new_task):
            t.cancel()

    run(body)


def test_frames_after_hello_use_the_highest_common_version() -> None:
    async def body() -> None:
        (hr, hw), (gr, gw) = await _streams()
        host = Side("host", versions=(1, 2, 3))
        task = asyncio.create_task(host.run(hr, hw))
        raw = b""
        gw.write(
            encode(
                Hello(
                    role="guest",
                    protocol_versions=[1, 2],
                    software_version="g",
                    topology=TOPOLOGY,
                ),
                version=1,
            )
        )
        gw.write(encode(Ping(nonce=9), version=2))
        async with asyncio.timeout(5):
            while raw.count(b"\xe5PVF") < 2:
                raw += await gr.read(65536)
        frames = [f for f in raw.split(b"\xe5PVF") if f]
        # Our Hello goes out in our lowest version (any peer can read it); the Pong in the
        # negotiated one.
        assert [struct.unpack_from("B", f)[0] for f in frames[:2]] == [1, 2]
        decoded = FrameDecoder(versions=(1, 2)).feed(raw)
        assert isinstance(decoded[1], Pong) and decoded[1].nonce == 9
        assert host.version == 2
        task.cancel()

    run(body)


def test_no_common_version_closes_the_session() -> None:
    async def body() -> None:
        (hr, hw), (_gr, gw) = await _streams()
        host = Side("host", versions=(1,))
        gw.write(
            encode(
                Hello(
                    role="guest",
                    protocol_versions=[7],
                    software_version="g",
                    topology=TOPOLOGY,
                ),
                version=1,
            )
        )
        with pytest.raises(SessionClosed, match="no common protocol version"):
            await host.run(hr, hw)
        assert host.state is SessionState.CLOSED

    run(body)


def test_keepalive_detects_a_ready_peer_gone_silent_but_not_an_absent_one() -> None:
    async def body() -> None:
        (hr, hw), (_gr, gw) = await _streams()
        host = Side("host")
        task = asyncio.create_task(host.run(hr, hw))
        # Nobody said Hello (no agent opened the port): absent, not silent.
        alive = asyncio.create_task(host.keepalive(interval=0.05, deadline=0.2))
        await asyncio.sleep(0.6)
        assert not alive.done()
        # The peer says Hello and then nothing, not even a Pong (a SIGSTOPped agent).
        hello = Hello(
            role="guest",
            protocol_versions=list(SUPPORTED_VERSIONS),
            software_version="g",
            topology=TOPOLOGY,
        )
        gw.write(encode(hello))
        await _until(lambda: host.state is SessionState.READY)
        with pytest.raises(PeerSilent, match="sent nothing"):
            await alive
        task.cancel()

    run(body)


def test_keepalive_does_not_blame_the_peer_for_our_own_stall() -> None:
    """A host process that was stopped (or starved) longer than the deadline has not read
    what the peer sent meanwhile: the peer is not silent, it gets a deadline from now."""

    async def body() -> None:
        (hr, hw), (gr, gw) = await _streams()
        host, guest = Side("host"), Side("guest")
        tasks = [asyncio.create_task(host.run(hr, hw)), asyncio.create_task(guest.run(gr, gw))]
        await _until(lambda: host.state is guest.state is SessionState.READY)
        alive = asyncio.create_task(host.keepalive(interval=0.05, deadline=0.3))
        await asyncio.sleep(0.1)
        time.sleep(0.6)  # the whole event loop stalls (SIGSTOP, starvation) past the deadline
        await asyncio.sleep(0.5)  # the live peer answers the Pings again
        assert not alive.done()
        alive.cancel()
        for t in tasks:
            t.cancel()

    run(body)


def _hellos(raw: bytes) -> int:
    return sum(isinstance(m, Hello) for m in FrameDecoder().feed(raw))


async def _pump(
    reader: asyncio.StreamReader, into: PeerSession, log: list[bytes], seconds: float
) -> None:
    """Feed what arrives on ``reader`` to ``into`` for ``seconds``, recording the bytes."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            while chunk := await reader.read(65536):
                log.append(chunk)
                await into.feed_chunk(chunk)


def test_duplicate_hellos_converge_without_a_hello_loop() -> None:
    """A host Hello buffered while the port was closed plus one sent when it opened: the
    guest sees two; the sides must agree after a bounded exchange, not ping-pong for ever."""

    async def body() -> None:
        (hr, hw), (gr, gw) = await _streams()
        host, guest = Side("host"), Side("guest")
        host._writer, guest._writer = hw, gw
        host._send_hello()  # on connect, port closed: buffered
        host.greet()  # the port opened: greeted again
        guest._send_hello()  # the agent starts and greets
        to_host: list[bytes] = []
        to_guest: list[bytes] = []
        await asyncio.gather(_pump(hr, host, to_host, 1.5), _pump(gr, guest, to_guest, 1.5))
        assert host.state is SessionState.READY and guest.state is SessionState.READY
        # Bounded: a loop would be cut only by the rate limit, after RESTART_BURST rounds.
        assert _hellos(b"".join(to_host)) + _hellos(b"".join(to_guest)) <= 5
        assert len(host.ready_calls) <= 3

    run(body)


def test_reset_then_greet_restarts_the_handshake_with_a_new_peer() -> None:
    async def body() -> None:
        (hr, hw), (gr, gw) = await _streams()
        host, guest = Side("host"), Side("guest")
        tasks = [asyncio.create_task(host.run(hr, hw)), asyncio.create_task(guest.run(gr, gw))]
        await _until(lambda: host.state is guest.state is SessionState.READY)
        host.reset()  # QEMU: the guest closed the port
        assert host.state is SessionState.AWAITING_HELLO and host.peer is None
        host.greet()  # ... and opened it again
        await _until(lambda: host.state is SessionState.READY)
        assert host.ready_calls == [False, False]
        for t in tasks:
            t.cancel()

    run(body)


def test_a_new_peer_is_answered_even_when_an_old_hello_of_ours_went_unanswered() -> None:
    """Our answer-Hello was taken by the peer as the end of its handshake (no reply comes);
    a Hello seconds later is a new peer's (the host reconnected after a keepalive reset) and
    must be answered, or that peer waits for ever."""

    async def body() -> None:
        (hr, hw), (gr, gw) = await _streams()
        guest = Side("guest")
        task = asyncio.create_task(guest.run(gr, gw))
        hello = Hello(role="host", protocol_versions=list(SUPPORTED_VERSIONS), software_version="h")
        hw.write(encode(hello))
        await _until(lambda: guest.state is SessionState.READY)
        guest._greeted_at = time.monotonic() - 2 * guest.ANSWER_S  # our old answer, stale
        raw = await hr.read(65536)  # the guest's first Hello
        hw.write(encode(hello))  # a new host connection greets
        async with asyncio.timeout(5):
            while _hellos(raw) < 2:
                raw += await hr.read(65536)
        assert guest.ready_calls == [False, True]
        task.cancel()

    run(body)


def test_a_peer_that_missed_our_hello_is_greeted_again() -> None:
    """Our Hello went to a peer that died; the new one talks as if ready (it took our
    earlier answer for the handshake): it is greeted again, within the rate limit."""

    async def body() -> None:
        (hr, hw), (gr, gw) = await _streams()
        host = Side("host")
        host.REGREET_S = 0.0  # type: ignore[misc]  # no young Hello to wait for here
        task = asyncio.create_task(host.run(hr, hw))
        await asyncio.sleep(0.05)
        gw.write(encode(AffinityUpdate(seq=1, wanted=[0])))
        raw = b""
        async with asyncio.timeout(5):
            while _hellos(raw) < 2:
                raw += await gr.read(65536)
        assert host.state is SessionState.AWAITING_HELLO
        task.cancel()

    run(body)


def test_a_peer_that_took_our_hello_for_an_answer_is_greeted_again_once_it_is_old() -> None:
    """pvhost restarted while the agent was stopped: the agent, ready, takes the new host's
    Hello for the answer to one it had just sent the old host, so it does not answer, and
    its stale frames reach the host before the host's Hello is ``REGREET_S`` old. The host
    must greet again once its Hello is that old, or neither side ever moves (fault matrix:
    pvhost-restart at program-load)."""

    async def body() -> None:
        (hr, hw), (gr, gw) = await _streams()
        guest = Side("guest")
        guest_task = asyncio.create_task(guest.run(gr, gw))
        old = Hello(role="host", protocol_versions=list(SUPPORTED_VERSIONS), software_version="h")
        hw.write(encode(old))
        await _until(lambda: guest.state is SessionState.READY)
        async with asyncio.timeout(5):  # the old host read the guest's Hello, then died
            raw = await hr.read(65536)
            while _hellos(raw) < 1:
                raw += await hr.read(65536)
        # A Hello of ours to the old host went out 1 s ago: a host Hello now "answers" it.
        guest._greeted_at = time.monotonic() - 1.0
        host = Side("host")
        host.REGREET_S = 0.5  # type: ignore[misc]
        host_task = asyncio.create_task(host.run(hr, hw))
        await _until(lambda: guest.ready_calls == [False, True])  # taken, not answered
        guest.send(AffinityUpdate(seq=1, wanted=[0]))  # refused: the host's Hello is young
        await _until(lambda: host.state is SessionState.READY)
        assert host.hellos_sent == 2
        guest_task.cancel()
        host_task.cancel()

    run(body)


@pytest.mark.security
def test_a_peer_saying_hello_in_a_loop_is_rate_limited() -> None:
    """Each restart makes the host re-inject its programs: a Hello loop must not be served."""

    async def body() -> None:
        (hr, hw), (gr, gw) = await _streams()
        host = Side("host")
        task = asyncio.create_task(host.run(hr, hw))
        hello = Hello(
            role="guest",
            protocol_versions=list(SUPPORTED_VERSIONS),
            software_version="g",
            topology=TOPOLOGY,
        )
        gw.write(encode(hello) * 200)
        raw = b""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                while True:
                    raw += await gr.read(65536)
        replies = FrameDecoder().feed(raw)
        hellos = [m for m in replies if isinstance(m, Hello)]
        limited = [m for m in replies if getattr(m, "code", None) == "rate-limited"]
        # One greeting, then at most RESTART_BURST (+1 refilled) restarts acted on.
        assert len(hellos) <= 1 + PeerSession.RESTART_BURST + 1
        # Each one acted on (answered, or taken as the answer to ours) costs a re-injection.
        assert len(host.ready_calls) <= 1 + PeerSession.RESTART_BURST + 1
        assert len(limited) >= 190
        task.cancel()

    run(body)


def test_a_new_peer_is_greeted_in_the_lowest_version_not_the_last_peers() -> None:
    """The peer's end reopened: the new peer may be older than the last (an agent downgraded
    in place, issue #12's old-agent test). Our Hello must be in the lowest version, which it
    reads, not in the version negotiated with the peer before (it answered bad-frame)."""

    async def body() -> None:
        (hr, hw), (gr, gw) = await _streams()
        host = Side("host", versions=(2, 3, 4))
        task = asyncio.create_task(host.run(hr, hw))
        hello = Hello(
            role="guest", protocol_versions=[2, 3, 4], software_version="g", topology=TOPOLOGY
        )
        gw.write(encode(hello, version=2))
        await _until(lambda: host.state is SessionState.READY)
        assert host.version == 4
        raw = await gr.read(65536)  # our first Hello
        host.reset()  # QEMU: the guest closed the port
        host.greet()  # ... and a new agent opened it
        async with asyncio.timeout(5):
            raw = await gr.read(65536)
        frames = [f for f in raw.split(b"\xe5PVF") if f]
        assert [struct.unpack_from("B", f)[0] for f in frames] == [2]
        assert isinstance(FrameDecoder(versions=(2,)).feed(raw)[0], Hello)
        task.cancel()

    run(body)
