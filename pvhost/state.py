"""Saved previous state, for exact undo and crash recovery.

Before a backend changes anything it records here what it is about to change and the
value it replaces; the file is replaced atomically (write, fsync, rename), so a kill -9 at
any moment leaves either the old or the new record, and the record is always written
*before* the change. At start, reconcile reads it back together with cgroupfs.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["StateStore"]


class StateStore:
    """A JSON document on disk: ``{"vms": {vm: {"attach": {...}, "vcpus": {"N": {...}}}}}``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = {"vms": {}}
        if path.exists():
            try:
                loaded = json.loads(path.read_text())
            except (OSError, ValueError):
                loaded = None
            if isinstance(loaded, dict) and isinstance(loaded.get("vms"), dict):
                self.data = loaded

    def vms(self) -> dict[str, dict[str, Any]]:
        vms: dict[str, dict[str, Any]] = self.data["vms"]
        return vms

    def vm(self, name: str) -> dict[str, Any]:
        entry: dict[str, Any] = self.vms().setdefault(name, {"attach": None, "vcpus": {}})
        return entry

    def pins(self) -> dict[str, dict[int, int]]:
        """VM → {vCPU → pCPU} for every saved pin."""
        return {
            vm: {int(v): int(rec["pcpu"]) for v, rec in entry.get("vcpus", {}).items()}
            for vm, entry in self.vms().items()
            if entry.get("vcpus")
        }

    def vcpu(self, name: str, vcpu: int) -> dict[str, Any] | None:
        record: dict[str, Any] | None = self.vms().get(name, {}).get("vcpus", {}).get(str(vcpu))
        return record

    def set_vcpu(self, name: str, vcpu: int, record: dict[str, Any] | None) -> None:
        vcpus = self.vm(name)["vcpus"]
        if record is None:
            vcpus.pop(str(vcpu), None)
        else:
            vcpus[str(vcpu)] = record
        self.save()

    def set_attach(self, name: str, record: dict[str, Any] | None) -> None:
        self.vm(name)["attach"] = record
        self.save()

    def drop_vm(self, name: str) -> None:
        self.vms().pop(name, None)
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(prefix=".state-", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as out:
                json.dump(self.data, out, sort_keys=True)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
