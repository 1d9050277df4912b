"""Where VMs come from: the config file, and the runtime directory watched with inotify.

A VM in the runtime directory is a subdirectory ``<runtime_dir>/<name>/`` holding
``qmp.sock`` and ``agent.sock``. The directory is watched with inotify
(:mod:`pvhost.inotify`: no polling); any change triggers a rescan, which is cheap and idempotent.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from extpv.names import is_vm_name
from pvhost.config import Config
from pvhost.inotify import (
    IN_CREATE,
    IN_DELETE,
    IN_DELETE_SELF,
    IN_MOVED_FROM,
    IN_MOVED_TO,
    IN_ONLYDIR,
    InotifyWatch,
)
from pvhost.libvirt import LibvirtDomain

__all__ = ["DirWatcher", "VmSpec", "scan_vms"]


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
        # Debounced: a VM directory and its sockets appear together.
        self._watch = InotifyWatch(on_change)
        try:
            self._watch.add(
                directory,
                IN_CREATE | IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO | IN_DELETE_SELF | IN_ONLYDIR,
            )
        except OSError:
            self._watch.close()
            raise

    def close(self) -> None:
        self._watch.close()
