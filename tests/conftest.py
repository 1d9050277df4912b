"""Capability gates for the `root`, `ebpf`, `vm` and `libvirt` markers, and the lab's warnings.

A marked test skips, with the reason printed, only when the capability is truly
absent. CI sets ``EXTPV_REQUIRE_CAPABILITIES=1``: there a missing capability is
a failure, never a silent skip.

The lab's warnings (``vmlab`` and ``tests`` loggers: a boot retried after QEMU aborted or the
guest hung, a fault cell run again on a new QEMU, an image built) are listed at the end of every
run, passed or not: a retry that let a test pass is still an event to explain, and a passing
test's captured log is never shown.
"""

from __future__ import annotations

import logging
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


class _LabWarnings(logging.Handler):
    """Keeps each warning of the lab with the test it happened in."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.seen: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        test = os.environ.get("PYTEST_CURRENT_TEST", "(outside a test)")
        first = (record.getMessage().splitlines() or [""])[0][:300]
        self.seen.append(f"{test}: {record.name}: {first}")


_lab_warnings = _LabWarnings()
_LAB_LOGGERS = ("vmlab", "tests")


def pytest_configure(config: pytest.Config) -> None:
    for name in _LAB_LOGGERS:
        logging.getLogger(name).addHandler(_lab_warnings)


def pytest_unconfigure(config: pytest.Config) -> None:
    for name in _LAB_LOGGERS:
        logging.getLogger(name).removeHandler(_lab_warnings)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _lab_warnings.seen:
        terminalreporter.section("the lab's warnings: boots retried, cells healed, images built")
        for line in _lab_warnings.seen:
            terminalreporter.write_line(line)
