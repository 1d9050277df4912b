"""QEMU's monitor through ``qemu.qmp``: vCPU index → host thread id and guest topology.

``query-cpus-fast`` gives, per vCPU, the top-level ``thread-id`` (the host tid of the vCPU
thread) and ``props`` (socket/die/core/thread ids in the guest). The map is refreshed when
QEMU reports a CPU hot(un)plug (``DEVICE_DELETED``, ``ACPI_DEVICE_OST``) and on demand.

The guest opening and closing the agent's port (``org.extpv.agent.0``) is reported by QEMU as
``VSERPORT_CHANGE`` (only for a port device that has an ``id``): the socket chardev pvhost
talks through stays connected across it, so this is the only way the host learns that the
agent went away or a new one came. A guest decides how often those events come, so the
monitor keeps a bounded summary of them (per port: the latest state and how many changes),
never a queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

from qemu.qmp import EventListener, QMPClient, QMPError
from qemu.qmp.message import Message

from extpv.vcpus import VcpuThread, parse_query_cpus_fast, process_of_thread
from pvhost.errors import QmpError

__all__ = ["AGENT_PORT_NAME", "PortCallback", "QmpMonitor", "VcpuThread", "qemu_pid_of"]

_log = logging.getLogger(__name__)

#: QMP events after which the vCPU map may have changed.
HOTPLUG_EVENTS = ("DEVICE_DELETED", "ACPI_DEVICE_OST", "CPU_ADDED")
#: The guest opened or closed a virtio-serial port (``data``: ``id``, ``open``).
PORT_EVENT = "VSERPORT_CHANGE"
#: The agent's virtio-serial port (docs/interfaces.md); its device ``id`` is looked up.
AGENT_PORT_NAME = "org.extpv.agent.0"
#: Ports whose changes are remembered at once (device ids come from the host's QEMU
#: command line, not from the guest; this only caps a misconfiguration).
_MAX_PORTS = 64
#: Told the agent port's new state (True: the guest opened it) and how many changes were
#: coalesced into this call (an even number > 0 with the same state: it closed and reopened).
PortCallback = Callable[[bool, int], Awaitable[None]]


def qemu_pid_of(tid: int) -> int:
    """The QEMU process owning vCPU thread ``tid`` (its ``Tgid``)."""
    try:
        return process_of_thread(tid)
    except ProcessLookupError as err:
        raise QmpError(str(err)) from err


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
        self._hotplug = ""
        self._ports: dict[str, tuple[bool, int]] = {}

    async def put(self, event: Message) -> None:
        if not self.accept(event):
            return
        name = str(event.get("event", ""))
        if name == PORT_EVENT:
            data = event.get("data")
            port = data.get("id") if isinstance(data, dict) else None
            opened = data.get("open") if isinstance(data, dict) else None
            if not isinstance(port, str) or not isinstance(opened, bool):
                return
            if port not in self._ports and len(self._ports) >= _MAX_PORTS:
                return
            self._ports[port] = (opened, self._ports.get(port, (opened, 0))[1] + 1)
        else:
            self._hotplug = name
        self._flag.set()

    async def take(self) -> tuple[str, dict[str, tuple[bool, int]]]:
        """Wait for events; the last hot-plug event's name ("" if none) and port changes."""
        await self._flag.wait()
        self._flag.clear()
        hotplug, self._hotplug = self._hotplug, ""
        ports, self._ports = self._ports, {}
        return hotplug, ports


class QmpMonitor:
    """One QMP connection to one QEMU; ``vcpus`` is the current vCPU map."""

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
                if getter in done:
                    hotplug, ports = getter.result()
                    if hotplug:
                        await self._hotplugged(hotplug)
                    for port, (opened, changes) in ports.items():
                        if self.on_port is not None and await self._is_agent_port(port):
                            await self.on_port(opened, changes)
                    if hotplug == "DEVICE_DELETED":
                        self._agent_port.clear()  # a port id may come back as another port
                else:
                    getter.cancel()
                    if not self.connected:
                        return
                    waiter = asyncio.ensure_future(self._client.runstate_changed())
        finally:
            waiter.cancel()
            self._client.remove_listener(listener)

    async def _hotplugged(self, event: str) -> None:
        _log.info("%s: %s, refreshing vCPU map", self.path, event)
        with contextlib.suppress(QmpError):
            await self.refresh()
        if self.on_change is not None:
            await self.on_change()

    async def close(self) -> None:
        if self._events is not None:
            self._events.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._events
        # disconnect() re-raises whatever ended the connection: EOFError when QEMU hung up
        # (the VM exited), OSError or a QMPError otherwise. Closing is the answer to all of
        # them; letting one escape would end the session's task instead of undoing the VM.
        with contextlib.suppress(QMPError, OSError, EOFError):
            await self._client.disconnect()
