"""Domains libvirt runs: found through libvirt's own events, never through its monitor.

:class:`LibvirtLink` keeps one connection to libvirtd (``[libvirt] uri``), follows domain
lifecycle and device events (libvirt's default event loop runs in one thread; nothing is
polled) and knows which running domains take part: those whose live XML has the extpv channel
(:func:`parse_domain`). When libvirtd is absent or refuses, pvhost goes on serving its other
VMs and retries with back-off; ``pvctl status`` shows the link's state. A lost connection keeps
the domains known (their QEMU and agent sockets do not depend on libvirtd) until the next
connection says what runs.

:class:`LibvirtVcpus` gives a session a domain's vCPU threads the way a QMP monitor would: the
QEMU process is the one started with the domain's UUID, and each vCPU thread is the one libvirt
put in that domain's ``vcpuN`` cgroup (QEMU's ``CPU N/…`` thread name where libvirt made no
per-vCPU cgroup); the session learns that the domain stopped from the process's pidfd. libvirt
emits no event for a vCPU hot-plug (``virsh setvcpus --live``: checked with every event id on
libvirt 11.3), but it makes the new vCPU's ``vcpuN`` cgroup and writes the thread into it:
:class:`VcpuCgroupWatch` follows that with inotify, and the map is read again then.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import logging
import os
import re
import struct
import threading
import unicodedata
import xml.etree.ElementTree as ET
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

try:
    import libvirt
except ImportError:  # optional: pvhost serves plain-QEMU VMs without it
    libvirt = None

from extpv.aio import cancel_and_wait
from extpv.names import VM_NAME_MAX
from extpv.vcpus import VcpuThread
from pvhost.errors import HostError, QmpError

__all__ = [
    "AGENT_CHANNEL",
    "DomainSkipped",
    "LibvirtDomain",
    "LibvirtLink",
    "LibvirtVcpus",
    "VcpuCgroupWatch",
    "channel_xml",
    "domain_cgroup",
    "parse_domain",
    "safe_name",
    "set_channel",
]

_log = logging.getLogger(__name__)

AGENT_CHANNEL = "org.extpv.agent.0"
#: Prefix of the VM name pvhost gives a libvirt domain (kept apart from runtime-dir names).
NAME_PREFIX = "lv-"
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


class DomainSkipped(HostError):
    """A domain's XML names the extpv channel in a way pvhost cannot use (the reason)."""


@dataclass(frozen=True)
class LibvirtDomain:
    """A running domain that takes part, as its live XML describes it."""

    #: pvhost's name for it (:func:`safe_name`): cgroup, state and status key.
    name: str
    #: libvirt's name, any characters libvirt allows.
    domain: str
    uuid: str
    #: The extpv channel's unix socket (QEMU serves it).
    agent: Path
    #: Why extpv leaves its vCPUs alone (static ``<cputune><vcpupin>``), or None.
    static_pins: str | None = None
    #: Guest topology: (dies, clusters, cores, threads) per socket.
    topology: tuple[int, int, int, int] = (1, 1, 1, 1)


def safe_name(domain: str, uuid: str) -> str:
    """A VM name (``extpv.names`` rule) for any libvirt domain name, unique by its UUID.

    ``lv-<name folded to ASCII, unsafe runs as _>-<first 8 hex digits of the UUID>``; the
    readable part is cut so the whole stays within the VM-name limit.
    """
    folded = unicodedata.normalize("NFKD", domain).encode("ascii", "ignore").decode()
    readable = _UNSAFE.sub("_", folded).strip("_.-")
    tag = uuid.replace("-", "")[:8].lower()
    room = VM_NAME_MAX - len(NAME_PREFIX) - 1 - len(tag)
    readable = readable[:room].rstrip("_.-")
    return f"{NAME_PREFIX}{readable}-{tag}" if readable else f"{NAME_PREFIX}{tag}"


def channel_xml(path: Path | None = None) -> str:
    """The extpv channel as a device XML (libvirt picks the socket path when ``path`` is None)."""
    source = f"<source mode='bind' path='{path}'/>" if path else "<source mode='bind'/>"
    return f"<channel type='unix'>{source}<target type='virtio' name='{AGENT_CHANNEL}'/></channel>"


def _int(element: ET.Element | None, attr: str, default: int = 1) -> int:
    if element is None or element.get(attr) is None:
        return default
    try:
        value = int(element.get(attr, ""))
    except ValueError as err:
        raise DomainSkipped(f"<cpu><topology {attr}=…> is not a number") from err
    return max(value, 1)


def parse_domain(
    xml: str, domain: str, uuid: str, persistent_xml: str | None = None
) -> LibvirtDomain | None:
    """The domain as pvhost sees it (``xml``: live); None without the extpv channel.

    Static pinning is read from ``persistent_xml`` (the domain's definition): the live XML
    also lists the live pins, extpv's own among them. A transient domain has no definition, so
    none of its pins counts as static.

    Raises DomainSkipped (the reason) for a channel pvhost cannot use: not a unix socket
    QEMU serves, no path yet, or more than one.
    """
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as err:
        raise DomainSkipped(f"unreadable domain XML: {err}") from err
    found: list[ET.Element] = []
    for channel in root.iterfind("./devices/channel"):
        target = channel.find("target")
        if target is not None and target.get("name") == AGENT_CHANNEL:
            found.append(channel)
    if not found:
        return None
    if len(found) > 1:
        raise DomainSkipped(f"{len(found)} channels named {AGENT_CHANNEL}; one is allowed")
    channel = found[0]
    target = channel.find("target")
    source = channel.find("source")
    if channel.get("type") != "unix" or target is None or target.get("type") != "virtio":
        raise DomainSkipped(
            f"the {AGENT_CHANNEL} channel must be <channel type='unix'> with a virtio target "
            f"(found type={channel.get('type')!r})"
        )
    if source is None or source.get("mode", "bind") != "bind":
        raise DomainSkipped(
            f"the {AGENT_CHANNEL} channel's socket must be served by QEMU (<source mode='bind'>)"
        )
    path = source.get("path")
    if not path or not path.startswith("/"):
        raise DomainSkipped(f"the {AGENT_CHANNEL} channel has no absolute socket path")
    static = None
    try:
        defined = ET.fromstring(persistent_xml) if persistent_xml else None
    except ET.ParseError as err:
        raise DomainSkipped(f"unreadable persistent domain XML: {err}") from err
    if defined is not None and defined.find("./cputune/vcpupin") is not None:
        static = (
            f"domain {domain!r} pins its vCPUs statically (<cputune><vcpupin>): extpv leaves "
            "its placement to libvirt"
        )
    topo = root.find("./cpu/topology")
    topology = (
        _int(topo, "dies"),
        _int(topo, "clusters"),
        _int(topo, "cores"),
        _int(topo, "threads"),
    )
    return LibvirtDomain(
        name=safe_name(domain, uuid),
        domain=domain,
        uuid=uuid,
        agent=Path(path),
        static_pins=static,
        topology=topology if topo is not None else (1, 1, 1, 1),
    )


# -- the connection ----------------------------------------------------------------------------
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


# -- vCPU threads ------------------------------------------------------------------------------
_VCPU_CGROUP = re.compile(r"/vcpu(\d+)$")
_VCPU_DIR = re.compile(r"^vcpu(\d+)$")
_VCPU_COMM = re.compile(r"^CPU (\d+)/")


def qemu_pid_of_domain(uuid: str, proc: Path = Path("/proc")) -> int | None:
    """The QEMU process libvirt started for the domain (``-uuid <uuid>`` on its command line)."""
    want = uuid.lower().encode()
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if not argv or b"qemu" not in Path(os.fsdecode(argv[0])).name.encode():
            continue
        for i, arg in enumerate(argv[:-1]):
            if arg == b"-uuid" and argv[i + 1].lower() == want:
                return int(entry.name)
    return None


def vcpu_threads(pid: int, topology: tuple[int, int, int, int]) -> dict[int, VcpuThread]:
    """vCPU index → thread of QEMU ``pid``, from libvirt's vcpuN cgroups (or thread names)."""
    by_cgroup: dict[int, int] = {}
    by_comm: dict[int, int] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        tid = int(task.name)
        try:
            cgroups = (task / "cgroup").read_text().splitlines()
            comm = (task / "comm").read_text().strip()
        except OSError:
            continue  # the thread ended meanwhile
        for line in cgroups:
            m = _VCPU_CGROUP.search(line)
            if m:
                by_cgroup[int(m.group(1))] = tid
                break
        m = _VCPU_COMM.match(comm)
        if m:
            by_comm[int(m.group(1))] = tid
    found = by_cgroup or by_comm
    dies, clusters, cores, threads = topology
    per_socket = dies * clusters * cores * threads
    out = {}
    for index, tid in sorted(found.items()):
        out[index] = VcpuThread(
            index=index,
            tid=tid,
            socket=index // per_socket,
            die=(index // (clusters * cores * threads)) % dies,
            core=(index // threads) % (clusters * cores),
            thread=index % threads,
            qom_path="",
        )
    return out


def domain_cgroup(pid: int, cgroups: Path = Path("/sys/fs/cgroup")) -> Path | None:
    """The directory libvirt keeps the domain's ``vcpuN`` cgroups in: the parent of the QEMU
    process's own (``emulator``) cgroup, in the v1 cpuset hierarchy or the unified one."""
    found: list[Path] = []
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        hierarchy, controllers, path = line.split(":", 2)
        if not path.endswith("/emulator"):
            continue
        if "cpuset" in controllers.split(","):
            found.insert(0, cgroups / controllers / path.lstrip("/"))  # v1 cpuset first
        elif hierarchy == "0" and not controllers:
            found.append(cgroups / path.lstrip("/"))
    return next((p.parent for p in found if p.parent.is_dir()), None)


_IN_MODIFY = 0x2
_IN_CREATE = 0x100
_IN_DELETE = 0x200
_IN_ISDIR = 0x40000000
_EVENT = struct.Struct("iIII")


class VcpuCgroupWatch:
    """Calls ``on_event`` (debounced) when a ``vcpuN`` cgroup appears in or goes from a
    domain's cgroup directory, or a thread is written into one (inotify: no polling).

    libvirt makes the cgroup first and moves the thread into it after, so the thread file of
    each ``vcpuN`` is watched too; one made before its watch was added is seen by the read that
    the directory's own event already scheduled."""

    def __init__(self, directory: Path, on_event: Callable[[], None]) -> None:
        self.directory = directory
        self._on_event = on_event
        self._libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        self._fd = self._libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self._fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1 failed")
        try:
            self._add(directory, _IN_CREATE | _IN_DELETE)
            for child in directory.iterdir():
                if _VCPU_DIR.match(child.name):
                    self._watch_threads(child)
        except OSError:
            os.close(self._fd)
            raise
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._fd, self._readable)
        self._scheduled: asyncio.TimerHandle | None = None

    def _add(self, path: Path, mask: int) -> None:
        if self._libc.inotify_add_watch(self._fd, os.fsencode(path), mask) < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"cannot watch {path}: {os.strerror(err)}")

    def _watch_threads(self, vcpu_dir: Path) -> None:
        """v1 lists a cgroup's threads in ``tasks``, v2 (threaded) in ``cgroup.threads``."""
        for name in ("tasks", "cgroup.threads"):
            with contextlib.suppress(FileNotFoundError):
                self._add(vcpu_dir / name, _IN_MODIFY)
                return

    def _readable(self) -> None:
        try:
            while buf := os.read(self._fd, 65536):
                offset = 0
                while offset < len(buf):
                    _wd, mask, _cookie, size = _EVENT.unpack_from(buf, offset)
                    name = buf[offset + _EVENT.size : offset + _EVENT.size + size].rstrip(b"\0")
                    offset += _EVENT.size + size
                    if mask & _IN_CREATE and mask & _IN_ISDIR:
                        child = self.directory / os.fsdecode(name)
                        if _VCPU_DIR.match(child.name):
                            with contextlib.suppress(OSError):  # removed meanwhile
                                self._watch_threads(child)
        except BlockingIOError:
            pass
        if self._scheduled is None:
            # Debounce: libvirt writes the cgroup's settings and then its thread in a burst.
            self._scheduled = self._loop.call_later(0.05, self._fire)

    def _fire(self) -> None:
        self._scheduled = None
        self._on_event()

    def close(self) -> None:
        if self._scheduled is not None:
            self._scheduled.cancel()
        self._loop.remove_reader(self._fd)
        os.close(self._fd)


class LibvirtVcpus:
    """A domain's vCPU threads for a session (the part of a QMP monitor it uses)."""

    def __init__(self, domain: LibvirtDomain) -> None:
        self.domain = domain
        self.vcpus: dict[int, VcpuThread] = {}
        self.on_change: Callable[[], Awaitable[None]] | None = None
        self.on_port: Callable[[bool, int], Awaitable[None]] | None = None
        self._pid: int | None = None
        self._pidfd: int | None = None
        self._gone: asyncio.Future[None] | None = None
        self._watch: VcpuCgroupWatch | None = None
        self._rereads: asyncio.Task[None] | None = None
        self._again = asyncio.Event()

    async def connect(self, timeout: float = 5.0) -> None:
        pid = await asyncio.to_thread(qemu_pid_of_domain, self.domain.uuid)
        if pid is None:
            raise QmpError(f"libvirt domain {self.domain.domain!r} has no QEMU process running")
        try:
            self._pidfd = os.pidfd_open(pid)
        except OSError as err:
            raise QmpError(f"QEMU of domain {self.domain.domain!r} is gone: {err}") from err
        self._pid = pid
        loop = asyncio.get_running_loop()
        self._gone = loop.create_future()
        gone = self._gone

        def ended() -> None:
            if not gone.done():
                gone.set_result(None)

        loop.add_reader(self._pidfd, ended)
        try:
            cgroup = await asyncio.to_thread(domain_cgroup, pid)
            if cgroup is not None:
                self._watch = VcpuCgroupWatch(cgroup, self._again.set)
                self._rereads = loop.create_task(self._reread(), name="libvirt-vcpus")
            else:
                _log.info(
                    "domain %r: no vcpuN cgroups: a hot-plug is followed on request only",
                    self.domain.domain,
                )
        except OSError as err:
            _log.warning("domain %r: vCPU hot-plug not followed: %s", self.domain.domain, err)
        await self.refresh()
        if not self.vcpus:
            await self.close()
            raise QmpError(f"domain {self.domain.domain!r}: no vCPU threads found yet")

    async def _reread(self) -> None:
        """Read the map again after each burst of cgroup events; tell the session if it
        changed (a vCPU hot-plugged or unplugged)."""
        while True:
            await self._again.wait()
            self._again.clear()
            before = dict(self.vcpus)
            with contextlib.suppress(QmpError):  # the domain is stopping: its pidfd says so
                await self.refresh()
            if self.vcpus != before:
                _log.info(
                    "domain %r: vCPUs %s → %s",
                    self.domain.domain,
                    sorted(before),
                    sorted(self.vcpus),
                )
                if self.on_change is not None:
                    try:
                        await self.on_change()
                    except Exception:  # the next change must still be followed
                        _log.exception(
                            "domain %r: following the vCPU change failed", self.domain.domain
                        )

    async def refresh(self, timeout: float = 5.0) -> dict[int, VcpuThread]:
        if self._pid is None:
            raise QmpError(f"domain {self.domain.domain!r}: not connected")
        try:
            self.vcpus = await asyncio.to_thread(vcpu_threads, self._pid, self.domain.topology)
        except OSError as err:
            raise QmpError(
                f"domain {self.domain.domain!r}: cannot read its threads: {err}"
            ) from err
        return self.vcpus

    async def port_open(self, socket_path: Path, timeout: float = 5.0) -> bool | None:
        """Unknown: libvirt reports no port state for this channel (never its monitor)."""
        return None

    async def wait_closed(self) -> None:
        if self._gone is not None:
            await asyncio.shield(self._gone)

    async def close(self) -> None:
        if self._rereads is not None:
            await cancel_and_wait(self._rereads)
            self._rereads = None
        if self._watch is not None:
            self._watch.close()
            self._watch = None
        if self._pidfd is not None:
            asyncio.get_running_loop().remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None
        if self._gone is not None and not self._gone.done():
            self._gone.set_result(None)


# -- turning it on ------------------------------------------------------------------------------
def set_channel(uri: str, domain: str, on: bool) -> str:
    """``pvctl libvirt enable|disable DOM``: add or remove the extpv channel.

    The persistent XML changes (for the next start) and, on a running domain, the channel is
    hot-attached (libvirt picks its socket path) or hot-detached. Returns what was done;
    HostError says why not.
    """
    if libvirt is None:
        raise HostError(
            "the libvirt Python binding is not installed (python3-libvirt or libvirt-python)"
        )
    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError as err:
        raise HostError(f"cannot connect to libvirt at {uri}: {err}") from err
    try:
        try:
            dom = conn.lookupByName(domain)
        except libvirt.libvirtError as err:
            raise HostError(f"libvirt has no domain named {domain!r}") from err
        return _set_channel(dom, domain, on)
    except libvirt.libvirtError as err:
        raise HostError(f"domain {domain!r}: libvirt refused: {err}") from err
    finally:
        conn.close()


def _channel_of(xml: str) -> str | None:
    """The extpv channel element of a domain XML, serialised, or None."""
    root = ET.fromstring(xml)
    for channel in root.iterfind("./devices/channel"):
        target = channel.find("target")
        if target is not None and target.get("name") == AGENT_CHANNEL:
            return ET.tostring(channel, encoding="unicode")
    return None


def _set_channel(dom: Any, domain: str, on: bool) -> str:
    active = bool(dom.isActive())
    persistent = bool(dom.isPersistent())
    done: list[str] = []
    places = []
    if persistent:
        inactive = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
        places.append((libvirt.VIR_DOMAIN_AFFECT_CONFIG, inactive, "persistent XML"))
    if active:
        places.append((libvirt.VIR_DOMAIN_AFFECT_LIVE, dom.XMLDesc(0), "running domain"))
    for flag, xml, where in places:
        existing = _channel_of(xml)
        if on and existing is None:
            dom.attachDeviceFlags(channel_xml(), flag)
            done.append(f"added to the {where}")
        elif not on and existing is not None:
            dom.detachDeviceFlags(existing, flag)
            done.append(f"removed from the {where}")
    verb = "enabled" if on else "disabled"
    if not done:
        return f"domain {domain!r}: extpv already {verb} (nothing changed)"
    return f"domain {domain!r}: extpv {verb}: channel {' and '.join(done)}"
