"""Service plugins installed for a test as a real distribution: a ``*.dist-info`` with an
``entry_points.txt`` and the plugins' module, in a directory put on ``sys.path`` — found by
the real ``importlib.metadata`` machinery exactly as an installed third-party package is.

The plugins are deliberately broken (or, ``echo``, well-behaved) to show that a service that
raises, hangs or returns nonsense is disabled for its VM and harms nothing else.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["MODULE", "PLUGINS", "install"]

MODULE = "extpv_test_services"

#: Entry-point name → class in MODULE.
PLUGINS = {
    "echo": "Echo",
    "raising": "Raising",
    "hanging": "Hanging",
    "nonsense": "Nonsense",
    "badstatus": "BadStatus",
    "noimport": "DoesNotExist",
}

_SOURCE = '''
"""Test services for extpv (see tests/plugindist.py)."""
import asyncio
import struct

from pvhost.services import EventError, ServicePlugin

PAYLOAD = b"\\x7fELF test service program"


class _Base(ServicePlugin):
    def __init__(self, context, config):
        super().__init__(context, config)
        self._programs = [context.sign(self.name, "bpf-object", PAYLOAD + self.name.encode())]

    def programs(self):
        return self._programs


class Echo(_Base):
    """Well-behaved: records are 8-byte little-endian counters; it keeps what it got."""

    name = "echo"
    summary = "counts the records of its program"

    def __init__(self, context, config):
        super().__init__(context, config)
        self.events = {}
        self.ready = {}

    def decode(self, program_id, record):
        if len(record) != 8:
            raise EventError(f"an echo record is 8 bytes, not {len(record)}")
        return struct.unpack("<Q", record)[0]

    async def on_ready(self, vm):
        self.ready[vm.name] = self.ready.get(vm.name, 0) + 1

    async def on_events(self, vm, program_id, events):
        self.events.setdefault(vm.name, []).extend(events)

    def status(self, vm):
        return {"events": self.events.get(vm, []), "ready": self.ready.get(vm, 0)}

    def metrics(self):
        return {"events": float(sum(len(e) for e in self.events.values()))}


class Raising(_Base):
    name = "raising"

    async def on_ready(self, vm):
        raise RuntimeError("on_ready of a broken service")


class Hanging(_Base):
    name = "hanging"

    async def on_events(self, vm, program_id, events):
        await asyncio.Event().wait()  # never returns


class Nonsense(_Base):
    name = "nonsense"

    def programs(self):
        return "not a list of programs"


class BadStatus(_Base):
    name = "badstatus"

    def status(self, vm):
        return {"an object": object()}

    def metrics(self):
        raise RuntimeError("metrics of a broken service")
'''


def install(directory: Path) -> Path:
    """Write the distribution into ``directory`` (put it on sys.path to install it)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{MODULE}.py").write_text(_SOURCE)
    info = directory / "extpv_test_services-0.1.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: extpv-test-services\nVersion: 0.1\n"
    )
    lines = [f"{name} = {MODULE}:{cls}" for name, cls in PLUGINS.items()]
    (info / "entry_points.txt").write_text("[extpv.services]\n" + "\n".join(lines) + "\n")
    return directory
