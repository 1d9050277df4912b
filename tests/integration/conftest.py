"""Fixtures for integration tests (root, real kernel): eBPF readiness, and a real QEMU
process (the lab's empty machine: TCG, no guest OS), killed in teardown.

QEMU's vCPU threads exist as soon as it starts with ``-S``: each is a real host thread, which
is all the host service needs to pin. The test plays the guest agent on ``agent.sock``
(vmlab.guestpeer); QEMU's own end of the port is ``qemu-agent.sock``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REQUIRE, _missing
from tests.cpusets import CPUSET, hand_back
from vmlab import VirtualMachine, VMSpec, start


@pytest.fixture(scope="session")
def _ebpf_ready() -> None:
    """tracefs and bpffs mounted (the ebpf gate does it; module-scoped fixtures run before
    the per-test gate, so they ask for this first)."""
    reason = _missing("ebpf")
    if reason is not None:
        if REQUIRE:
            pytest.fail(f"[ebpf] capability required in CI but absent: {reason}")
        pytest.skip(f"[ebpf] {reason}")


# Three threads that wait until stdin closes, their tids printed on one line.
_THREADS = """
import threading, sys
ready = []
stop = threading.Event()
def work():
    ready.append(threading.get_native_id())
    stop.wait()
threads = [threading.Thread(target=work) for _ in range(3)]
for t in threads: t.start()
while len(ready) < 3: pass
print(" ".join(map(str, sorted(ready))), flush=True)
sys.stdin.read()
stop.set()
"""


@pytest.fixture
def process() -> Iterator[tuple[int, list[int]]]:
    """A process of ours (pid) with three more threads (their tids), standing in for QEMU
    and its vCPU threads; killed at teardown."""
    child = subprocess.Popen(
        [sys.executable, "-c", _THREADS], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None
    try:
        yield child.pid, [int(t) for t in child.stdout.readline().split()]
    finally:
        child.kill()
        child.wait(timeout=10)


@pytest.fixture
def qemu(tmp_path: Path) -> Iterator[VirtualMachine]:
    """A real, empty QEMU with 3 vCPUs in ``tmp_path/vm/t`` (vmlab); killed at teardown."""
    vm = start(VMSpec.empty("t", tmp_path / "vm"))
    try:
        yield vm
    finally:
        vm.kill()
        vm.stop()


@pytest.fixture
def cpuset_group() -> Iterator[str]:
    """A cgroup v1 cpuset name of our own for this test; checked removed at teardown."""
    group = f"extpv-test-{os.getpid()}-{time.monotonic_ns() % 10**6}"
    yield group
    leaked = CPUSET / group
    if leaked.exists():
        for path in sorted(leaked.rglob("*"), key=lambda p: -len(p.parts)):
            if path.is_dir():
                hand_back(path)
                path.rmdir()
        (leaked / "tasks").read_text()
        leaked.rmdir()
        pytest.fail(f"test leaked cgroup {leaked}")
