"""A libvirt domain's vCPU threads, for a session, the way a QMP monitor would give them.

:class:`LibvirtVcpus`: the QEMU process is the one started with the domain's UUID, and each vCPU
thread is the one libvirt put in that domain's ``vcpuN`` cgroup (QEMU's ``CPU N/…`` thread name
where libvirt made no per-vCPU cgroup); the session learns that the domain stopped from the
process's pidfd. libvirt emits no event for a vCPU hot-plug (``virsh setvcpus --live``: checked
with every event id on libvirt 11.3), but it makes the new vCPU's ``vcpuN`` cgroup and writes
the thread into it: :class:`VcpuCgroupWatch` follows that with inotify, and the map is read
again then.
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
from collections.abc import Awaitable, Callable
from pathlib import Path

from extpv.aio import cancel_and_wait
from extpv.vcpus import VcpuThread
from pvhost.errors import QmpError
from pvhost.libvirt.domain import LibvirtDomain

__all__ = [
    "LibvirtVcpus",
    "VcpuCgroupWatch",
    "domain_cgroup",
    "qemu_pid_of_domain",
    "vcpu_threads",
]

_log = logging.getLogger(__name__)

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


def domain_cgroup(
    pid: int, proc: Path = Path("/proc"), cgroups: Path = Path("/sys/fs/cgroup")
) -> Path | None:
    """The directory libvirt keeps the domain's ``vcpuN`` cgroups in: the parent of the QEMU
    process's own (``emulator``) cgroup, in the v1 cpuset hierarchy or the unified one."""
    found: list[Path] = []
    for line in (proc / str(pid) / "cgroup").read_text().splitlines():
        hierarchy, controllers, path = line.split(":", 2)
        if not path.endswith("/emulator"):
            continue
        if "cpuset" in controllers.split(","):
            found.insert(0, cgroups / controllers / path.lstrip("/"))  # v1 cpuset first
        elif hierarchy == "0" and not controllers:
            found.append(cgroups / path.lstrip("/"))
    return next((p.parent for p in found if p.parent.is_dir()), None)


_IN_MODIFY = 0x2
_IN_MOVED_FROM = 0x40
_IN_MOVED_TO = 0x80
_IN_CREATE = 0x100
_IN_DELETE = 0x200
_IN_ISDIR = 0x40000000
_EVENT = struct.Struct("iIII")


class VcpuCgroupWatch:
    """Calls ``on_event`` (debounced) when a ``vcpuN`` cgroup appears in or goes from a
    domain's cgroup directory (made, removed, or renamed: v1 allows it), or a thread is written
    into one (inotify: no polling).

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
            self._add(directory, _IN_CREATE | _IN_DELETE | _IN_MOVED_TO | _IN_MOVED_FROM)
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
                    if mask & (_IN_CREATE | _IN_MOVED_TO) and mask & _IN_ISDIR:
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
