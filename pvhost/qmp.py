"""QEMU's monitor through ``qemu.qmp``: vCPU index → host thread id and guest topology.

``query-cpus-fast`` gives, per vCPU, the top-level ``thread-id`` (the host tid of the vCPU
thread) and ``props`` (socket/die/core/thread ids in the guest). The map is refreshed when
QEMU reports a CPU hot(un)plug (``DEVICE_DELETED``, ``ACPI_DEVICE_OST``) and on demand.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import ClassVar

from qemu.qmp import EventListener, QMPClient, QMPError
from qemu.qmp.message import Message

from extpv.aio import cancel_and_wait
from extpv.vcpus import VcpuThread, parse_query_cpus_fast, process_of_thread
from pvhost.errors import QmpError

__all__ = [
    "AGENT_PORT_NAME",
    "PortCallback",
    "QmpMonitor",
    "VcpuThread",
    "chardev_open",
    "qemu_pid_of",
]

_log = logging.getLogger(__name__)

#: QMP events after which the vCPU map may have changed.
HOTPLUG_EVENTS = ("DEVICE_DELETED", "ACPI_DEVICE_OST", "CPU_ADDED")
#: The guest opened or closed a virtio-serial port (``data``: ``id``, ``open``). QEMU reports
#: it only for a port device with an ``id``; the chardev pvhost talks through stays connected
#: across it, so this is how the host learns that the agent went away or a new one came.
PORT_EVENT = "VSERPORT_CHANGE"
#: The agent's virtio-serial port (docs/interfaces.md); its device ``id`` is looked up.
AGENT_PORT_NAME = "org.extpv.agent.0"
#: Ports whose changes are remembered at once (device ids come from the host's QEMU
#: command line, not from the guest; this only caps a misconfiguration).
_MAX_PORTS = 64
#: Told the agent port's new state (True: the guest opened it) and how many changes were
#: coalesced into this call.
PortCallback = Callable[[bool, int], Awaitable[None]]
#: Least seconds between two re-reads of the vCPU map caused by hot-plug events.
REFRESH_INTERVAL = 0.2
#: More QMP events than this in one second is a flood: QEMU emits a handful in normal work,
#: but a guest looping on a device port makes it emit tens of thousands, and reading each one
#: costs pvhost CPU every other VM needs.
MAX_EVENTS_PER_S = 200
#: A flooding monitor is hung up on and not reconnected for this long (QEMU drops the events
#: nobody reads, so this costs neither pvhost nor QEMU memory).
FLOOD_HOLDOFF_S = 5.0


def qemu_pid_of(tid: int) -> int:
    """The QEMU process owning vCPU thread ``tid`` (its ``Tgid``)."""
    try:
        return process_of_thread(tid)
    except ProcessLookupError as err:
        raise QmpError(str(err)) from err


def chardev_open(reply: object, socket_path: Path) -> bool | None:
    """From a ``query-chardev`` reply: ``frontend-open`` of the unix socket ``socket_path``."""
    if not isinstance(reply, list):
        return None
    for dev in reply:
        if not isinstance(dev, dict):
            continue
        filename = dev.get("filename")
        opened = dev.get("frontend-open")
        # A unix socket chardev's filename is "[disconnected:]unix:<path>[,server=on...]".
        if not isinstance(filename, str) or not isinstance(opened, bool):
            continue
        address = filename.removeprefix("disconnected:")
        if address.startswith("unix:") and address[5:].split(",", 1)[0] == str(socket_path):
            return opened
    return None


def _accept_none(_event: Message) -> bool:
    return False


class _EventSummary(EventListener):
    """Remembers *that* events came, not each one: bounded whatever QEMU emits.

    For hot-plug events only the last name; for port events, per port id, the latest state
    and the number of changes. qemu.qmp's own listener queues every event and keeps a history
    of them all; a guest looping on a hot-plug port or opening and closing a virtio-serial
    port in a loop would grow both without end.
    """

    def __init__(self) -> None:
        super().__init__((*HOTPLUG_EVENTS, PORT_EVENT))
        self._flag = asyncio.Event()
        self._last = ""
        self._ports: dict[str, tuple[bool, int]] = {}
        #: Set once more than MAX_EVENTS_PER_S events (of any kind) came within a second.
        self.flooded = False
        self._window = -1.0
        self._count = 0

    async def put(self, event: Message) -> None:
        now = time.monotonic()
        if now - self._window >= 1.0:
            self._window, self._count = now, 0
        self._count += 1
        if self._count > MAX_EVENTS_PER_S:
            self.flooded = True
            self._flag.set()
        elif self.accept(event):
            name = str(event.get("event", ""))
            if name == PORT_EVENT:
                self._port(event)
            else:
                self._last = name
                self._flag.set()

    def _port(self, event: Message) -> None:
        data = event.get("data")
        port = data.get("id") if isinstance(data, dict) else None
        opened = data.get("open") if isinstance(data, dict) else None
        if not isinstance(port, str) or not isinstance(opened, bool):
            return
        if port not in self._ports and len(self._ports) >= _MAX_PORTS:
            return
        self._ports[port] = (opened, self._ports.get(port, (opened, 0))[1] + 1)
        self._flag.set()

    async def take(self) -> tuple[str, dict[str, tuple[bool, int]]]:
        """Wait for events; the last hot-plug event's name ("" if none) and port changes."""
        await self._flag.wait()
        self._flag.clear()
        hotplug, self._last = self._last, ""
        ports, self._ports = self._ports, {}
        return hotplug, ports


class QmpMonitor:
    """One QMP connection to one QEMU; ``vcpus`` is the current vCPU map.

    A QEMU that floods its monitor with events is hung up on (:meth:`wait_closed` returns)
    and :meth:`connect` to it refuses for FLOOD_HOLDOFF_S seconds.
    """

    #: Monitor socket → when pvhost listens to it again (a session makes a new QmpMonitor
    #: for each connection, so the hold-off outlives the instance).
    _holdoff: ClassVar[dict[Path, float]] = {}

    def __init__(
        self,
        socket_path: Path,
        name: str,
        on_change: Callable[[], Awaitable[None]] | None = None,
        on_port: PortCallback | None = None,
    ) -> None:
        self.path = socket_path
        self._client = QMPClient(f"pvhost-{name}")
        # qemu.qmp's default listener queues (and records in its history) every event QEMU
        # emits, for ever, and a guest can make QEMU emit thousands a second: it accepts none.
        self._client.events.event_filter = _accept_none
        self.vcpus: dict[int, VcpuThread] = {}
        self._events: asyncio.Task[None] | None = None
        #: Awaited after the vCPU map was refreshed because QEMU reported a hot(un)plug.
        self.on_change = on_change
        #: Awaited when the guest opened or closed the agent's port.
        self.on_port = on_port
        #: Port device id → whether it is the agent's port (asked once per id).
        self._agent_port: dict[str, bool] = {}

    async def connect(self, timeout: float = 5.0) -> None:
        wait = QmpMonitor._holdoff.get(self.path, 0.0) - time.monotonic()
        if wait > 0:
            raise QmpError(
                f"{self.path}: not listening for {wait:.1f} s more: QEMU sent over "
                f"{MAX_EVENTS_PER_S} events/s (a guest flooding a device port?)"
            )
        QmpMonitor._holdoff.pop(self.path, None)
        try:
            async with asyncio.timeout(timeout):
                await self._client.connect(str(self.path))
        except (QMPError, OSError, TimeoutError) as err:
            raise QmpError(f"cannot connect to QMP at {self.path}: {err or 'timed out'}") from err
        self._events = asyncio.create_task(self._watch(), name=f"qmp-events-{self.path}")
        await self.refresh()

    async def refresh(self, timeout: float = 5.0) -> dict[int, VcpuThread]:
        try:
            async with asyncio.timeout(timeout):
                reply = await self._client.execute("query-cpus-fast")
        except (QMPError, OSError, TimeoutError) as err:
            raise QmpError(f"query-cpus-fast on {self.path} failed: {err or 'timed out'}") from err
        try:
            self.vcpus = parse_query_cpus_fast(reply)
        except ValueError as err:
            raise QmpError(f"{self.path}: {err}") from err
        return self.vcpus

    async def port_open(self, socket_path: Path, timeout: float = 5.0) -> bool | None:
        """Whether the guest has the port behind the chardev socket ``socket_path`` open.

        QEMU's ``frontend-open`` of that chardev (a virtio-serial port sets it when the guest
        opens or closes the port, as it emits ``VSERPORT_CHANGE``): how a pvhost that starts
        while the agent already has its port open learns it without waiting for an event.
        None when QEMU has no chardev on that socket or cannot be asked.
        """
        try:
            async with asyncio.timeout(timeout):
                reply = await self._client.execute("query-chardev")
        except (QMPError, OSError, TimeoutError) as err:
            _log.info("%s: query-chardev failed: %s", self.path, err or "timed out")
            return None
        return chardev_open(reply, socket_path)

    async def execute(
        self, command: str, arguments: dict[str, object] | None = None, timeout: float = 5.0
    ) -> object:
        """One command (callers choose which: sessions let services send only a few)."""
        try:
            async with asyncio.timeout(timeout):
                return await self._client.execute(command, arguments)
        except (QMPError, OSError, TimeoutError) as err:
            raise QmpError(f"{command} on {self.path} failed: {err or 'timed out'}") from err

    @property
    def connected(self) -> bool:
        return self._client.runstate.name == "RUNNING"

    async def _is_agent_port(self, port: str) -> bool:
        """Whether device ``port`` is the agent's (its ``name`` property), asked once."""
        known = self._agent_port.get(port)
        if known is None:
            try:
                async with asyncio.timeout(5):
                    name = await self._client.execute(
                        "qom-get", {"path": f"/machine/peripheral/{port}", "property": "name"}
                    )
            except (QMPError, OSError, TimeoutError) as err:
                _log.info("%s: cannot ask for port %s's name: %s", self.path, port, err)
                return False
            known = name == AGENT_PORT_NAME
            if len(self._agent_port) < _MAX_PORTS:
                self._agent_port[port] = known
        return known

    async def wait_closed(self) -> None:
        """Return when QEMU closes the monitor (the VM went away)."""
        if self._events is not None:
            # asyncio.wait: a cancellation of the caller propagates, the watcher is not cancelled.
            await asyncio.wait({self._events})

    async def _watch(self) -> None:
        listener = _EventSummary()
        self._client.register_listener(listener)
        waiter = asyncio.ensure_future(self._client.runstate_changed())
        try:
            while self.connected:
                getter = asyncio.ensure_future(listener.take())
                done, _ = await asyncio.wait({getter, waiter}, return_when=asyncio.FIRST_COMPLETED)
                if getter in done and listener.flooded:
                    _log.warning(
                        "%s: over %d QMP events/s: hanging up for %g s (a guest flooding a "
                        "device port?)",
                        self.path,
                        MAX_EVENTS_PER_S,
                        FLOOD_HOLDOFF_S,
                    )
                    QmpMonitor._holdoff[self.path] = time.monotonic() + FLOOD_HOLDOFF_S
                    self._hang_up()
                    return
                if getter in done:
                    hotplug, ports = getter.result()
                    for port, (opened, changes) in ports.items():
                        if self.on_port is not None and await self._is_agent_port(port):
                            await self.on_port(opened, changes)
                    if not hotplug:
                        continue
                    if hotplug == "DEVICE_DELETED":
                        self._agent_port.clear()  # a port id may come back as another port
                    # A guest can make QEMU emit these events by the thousand a second: the
                    # map is re-read at most every REFRESH_INTERVAL s (events meanwhile count
                    # as one), and only a map that changed is logged and re-planned.
                    before = self.vcpus
                    with contextlib.suppress(QmpError):
                        await self.refresh()
                    if self.vcpus != before:
                        _log.info("%s: %s: the vCPU map changed", self.path, hotplug)
                        if self.on_change is not None:
                            await self.on_change()
                    await asyncio.sleep(REFRESH_INTERVAL)
                else:
                    getter.cancel()
                    if not self.connected:
                        return
                    waiter = asyncio.ensure_future(self._client.runstate_changed())
        finally:
            waiter.cancel()
            self._client.remove_listener(listener)

    def _hang_up(self) -> None:
        """Drop the connection at once, as if QEMU had exited.

        qemu.qmp's disconnect() first drains the conversation, which under a flood never
        ends (seen: its reader went on parsing events until QEMU died). Aborting the socket
        (qemu.qmp offers no public way) ends its reader with end-of-file, the path every VM
        that exits takes."""
        writer = getattr(self._client, "_writer", None)
        transport = getattr(writer, "transport", None)
        if transport is not None:
            transport.abort()

    async def close(self) -> None:
        try:
            if self._events is not None:
                await cancel_and_wait(self._events)  # re-raises a cancellation of the caller
        finally:
            # Also when the caller is being cancelled: QEMU serves one QMP client, and a
            # connection left open would lock out the next (a restarted pvhost, a new session).
            # disconnect() re-raises whatever ended the connection: EOFError when QEMU hung up
            # (the VM exited), OSError or a QMPError otherwise. Closing is the answer to all of
            # them; letting one escape would end the session's task instead of undoing the VM.
            with contextlib.suppress(QMPError, OSError, EOFError):
                await self._client.disconnect()
