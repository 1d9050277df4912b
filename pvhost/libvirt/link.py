"""One connection to libvirtd, following domain events (no polling, never the monitor).

:class:`LibvirtLink` keeps one connection to libvirtd (``[libvirt] uri``), follows domain
lifecycle and device events (libvirt's default event loop runs in one thread; nothing is
polled) and knows which running domains take part: those whose live XML has the extpv channel
(:func:`~pvhost.libvirt.domain.parse_domain`). When libvirtd is absent or refuses, pvhost goes
on serving its other VMs and retries with back-off; ``pvctl status`` shows the link's state. A
lost connection keeps the domains known (their QEMU and agent sockets do not depend on
libvirtd) until the next connection says what runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable
from typing import Any

try:
    import libvirt
except ImportError:  # optional: pvhost serves plain-QEMU VMs without it
    libvirt = None

from pvhost.errors import HostError
from pvhost.libvirt.domain import DomainSkipped, LibvirtDomain, parse_domain

__all__ = ["LibvirtLink"]

_log = logging.getLogger(__name__)

_event_loop_lock = threading.Lock()
_event_loop: list[threading.Thread] = []


def _start_event_loop() -> None:
    """libvirt's default event loop, in one daemon thread for the whole process."""
    with _event_loop_lock:
        if _event_loop:
            return
        libvirt.virEventRegisterDefaultImpl()
        # libvirt prints every error to stderr by default: pvhost reports them itself.
        libvirt.registerErrorHandler(lambda *_: None, None)

        def run() -> None:
            while True:
                libvirt.virEventRunDefaultImpl()

        thread = threading.Thread(target=run, name="libvirt-events", daemon=True)
        thread.start()
        _event_loop.append(thread)


class LibvirtLink:
    """One connection to libvirtd; ``domains`` (pvhost name → domain) follows its events."""

    def __init__(self, uri: str, max_backoff: float, on_change: Callable[[], None]) -> None:
        self.uri = uri
        self.max_backoff = max_backoff
        self._on_change = on_change
        self.domains: dict[str, LibvirtDomain] = {}
        #: libvirt domain name → why it does not take part.
        self.skipped: dict[str, str] = {}
        self.state = "connecting"
        self.connected_once = False
        self._conn: Any = None
        self._task: asyncio.Task[None] | None = None
        self._dirty = asyncio.Event()
        self._fresh = False
        self._closed = asyncio.Event()

    async def start(self) -> None:
        """Connect in the background; ImportError if the Python binding is missing."""
        if libvirt is None:
            raise ImportError("no module named 'libvirt' (python3-libvirt or libvirt-python)")
        _start_event_loop()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="libvirt")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.unregisterCloseCallback()
            with contextlib.suppress(Exception):
                await asyncio.to_thread(conn.close)

    def describe(self) -> dict[str, Any]:
        return {
            "uri": self.uri,
            "state": self.state,
            "domains": {d.name: d.domain for d in self.domains.values()},
            "skipped": dict(self.skipped),
        }

    def domain(self, uuid: str) -> Any:
        """libvirt's handle of the domain (blocking: call from a worker thread)."""
        conn = self._conn
        if conn is None:
            raise HostError(f"libvirt ({self.uri}) is not connected: {self.state}")
        try:
            return conn.lookupByUUIDString(uuid)
        except libvirt.libvirtError as err:
            raise HostError(f"libvirt has no domain {uuid}: {err}") from err

    @property
    def connected(self) -> bool:
        return self._conn is not None

    async def _run(self) -> None:
        delay = 0.5
        while True:
            self._closed.clear()
            try:
                conn = await asyncio.to_thread(self._open)
            except libvirt.libvirtError as err:
                if not self.state.startswith("unreachable"):  # once per outage, not per try
                    _log.warning("libvirt %s: unreachable (retrying): %s", self.uri, err)
                self.state = f"unreachable, retrying every {delay:g} s or less: {err}"
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.max_backoff)
                continue
            delay = 0.5
            self._conn = conn
            self._fresh = True  # the first read after a (re)connect is always announced
            self.state = "connected"
            self.connected_once = True
            _log.info("libvirt %s: connected", self.uri)
            self._dirty.set()
            refresher = asyncio.create_task(self._refresh_loop(), name="libvirt-refresh")
            try:
                await self._closed.wait()
            finally:
                refresher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await refresher
            self._conn = None
            self.state = "connection lost, reconnecting"
            _log.warning("libvirt %s: connection lost; domains kept until it is back", self.uri)
            with contextlib.suppress(Exception):
                await asyncio.to_thread(conn.close)

    def _open(self) -> Any:
        loop = self._loop  # (this runs in a worker thread)
        conn = libvirt.open(self.uri)
        try:
            conn.registerCloseCallback(lambda *_: _threadsafe(loop, self._closed.set), None)
            conn.setKeepAlive(5, 3)
            wake = lambda *_: _threadsafe(loop, self._dirty.set)  # noqa: E731
            for event in (
                libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE,
                libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_ADDED,
                libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED,
                libvirt.VIR_DOMAIN_EVENT_ID_TUNABLE,
            ):
                conn.domainEventRegisterAny(None, event, wake, None)
        except libvirt.libvirtError:
            conn.close()
            raise
        return conn

    @property
    def _loop(self) -> asyncio.AbstractEventLoop:
        assert self._task is not None
        return self._task.get_loop()

    async def _refresh_loop(self) -> None:
        """Re-read the running domains after each burst of events (and once at connect)."""
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            try:
                domains, skipped = await asyncio.to_thread(self._read_all)
            except libvirt.libvirtError as err:
                _log.warning("libvirt %s: cannot list domains: %s", self.uri, err)
                continue
            changed = domains != self.domains or self._fresh
            self._fresh = False
            self.domains, self.skipped = domains, skipped
            if changed:
                self._on_change()

    def _read_all(self) -> tuple[dict[str, LibvirtDomain], dict[str, str]]:
        conn = self._conn
        if conn is None:
            return self.domains, self.skipped
        domains: dict[str, LibvirtDomain] = {}
        skipped: dict[str, str] = {}
        for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
            try:
                name, uuid, xml = dom.name(), dom.UUIDString(), dom.XMLDesc(0)
                defined = (
                    dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE) if dom.isPersistent() else None
                )
            except libvirt.libvirtError:
                continue  # stopped meanwhile: its event follows
            try:
                found = parse_domain(xml, name, uuid, defined)
            except DomainSkipped as err:
                skipped[name] = str(err)
                continue
            if found is not None:
                domains[found.name] = found
        return domains, skipped


def _threadsafe(loop: asyncio.AbstractEventLoop, call: Callable[[], object]) -> None:
    """From libvirt's event thread into the service's loop (gone at exit: nothing to tell)."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(call)
