"""Capability gates for the `root`, `ebpf`, `vm` and `libvirt` markers.

A marked test skips, with the reason printed, only when the capability is truly
absent. CI sets ``EXTPV_REQUIRE_CAPABILITIES=1``: there a missing capability is
a failure, never a silent skip.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import NoReturn

import pytest

REQUIRE = os.environ.get("EXTPV_REQUIRE_CAPABILITIES") == "1"


def _mount(fstype: str, target: str) -> None:
    if subprocess.run(["mountpoint", "-q", target], check=False).returncode == 0:
        return
    Path(target).mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["mount", "-t", fstype, "nodev" if fstype != "bpf" else "bpf", target],
        check=True,
        capture_output=True,
    )


def _missing(marker: str) -> str | None:
    """Why the capability behind ``marker`` is absent here, or None if present."""
    if os.geteuid() != 0:
        return "needs root"
    if marker == "ebpf":
        if not Path("/sys/kernel/btf/vmlinux").exists():
            return "kernel has no BTF (/sys/kernel/btf/vmlinux)"
        try:
            _mount("tracefs", "/sys/kernel/tracing")
            _mount("bpf", "/sys/fs/bpf")
        except subprocess.CalledProcessError as err:
            return f"cannot mount tracefs/bpffs: {err.stderr.decode().strip()}"
        if not Path("/sys/kernel/tracing/events/syscalls/sys_enter_sched_setaffinity").exists():
            return "kernel has no syscall tracepoints (CONFIG_FTRACE_SYSCALLS)"
    if marker in ("vm", "libvirt") and shutil.which("qemu-system-x86_64") is None:
        return "qemu-system-x86_64 is not installed"
    if marker == "libvirt":
        for tool in ("libvirtd", "virtlogd", "virsh"):
            if shutil.which(tool) is None:
                return f"{tool} is not installed (.ci/install-system installs libvirt)"
        try:
            import libvirt  # noqa: F401
        except ImportError:
            return "the libvirt Python binding is not installed (pip install '.[libvirt]')"
    return None


def absent(reason: str) -> NoReturn:
    """A capability a test needs is missing: skip with the reason, or fail in CI."""
    if REQUIRE:
        pytest.fail(f"capability required in CI but absent: {reason}")
    pytest.skip(reason)


_cache: dict[str, str | None] = {}


def pytest_runtest_setup(item: pytest.Item) -> None:
    for marker in ("root", "ebpf", "vm", "libvirt"):
        if item.get_closest_marker(marker) is None:
            continue
        if marker not in _cache:
            _cache[marker] = _missing(marker)
        reason = _cache[marker]
        if reason is None:
            continue
        if REQUIRE:
            pytest.fail(f"[{marker}] capability required in CI but absent: {reason}")
        pytest.skip(f"[{marker}] {reason}")
