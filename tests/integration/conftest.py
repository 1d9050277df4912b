"""Fixtures for integration tests (root, real kernel): eBPF readiness, and a real QEMU
process (TCG, no guest OS), killed in teardown.

QEMU's vCPU threads exist as soon as it starts with ``-S``: each is a real host thread
named ``CPU <n>/TCG`` (``debug-threads=on``), which is all the host service needs to pin.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REQUIRE, _missing


@pytest.fixture(scope="session")
def _ebpf_ready() -> None:
    """tracefs and bpffs mounted (the ebpf gate does it; module-scoped fixtures run before
    the per-test gate, so they ask for this first)."""
    reason = _missing("ebpf")
    if reason is not None:
        if REQUIRE:
            pytest.fail(f"[ebpf] capability required in CI but absent: {reason}")
        pytest.skip(f"[ebpf] {reason}")


@dataclass
class Qemu:
    name: str
    dir: Path
    qmp: Path
    process: subprocess.Popen[bytes]

    @property
    def pid(self) -> int:
        return self.process.pid

    def vcpu_tids(self) -> dict[int, int]:
        """vCPU index → host tid, from thread names (independent of QMP)."""
        out: dict[int, int] = {}
        for task in Path(f"/proc/{self.pid}/task").iterdir():
            comm = (task / "comm").read_text().strip()
            if comm.startswith("CPU ") and comm.endswith("/TCG"):
                out[int(comm[4:].split("/")[0])] = int(task.name)
        return out

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)


def start_qemu(directory: Path, name: str, smp: int = 3, maxcpus: int | None = None) -> Qemu:
    """QEMU with ``smp`` vCPUs (``maxcpus`` allows hot-plug) and a second QMP monitor
    ``launcher-qmp.sock`` for the test itself (QEMU allows one client per monitor)."""
    directory.mkdir(parents=True, exist_ok=True)
    qmp = directory / "qmp.sock"
    cmd = [
        "qemu-system-x86_64", "-S", "-accel", "tcg,thread=multi",
        "-smp", f"{smp},maxcpus={maxcpus}" if maxcpus else str(smp),
        "-m", "64", "-nodefaults", "-display", "none", "-name", f"{name},debug-threads=on",
        "-qmp", f"unix:{qmp},server=on,wait=off",
        "-qmp", f"unix:{directory / 'launcher-qmp.sock'},server=on,wait=off",
        # QEMU's own end of the agent channel; the tests play the guest on agent.sock instead
        # (with no guest OS, nothing could answer on the virtio-serial side).
        "-chardev", f"socket,id=pv0,path={directory / 'qemu-agent.sock'},server=on,wait=off",
        "-device", "virtio-serial-pci,id=vser0",
        "-device", "virtserialport,bus=vser0.0,chardev=pv0,name=org.extpv.agent.0",
    ]  # fmt: skip
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    qemu = Qemu(name, directory, qmp, process)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            err = process.stderr.read().decode() if process.stderr else ""
            raise RuntimeError(f"QEMU exited with {process.returncode}: {err}")
        if qmp.exists() and len(qemu.vcpu_tids()) == smp:
            return qemu
        time.sleep(0.05)
    qemu.kill()
    raise RuntimeError(f"QEMU did not create {qmp} and {smp} vCPU threads within 20 s")


@pytest.fixture
def qemu(tmp_path: Path) -> Iterator[Qemu]:
    """A real QEMU with 3 vCPUs in ``tmp_path/vm``; killed at teardown."""
    vm = start_qemu(tmp_path / "vm", "t")
    try:
        yield vm
    finally:
        vm.kill()


@pytest.fixture
def cpuset_group() -> Iterator[str]:
    """A cgroup v1 cpuset name of our own for this test; checked removed at teardown."""
    group = f"extpv-test-{os.getpid()}-{time.monotonic_ns() % 10**6}"
    yield group
    leaked = Path("/sys/fs/cgroup/cpuset") / group
    if leaked.exists():
        for path in sorted(leaked.rglob("*"), key=lambda p: -len(p.parts)):
            if path.is_dir():
                for tid in (path / "tasks").read_text().split():
                    (Path("/sys/fs/cgroup/cpuset") / "tasks").write_text(tid)
                path.rmdir()
        (leaked / "tasks").read_text()
        leaked.rmdir()
        pytest.fail(f"test leaked cgroup {leaked}")
