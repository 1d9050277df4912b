"""One VM's session: QMP for its vCPU threads, and the guest channel over the chardev socket.

Channel protocol (docs/interfaces.md): on every connection the host sends ``Hello`` and
negotiates against the guest's; then injects the affinity program (``LoadProgram``) and
answers every ``AffinityUpdate`` with an ``AffinityResult`` of the same ``seq``. Updates are
applied at most ``rate`` per second (token bucket); updates that arrive meanwhile coalesce
to the newest, and each superseded one is answered with the newest one's result, so a
hostile guest can neither make the host spin nor go unanswered.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pvhost.errors import ChannelError, QmpError
from pvhost.qmp import QmpMonitor, VcpuThread
from pvhost.ratelimit import TokenBucket
from pvproto import (
    SUPPORTED_VERSIONS,
    AffinityResult,
    AffinityUpdate,
    BaseMessage,
    Error,
    FrameDecoder,
    GuestTopology,
    Hello,
    LoadProgram,
    Ping,
    Pong,
    ProgramEvent,
    ProgramKind,
    ProgramLoaded,
    ProtocolError,
    UnloadProgram,
    VcpuPlacement,
    VersionMismatch,
    encode,
    negotiate,
)

__all__ = ["Backoff", "ProgramSource", "VmSession"]

_log = logging.getLogger(__name__)

SOFTWARE_VERSION = "pvhost 0.1.0"
#: A program to inject: (program id, kind, payload, signature).
ProgramSource = Callable[[], tuple[str, ProgramKind, bytes, bytes]]
#: Applies the whole wanted set of one VM; returns the AffinityResult placements.
Applier = Callable[["VmSession", list[int]], Awaitable[AffinityResult]]


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
class SessionStatus:
    qmp: str = "connecting"
    channel: str = "connecting"
    guest_version: str = ""
    guest_topology: GuestTopology | None = None
    wanted: list[int] = field(default_factory=list)
    last_seq: int | None = None
    programs: dict[str, str] = field(default_factory=dict)
    last_result: list[dict[str, Any]] = field(default_factory=list)


class VmSession:
    """Owns one VM's connections. The service drives placement through ``applier``."""

    def __init__(
        self,
        name: str,
        qmp_path: Path,
        agent_path: Path,
        *,
        applier: Applier,
        on_gone: Callable[[VmSession], Awaitable[None]],
        program: ProgramSource | None,
        rate: float,
        burst: int,
        max_backoff: float,
        policy: str,
        quota: int,
    ) -> None:
        self.name = name
        self.qmp_path = qmp_path
        self.agent_path = agent_path
        self.policy = policy
        self.quota = quota
        self.remap = policy == "ht-aware"
        self.status = SessionStatus()
        self.monitor: QmpMonitor | None = None
        self.qemu_pid: int | None = None
        self._applier = applier
        self._on_gone = on_gone
        self._program = program
        self._bucket = TokenBucket(rate, burst)
        self._max_backoff = max_backoff
        self._writer: asyncio.StreamWriter | None = None
        self._pending: AffinityUpdate | None = None
        self._superseded: list[int] = []
        self._wake = asyncio.Event()
        self._ids = itertools.count(1)
        self._waiters: dict[int, asyncio.Future[ProgramLoaded]] = {}

    @property
    def vcpus(self) -> dict[int, VcpuThread]:
        return self.monitor.vcpus if self.monitor is not None else {}

    # -- lifecycle ---------------------------------------------------------------------------
    async def run(self, monitor: QmpMonitor | None = None) -> None:
        """Until cancelled (the VM's directory went away): QMP up → channel; QMP down → undo."""
        backoff = Backoff(self._max_backoff)
        worker = asyncio.create_task(self._apply_loop(), name=f"apply-{self.name}")
        try:
            while True:
                if monitor is None:
                    monitor = QmpMonitor(self.qmp_path, self.name)
                    try:
                        await monitor.connect()
                    except QmpError as err:
                        self.status.qmp = f"unreachable: {err}"
                        monitor = None
                        await backoff.wait()
                        continue
                backoff.reset()
                self.monitor = monitor
                self.status.qmp = "connected"
                channel = asyncio.create_task(self._channel_loop(), name=f"channel-{self.name}")
                try:
                    await monitor.wait_closed()
                finally:
                    channel.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await channel
                    await monitor.close()
                # QEMU closed its monitor: the VM is gone (or restarting). Undo its placements.
                self.status.qmp = "closed"
                self.monitor = None
                monitor = None
                await self._on_gone(self)
                await backoff.wait()
        finally:
            worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await worker
            if self.monitor is not None:
                await self.monitor.close()
                self.monitor = None

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
            self._writer = writer
            self.status.channel = "connected"
            try:
                await self._converse(reader, writer)
                backoff.reset()
            except (ChannelError, OSError) as err:
                self.status.channel = f"closed: {err}"
                _log.info("%s: channel: %s", self.name, err)
            finally:
                self._writer = None
                for waiter in self._waiters.values():
                    waiter.cancel()
                self._waiters.clear()
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
            await backoff.wait()

    def send(self, message: BaseMessage) -> None:
        if self._writer is None:
            raise ChannelError(f"VM {self.name}: the guest channel is not connected")
        self._writer.write(encode(message))

    async def _converse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.send(
            Hello(
                role="host",
                protocol_versions=list(SUPPORTED_VERSIONS),
                software_version=SOFTWARE_VERSION,
                capabilities=["affinity"],
                request_id=next(self._ids),
            )
        )
        await writer.drain()
        decoder = FrameDecoder()
        greeted = False
        while chunk := await reader.read(65536):
            for item in decoder.feed(chunk):
                if isinstance(item, ProtocolError):
                    _log.warning("%s: bad frame from guest: %s", self.name, item)
                    self.send(
                        Error(
                            code="bad-frame",
                            message=str(item)[:4096],
                            request_id=item.request_id or 0,
                        )
                    )
                    continue
                if isinstance(item, Hello):
                    greeted = self._on_hello(item)
                elif not greeted:
                    self.send(
                        Error(code="bad-request", message="Hello first", request_id=item.request_id)
                    )
                else:
                    self._dispatch(item)
            await writer.drain()
        raise ChannelError("the guest closed the channel")

    def _on_hello(self, hello: Hello) -> bool:
        try:
            negotiate(SUPPORTED_VERSIONS, hello.protocol_versions)
        except VersionMismatch as err:
            self.send(Error(code="unsupported", message=str(err), request_id=hello.request_id))
            raise ChannelError(str(err)) from err
        if hello.role != "guest":
            raise ChannelError("the peer on the guest channel says it is a host")
        self.status.guest_version = hello.software_version
        self.status.guest_topology = hello.topology
        if self._program is not None:
            try:
                program_id, kind, payload, signature = self._program()
            except Exception as err:
                self.status.programs["affinity"] = f"not injected: {err}"
            else:
                self.status.programs[program_id] = "loading"
                self.send(
                    LoadProgram.for_payload(
                        program_id,
                        kind,
                        payload,
                        signature,
                        request_id=next(self._ids),
                    )
                )
        return True

    def _dispatch(self, message: BaseMessage) -> None:
        if isinstance(message, AffinityUpdate):
            if self._pending is not None:
                self._superseded.append(self._pending.seq)
            self._pending = message
            self._wake.set()
        elif isinstance(message, ProgramLoaded):
            verdict = "loaded" if message.ok else f"refused: {message.reason}"
            self.status.programs[message.program_id] = verdict
            waiter = self._waiters.pop(message.request_id, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(message)
        elif isinstance(message, Ping):
            self.send(Pong(nonce=message.nonce, request_id=message.request_id))
        elif isinstance(message, (Pong, ProgramEvent)):
            pass
        elif isinstance(message, Error):
            _log.warning("%s: guest error %s: %s", self.name, message.code, message.message)
        else:
            self.send(
                Error(
                    code="bad-request",
                    message=f"{type(message).__name__} is not for the host",
                    request_id=message.request_id,
                )
            )

    async def _apply_loop(self) -> None:
        while True:
            await self._wake.wait()
            await self._bucket.take()  # excess updates coalesce while this waits
            self._wake.clear()
            update, self._pending = self._pending, None
            superseded, self._superseded = self._superseded, []
            if update is None:
                continue
            self.status.wanted = list(update.wanted)
            self.status.last_seq = update.seq
            try:
                result = await self._applier(self, list(update.wanted))
            except Exception as err:
                # Last resort: a bug must not silence the session; the guest still gets answers.
                _log.exception("%s: applying update %d failed", self.name, update.seq)
                result = AffinityResult(
                    seq=update.seq,
                    placements=[
                        VcpuPlacement(vcpu=v, refused=f"internal error: {err}"[:1024])
                        for v in update.wanted
                    ],
                )
            for seq in [*superseded, update.seq]:
                with contextlib.suppress(ChannelError, OSError):
                    self.send(result.model_copy(update={"seq": seq}))

    async def reapply(self) -> None:
        """Re-plan the current wanted set (after a remap switch or a release)."""
        result = await self._applier(self, list(self.status.wanted))
        if self.status.last_seq is not None:
            with contextlib.suppress(ChannelError, OSError):
                self.send(result.model_copy(update={"seq": self.status.last_seq}))

    async def load_program(
        self, program_id: str, kind: ProgramKind, payload: bytes, signature: bytes, timeout: float
    ) -> ProgramLoaded:
        request_id = next(self._ids)
        waiter: asyncio.Future[ProgramLoaded] = asyncio.get_running_loop().create_future()
        self._waiters[request_id] = waiter
        self.status.programs[program_id] = "loading"
        self.send(
            LoadProgram.for_payload(
                program_id,
                kind,
                payload,
                signature,
                request_id=request_id,
            )
        )
        try:
            async with asyncio.timeout(timeout):
                return await waiter
        except TimeoutError as err:
            raise ChannelError(
                f"VM {self.name}: no ProgramLoaded for {program_id} within {timeout:g} s"
            ) from err
        except asyncio.CancelledError as err:
            raise ChannelError(f"VM {self.name}: the channel closed while loading") from err
        finally:
            self._waiters.pop(request_id, None)

    def unload_program(self, program_id: str) -> None:
        self.send(UnloadProgram(program_id=program_id, request_id=next(self._ids)))
        self.status.programs.pop(program_id, None)
