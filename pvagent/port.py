"""The channel to the host: the virtio-serial port, or a unix socket for tests.

``run_port`` (the daemon's normal mode): pyudev finds the port whose sysfs ``name``
attribute is the configured name (default ``org.extpv.agent.0``), or waits for it with a
udev monitor — no polling. The port survives:

* **unplug/replug** — the udev ``remove`` event ends the session and closes the device;
  the next ``add`` or ``change`` event with the same name opens it again (the kernel adds a
  port before it knows its name: see ``_names_port``);
* **host disconnect/reconnect** — while no host is attached, reads of a virtio port return
  EOF. The port is opened with ``O_ASYNC``: the virtio console driver sends SIGIO when the
  host side opens or closes, so the agent sleeps until then and starts a new session
  (new Hello, whole state resent) — again no polling.

``run_unix`` connects to a unix socket (the host side of QEMU's chardev, or a test host)
and reconnects after EOF with a capped back-off: a development/test transport.
``run_device`` opens any character device, FIFO or socket path given with ``--device``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import select
import signal
import time
from pathlib import Path
from typing import Any

from extpv.aio import cancel_and_wait
from pvagent.agent import Agent
from pvagent.errors import PortError

__all__ = ["find_port", "open_stream", "run_device", "run_port", "run_unix"]

log = logging.getLogger(__name__)

_SUBSYSTEM = "virtio-ports"


async def open_stream(
    fd: int,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, asyncio.BaseTransport]:
    """Asyncio streams over a character device / FIFO fd, and the read side's transport
    (close it when done). Each direction gets its own duplicate of ``fd``, so closing the
    streams leaves ``fd`` itself open."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=2**20)
    rfile = os.fdopen(os.dup(fd), "rb", buffering=0)
    wfile = os.fdopen(os.dup(fd), "wb", buffering=0)
    rtransport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), rfile
    )
    transport, protocol = await loop.connect_write_pipe(asyncio.streams.FlowControlMixin, wfile)
    writer = asyncio.StreamWriter(transport, protocol, reader, loop)
    return reader, writer, rtransport


def _open_port(node: str) -> int:
    try:
        fd = os.open(node, os.O_RDWR | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as err:
        raise PortError(f"cannot open {node}: {err.strerror}") from err
    # SIGIO on host open/close (virtio_console: send_sigio_to_port).
    fcntl.fcntl(fd, fcntl.F_SETOWN, os.getpid())
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_ASYNC)
    return fd


async def _serve_fd(agent: Agent, fd: int, host_changed: asyncio.Event) -> None:
    """Sessions on one open port until it is closed under us (cancelled by the caller)."""
    while True:
        host_changed.clear()
        if not _host_absent(fd):
            reader, writer, rtransport = await open_stream(fd)
            try:
                await agent.serve(reader, writer)
            finally:
                rtransport.close()
        if not host_changed.is_set():
            # The host left (or the session ended): sleep until it opens the port again.
            log.info("waiting for the host to (re)open the port (SIGIO)")
            await host_changed.wait()


def _host_absent(fd: int) -> bool:
    """A virtio port polls POLLHUP while no host has it open."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return any(ev & select.POLLHUP for _, ev in poller.poll(0))


def _quiet_unplug(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """An unplugged port fails reads with ENODEV: expected, so one line, not a traceback."""
    exc = context.get("exception")
    if isinstance(exc, OSError) and exc.errno in (errno.ENODEV, errno.EIO):
        log.info("port gone: %s", exc.strerror)
        return
    loop.default_exception_handler(context)


def find_port(context: Any, name: str) -> str | None:
    """Device node of the virtio-serial port called ``name``, if present."""
    for device in context.list_devices(subsystem=_SUBSYSTEM):
        if _port_name(device) == name and device.device_node:
            return str(device.device_node)
    return None


def _names_port(action: str, port: str | None, devnode: str | None, name: str) -> bool:
    """Whether a udev event announces the port called ``name``, ready to open.

    virtio_console adds a hot-plugged port first and learns its name later, from the host's
    PORT_NAME message: only then does the ``name`` attribute appear, announced by a
    ``change`` event. When the ``add`` event is read before that (a busy guest), it shows no
    name, so the ``change`` event is the one that names the port."""
    return action in ("add", "change") and port == name and bool(devnode)


def _port_name(device: Any) -> str | None:
    value = device.attributes.get("name")
    if value is None:
        return None
    return bytes(value).decode(errors="replace").strip()


async def run_port(agent: Agent, name: str) -> None:
    """Serve the host over the virtio-serial port ``name`` forever (see module docstring)."""
    import pyudev  # noqa: PLC0415 - guest-only dependency; --unix/--device work without it

    loop = asyncio.get_running_loop()
    context = pyudev.Context()
    monitor = pyudev.Monitor.from_netlink(context)
    monitor.filter_by(_SUBSYSTEM)
    monitor.start()  # before enumerating: no add event can slip between the two
    udev_events: asyncio.Queue[tuple[str, str | None, str | None]] = asyncio.Queue(maxsize=256)

    def on_udev() -> None:
        while (device := monitor.poll(timeout=0)) is not None:
            item = (device.action or "", _port_name(device), device.device_node)
            with contextlib.suppress(asyncio.QueueFull):
                udev_events.put_nowait(item)

    host_changed = asyncio.Event()
    loop.set_exception_handler(_quiet_unplug)
    loop.add_reader(monitor.fileno(), on_udev)
    loop.add_signal_handler(signal.SIGIO, host_changed.set)
    try:
        node = find_port(context, name)
        while True:
            if node is None:
                log.info("waiting for virtio-serial port %r (udev)", name)
                while node is None:
                    action, port, devnode = await udev_events.get()
                    if _names_port(action, port, devnode, name):
                        node = devnode
            fd = _open_port(node)
            log.info("port %s open (%s)", name, node)
            session = asyncio.create_task(_serve_fd(agent, fd, host_changed))
            try:
                while True:
                    getter = asyncio.create_task(udev_events.get())
                    done, _ = await asyncio.wait(
                        {session, getter}, return_when=asyncio.FIRST_COMPLETED
                    )
                    if session in done:
                        getter.cancel()
                        session.result()
                    action, port, devnode = getter.result()
                    if action == "remove" and (port == name or devnode == node):
                        log.info("port %s removed", name)
                        break
            finally:
                try:
                    await cancel_and_wait(session)
                finally:
                    os.close(fd)
            node = None
    finally:
        loop.remove_reader(monitor.fileno())
        loop.remove_signal_handler(signal.SIGIO)


async def run_device(agent: Agent, path: Path) -> None:
    """Serve the host over an already existing device/FIFO/socket path."""
    if path.is_socket():
        await run_unix(agent, path)
        return
    loop = asyncio.get_running_loop()
    host_changed = asyncio.Event()
    # The handler first: SIGIO's default action would end the process.
    loop.add_signal_handler(signal.SIGIO, host_changed.set)
    loop.set_exception_handler(_quiet_unplug)
    try:
        fd = _open_port(str(path))
    except BaseException:
        loop.remove_signal_handler(signal.SIGIO)
        raise
    try:
        await _serve_fd(agent, fd, host_changed)
    finally:
        loop.remove_signal_handler(signal.SIGIO)
        os.close(fd)


async def run_unix(agent: Agent, path: Path, *, max_backoff: float = 2.0) -> None:
    """Connect to the unix socket ``path``; reconnect after each EOF (capped back-off)."""
    backoff = 0.05
    while True:
        try:
            reader, writer = await asyncio.open_unix_connection(str(path), limit=2**20)
        except OSError as err:
            log.info(
                "waiting for the host socket %s (%s); retry in %.2f s", path, err.strerror, backoff
            )
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, max_backoff)
            continue
        log.info("connected to %s", path)
        started = time.monotonic()
        await agent.serve(reader, writer)
        if time.monotonic() - started > 1.0:
            backoff = 0.05  # a real session: reconnect at once; a flapping peer backs off
        else:
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, max_backoff)
