"""Where VMs come from: the config file, and the runtime directory watched with inotify.

A VM in the runtime directory is a subdirectory ``<runtime_dir>/<name>/`` holding
``qmp.sock`` and ``agent.sock``. The directory is watched with inotify (through ctypes:
no dependency, no polling); any change triggers a rescan, which is cheap and idempotent.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from extpv.names import is_vm_name
from pvhost.config import Config
from pvhost.libvirt import LibvirtDomain

__all__ = ["DirWatcher", "VmSpec", "scan_vms"]

IN_MOVED_FROM = 0x40
IN_MOVED_TO = 0x80
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_ONLYDIR = 0x1000000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC


@dataclass(frozen=True)
class VmSpec:
    name: str
    qmp: Path
    agent: Path
    policy: str | None = None
    quota: int | None = None
    source: str = "runtime"
    #: Set for a domain found through libvirt (source "libvirt").
    libvirt: LibvirtDomain | None = None


def scan_vms(config: Config) -> dict[str, VmSpec]:
    """Every VM known now: configured ones, then runtime-directory ones (config wins)."""
    vms: dict[str, VmSpec] = {}
    runtime = config.service.runtime_dir
    if runtime.is_dir():
        for entry in sorted(runtime.iterdir()):
            if entry.is_dir() and is_vm_name(entry.name):
                vms[entry.name] = VmSpec(entry.name, entry / "qmp.sock", entry / "agent.sock")
    for name, vm in config.vms.items():
        vms[name] = VmSpec(name, vm.qmp, vm.agent, vm.policy, vm.quota, source="config")
    return vms


class DirWatcher:
    """Calls ``on_change`` (debounced) whenever an entry of ``directory`` appears or goes."""

    def __init__(self, directory: Path, on_change: Callable[[], None]) -> None:
        self.directory = directory
        self._on_change = on_change
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        self._fd = libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if self._fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1 failed")
        mask = IN_CREATE | IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO | IN_DELETE_SELF | IN_ONLYDIR
        if libc.inotify_add_watch(self._fd, os.fsencode(directory), mask) < 0:
            err = ctypes.get_errno()
            os.close(self._fd)
            raise OSError(err, f"cannot watch {directory}: {os.strerror(err)}")
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._fd, self._readable)
        self._scheduled: asyncio.TimerHandle | None = None

    def _readable(self) -> None:
        try:
            while os.read(self._fd, 65536):
                pass
        except BlockingIOError:
            pass
        if self._scheduled is None:
            # Debounce bursts (a VM directory and its sockets appear together).
            self._scheduled = self._loop.call_later(0.05, self._fire)

    def _fire(self) -> None:
        self._scheduled = None
        self._on_change()

    def close(self) -> None:
        if self._scheduled is not None:
            self._scheduled.cancel()
        self._loop.remove_reader(self._fd)
        os.close(self._fd)
