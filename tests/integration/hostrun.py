"""pvhost against a real QEMU, the guest played on the VM's channel socket.

The guest end is :class:`vmlab.guestpeer.FakeGuestChannel`, the lab's named fake peer: it
writes exactly the bytes a guest agent (or a hostile guest root) could write to the port.
pvhost runs either in this process (:func:`served`, a :class:`~pvhost.service.Service`) or
as operators run it (:func:`daemon_and_guest`, ``pvhost run`` + ``pvctl``).
"""

from __future__ import annotations

import asyncio
import signal
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from pvhost.config import Config
from pvhost.service import Service
from vmlab import VirtualMachine
from vmlab.guestpeer import FakeGuestChannel

__all__ = [
    "Daemon",
    "daemon_and_guest",
    "free_port",
    "served",
    "service_config",
    "write_config",
]

_PAYLOAD = b"\x7fELF test payload: the guest is played by the test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def service_config(tmp_path: Path, qemu: VirtualMachine, group: str, **placement: object) -> Config:
    """In-process service config: VM ``t`` is ``qemu``, cgroup v1 cpusets under ``group``."""
    program = tmp_path / "affinity.bpf.o"
    program.write_bytes(_PAYLOAD)
    return Config.model_validate(
        {
            "service": {
                "runtime_dir": str(tmp_path / "runtime"),
                "state_dir": str(tmp_path / "state"),
                "control_socket": str(tmp_path / "pvhost.sock"),
                "signing_key": str(tmp_path / "no-key"),
                "affinity_program": str(program),
                "max_backoff": 0.5,
            },
            "placement": {
                "backend": "cgroup1",
                "group": group,
                "housekeeping": "",
                "policy": "identity",
                "quota": 2,
                **placement,
            },
            "vms": {"t": {"qmp": str(qemu.qmp_socket), "agent": str(qemu.dir / "agent.sock")}},
        }
    )


def write_config(
    tmp_path: Path, qemu: VirtualMachine, group: str, port: int, placement: str = ""
) -> Path:
    """The daemon's TOML: VM ``t`` is ``qemu``; pool policy, quota 1, CPU 0 housekeeping;
    ``placement``: more ``[placement]`` lines."""
    program = tmp_path / "affinity.bpf.o"
    program.write_bytes(_PAYLOAD)
    config = tmp_path / "pvhost.toml"
    config.write_text(f"""
[service]
runtime_dir = "{tmp_path / "runtime"}"
state_dir = "{tmp_path / "state"}"
control_socket = "{tmp_path / "pvhost.sock"}"
metrics = "127.0.0.1:{port}"
signing_key = "{tmp_path / "no-key"}"
affinity_program = "{program}"
max_backoff = 0.5

[placement]
backend = "cgroup1"
group = "{group}"
housekeeping = "0"
policy = "pool"
quota = 1
{placement}

[vms.t]
qmp = "{qemu.qmp_socket}"
agent = "{qemu.dir / "agent.sock"}"
""")
    return config


@asynccontextmanager
async def served(
    config: Config, agent: Path, *, vcpus: int = 3, connect: bool = True
) -> AsyncIterator[tuple[Service, FakeGuestChannel]]:
    """A started :class:`Service` and the guest end of ``agent`` (a guest with ``vcpus``
    vCPUs), connected unless ``connect`` is false; both stopped after."""
    guest = FakeGuestChannel(agent, vcpus=vcpus)
    await guest.start()
    try:
        service = Service(config)
        await service.start()
        try:
            if connect:
                await guest.connected()
            yield service, guest
        finally:
            await service.stop()
    finally:
        await guest.close()


class Daemon:
    """``pvhost run --config`` of this checkout, its log in ``tmp_path/pvhost.log``."""

    #: How long its start-up (to the control socket) and one pvctl may take.
    start_timeout_s: float = 15
    pvctl_timeout_s: float = 30
    #: How long :meth:`stop` and :meth:`close` wait for a signalled daemon to undo its pins
    #: and exit.
    stop_grace_s: float = 15

    def __init__(self, tmp_path: Path, config: Path) -> None:
        self.tmp_path = tmp_path
        self.config = config
        self.socket = tmp_path / "pvhost.sock"
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.returncode

    def log(self) -> str:
        path = self.tmp_path / "pvhost.log"
        return path.read_text() if path.exists() else ""

    async def start(self) -> None:
        """Start it and wait for its control socket (a socket left by a kill -9 is removed)."""
        self.socket.unlink(missing_ok=True)
        with open(self.tmp_path / "pvhost.log", "ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "pvhost.cli", "run", "--config", str(self.config),
                stdout=asyncio.subprocess.DEVNULL, stderr=log,
            )  # fmt: skip
        async with asyncio.timeout(self.start_timeout_s):
            while not self.socket.exists():
                assert self.proc.returncode is None, self.log()
                await asyncio.sleep(0.05)

    async def stop(self, sig: int = signal.SIGTERM) -> None:
        """Signal the daemon and wait :attr:`stop_grace_s` for it to exit (TimeoutError)."""
        assert self.proc is not None
        self.proc.send_signal(sig)
        await asyncio.wait_for(self.proc.wait(), self.stop_grace_s)

    async def kill(self) -> None:
        """kill -9, if it still runs: what it placed stays, as after a crash."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()

    async def close(self) -> None:
        """Leave nothing running and nothing placed (a test's cleanup, whatever happened
        before, a failed assertion included): a daemon still running is stopped as operators
        stop it (SIGTERM: it undoes its pins and removes its cgroups), and killed only when it
        does not stop within :attr:`stop_grace_s`. A kill -9 here would leave its cgroups behind."""
        if self.proc is None or self.proc.returncode is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.proc.wait(), self.stop_grace_s)
        except TimeoutError:
            await self.kill()

    async def pvctl(self, *args: str) -> tuple[int, str]:
        """``pvctl --socket … ARGS``: exit status and combined output."""
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "pvhost.ctl", "--socket", str(self.socket), *args,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        out, _ = await asyncio.wait_for(proc.communicate(), self.pvctl_timeout_s)
        return proc.returncode or 0, out.decode()


@asynccontextmanager
async def daemon_and_guest(
    tmp_path: Path,
    config: Path,
    agent: Path,
    *,
    daemon_class: type[Daemon] = Daemon,
    connect_timeout: float = 10,
    generic: bool = False,
    vcpus: int = 3,
    versions: tuple[int, ...] | None = None,
) -> AsyncIterator[tuple[Daemon, FakeGuestChannel]]:
    """The running daemon (a ``daemon_class``) and the guest end of ``agent``, connected;
    both gone after, and whatever the daemon placed undone (:meth:`Daemon.close`).
    ``generic``: the guest plays the generic agent (protocol 4+), else one that tracks;
    ``vcpus``: the online CPUs its Hello reports; ``versions``: those it offers."""
    guest = FakeGuestChannel(agent, vcpus=vcpus, generic=generic, versions=versions)
    await guest.start()
    daemon = daemon_class(tmp_path, config)
    try:
        await daemon.start()
        await guest.connected(timeout=connect_timeout)
        yield daemon, guest
    finally:
        await daemon.close()
        await guest.close()
