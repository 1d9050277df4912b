"""Service plugins installed for a test as a real distribution: a ``*.dist-info`` with an
``entry_points.txt`` and the plugins' module, in a directory put on ``sys.path`` — found by
the real ``importlib.metadata`` machinery exactly as an installed third-party package is.

The plugins are deliberately broken (or, ``echo``, well-behaved) to show that a service that
raises, hangs or returns nonsense is disabled for its VM and harms nothing else.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

__all__ = ["ECHO_SOURCE", "MODULE", "PLUGINS", "build_echo", "install"]

MODULE = "extpv_test_services"

#: Entry-point name → class in MODULE.
PLUGINS = {
    "echo": "Echo",
    "raising": "Raising",
    "hanging": "Hanging",
    "nonsense": "Nonsense",
    "badstatus": "BadStatus",
    "noimport": "DoesNotExist",
    "echobpf": "EchoBpf",
}

_SOURCE = '''
"""Test services for extpv (see tests/plugindist.py)."""
import asyncio
import pathlib
import struct

import pydantic

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


class EchoBpf(ServicePlugin):
    """A real eBPF service: its program (``[services.echobpf] object``) writes a counter of
    8 bytes per record to its ring buffer; the service keeps the decoded counters."""

    name = "echobpf"
    summary = "counts a process's getppid() calls in the guest"

    class Config(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(extra="forbid")
        object: str = ""

    def __init__(self, context, config):
        super().__init__(context, config)
        payload = pathlib.Path(config.object).read_bytes() if config.object else None
        self._programs = [context.sign("echobpf", "bpf-object", payload)] if payload else []
        self.events = {}

    def programs(self):
        return self._programs

    def decode(self, program_id, record):
        if len(record) != 8:
            raise EventError(f"an echo record is 8 bytes, not {len(record)}")
        return struct.unpack("<Q", record)[0]

    async def on_events(self, vm, program_id, events):
        self.events.setdefault(vm.name, []).extend(events)

    def status(self, vm):
        return {"events": self.events.get(vm, [])}


class BadStatus(_Base):
    name = "badstatus"

    def status(self, vm):
        return {"an object": object()}

    def metrics(self):
        raise RuntimeError("metrics of a broken service")
'''


#: A service's program the agent knows nothing about: every getppid() of process TARGET
#: counts in pv_count and writes the count (8 bytes) to the ring buffer pv_echo.
ECHO_SOURCE = """
#include <linux/types.h>
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
struct { __uint(type, BPF_MAP_TYPE_RINGBUF); __uint(max_entries, 1 << 16); } pv_echo SEC(".maps");
struct {
    __uint(type, BPF_MAP_TYPE_ARRAY); __uint(max_entries, 1);
    __type(key, __u32); __type(value, __u64);
} pv_count SEC(".maps");
SEC("tp/syscalls/sys_enter_getppid")
int echo(void *ctx)
{
    __u32 zero = 0;
    __u64 *count, n;
    if ((bpf_get_current_pid_tgid() >> 32) != TARGET)
        return 0;
    count = bpf_map_lookup_elem(&pv_count, &zero);
    if (!count)
        return 0;
    n = __sync_fetch_and_add(count, 1) + 1;
    bpf_ringbuf_output(&pv_echo, &n, sizeof(n), 0);
    return 0;
}
char LICENSE[] SEC("license") = "Dual BSD/GPL";
"""


def build_echo(directory: Path, target_pid: int) -> Path:
    """Compile the echo program for process ``target_pid`` (as bpf/ builds: clang, CO-RE)."""
    multiarch = subprocess.run(
        ["cc", "-print-multiarch"], capture_output=True, text=True, check=False
    ).stdout.strip()
    arch = {"x86_64": "x86", "aarch64": "arm64"}.get(os.uname().machine, os.uname().machine)
    src = directory / "echo.bpf.c"
    src.write_text(f"#define TARGET {target_pid}\n" + ECHO_SOURCE)
    out = directory / "echo.bpf.o"
    cmd = ["clang", "-O2", "-g", "-Wall", "-target", "bpf", f"-D__TARGET_ARCH_{arch}"]
    if multiarch:
        cmd += ["-idirafter", f"/usr/include/{multiarch}"]
    subprocess.run([*cmd, "-c", str(src), "-o", str(out)], check=True)
    return out


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
