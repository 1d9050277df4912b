"""The fault matrix's lab: one image VM, one bystander VM, this checkout's pvhost daemon.

Real parts: the test image's pvagent (started by udev in the guest), QEMU with its
virtio-serial port and QMP, the pvhost daemon (``vmlab.daemon.PvhostDaemon``) on this host's
cgroup v1 cpusets. The bystander is an empty QEMU whose guest side is played by the named
fake guest peer (``vmlab.guestpeer.FakeGuestChannel``): it pins its vCPU 0 and must never
notice what happens to the other VM.

Placement: identity policy on a 2-CPU host. The guest's wish is one thread pinned to vCPU 1
(``taskset -c 1 sleep``) → pCPU 1; the bystander's vCPU 0 → pCPU 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from pvproto import AffinityResult, LoadProgram
from vmlab import VirtualMachine, VMSpec, start
from vmlab.daemon import CHECKOUT_AFFINITY_PROGRAM, PvhostDaemon
from vmlab.errors import DaemonError, GuestCrashed, GuestHung, LauncherError, MonitorError
from vmlab.guestpeer import FakeGuestChannel
from vmlab.images import GuestImage
from vmlab.qemu import AGENT_PORT_ID, AGENT_PORT_NAME

T = TypeVar("T")
log = logging.getLogger(__name__)

VM = "faults"
BYSTANDER = "bystander"
CPUSET = Path("/sys/fs/cgroup/cpuset")
#: pvhost's keepalive in the lab: Ping every 1 s, a peer silent for 4 s is reset.
KEEPALIVE = (1.0, 4.0)
#: The bound the matrix asserts: converged this long after the fault is released (plus the
#: guest's boot where the fault reboots it; that is measured and reported apart).
RECOVER_S = 10.0
#: Where the guest boots again, its userspace being up (the test hook answers) is not yet
#: the agent: udev starts it while the rest of the boot competes for the two TCG vCPUs, and
#: its Python start-up takes 7-12 s there on one 2-CPU host, up to 20 s on a slower one
#: (5-9 s in a running guest). The cells that start a new agent bound extpv's part at
#: RECOVER_S after its Hello, and the whole at RECOVER_S (+ the boot) + this.
AGENT_START_S = 30.0
BOOT_DEADLINE_S = 300.0
#: Boots tried per reboot before the cell fails (a hung or crashed one is reset and retried).
BOOT_ATTEMPTS = 3
PORT = f"/dev/virtio-ports/{AGENT_PORT_NAME}"
#: The guest's wish: one thread pinned to vCPU 1 (taskset execs sleep: one pid).
WORKLOAD = ["taskset", "-c", "1", "sleep", "86400"]


def allowed(tid: int) -> str:
    for line in Path(f"/proc/{tid}/status").read_text().splitlines():
        if line.startswith("Cpus_allowed_list:"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"no Cpus_allowed_list for thread {tid}")


def placements(status: dict[str, Any], vm: str) -> dict[int, int]:
    return {int(v): int(p["pcpu"]) for v, p in status["vms"][vm]["placements"].items()}


class Bystander:
    """An empty QEMU whose guest peer (the named fake) pins vCPU 0, on its own event loop."""

    def __init__(self, runtime: Path) -> None:
        self.vm = start(VMSpec.empty(BYSTANDER, runtime, smp=1))
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.guest = FakeGuestChannel(self.vm.dir / "agent.sock", vcpus=1)
        self.call(self.guest.start())
        self._seq = 0

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    @property
    def sessions(self) -> tuple[int, int]:
        """(connections, host Hellos): both unchanged while nothing reset its session."""
        return self.guest.connections, self.guest.hellos

    def pin(self, timeout: float = 10) -> AffinityResult:
        """Ask for vCPU 0 and return the host's answer."""
        self._seq += 1
        return self.call(self.guest.update(self._seq, [0], timeout), timeout + 5)

    def tid(self) -> int:
        return self.vm.vcpu_threads()[0].tid

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.call(self.guest.close(), 10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self.vm.stop()


class FaultLab:
    """The VMs and the daemon the matrix shares; each cell leaves them converged."""

    def __init__(self, image: GuestImage, runtime: Path, workdir: Path) -> None:
        self.image = image
        self.runtime = runtime
        self.spec = VMSpec(
            name=VM, image=image.path, smp=2, memory_mib=1024, runtime_dir=runtime, test_hook=True
        )
        self.daemon = PvhostDaemon(
            workdir,
            runtime,
            image.signing_key,
            group=f"extpv-faults-{os.getpid()}",
            keepalive=KEEPALIVE,
        )
        self.vm: VirtualMachine | None = None
        self.bystander: Bystander | None = None
        #: Guest pid of the pinned workload while it runs (None: the guest wants nothing).
        self.workload: int | None = None
        self.boots: list[float] = []
        self._loader: subprocess.Popen[bytes] | None = None

    # -- set-up and teardown ------------------------------------------------------------------
    def open(self) -> None:
        self.runtime.mkdir(parents=True, exist_ok=True)
        self.bystander = Bystander(self.runtime)
        self.boot()
        self.daemon.start()
        assert self.bystander is not None
        self.bystander.call(self.bystander.guest.expect(LoadProgram, 60), 70)
        result = self.bystander.pin(30)
        assert result.placements[0].pcpu == 0, result

    def close(self) -> None:
        self._reap_loader()
        for part in (self.vm, self.bystander):
            if part is not None:
                with contextlib.suppress(Exception):
                    part.stop() if isinstance(part, VirtualMachine) else part.close()
        self.daemon.close()

    def boot(self) -> float:
        """Start the image VM (a new QEMU under the same name); the boot's duration."""
        t0 = time.monotonic()
        if self.vm is not None and not self.vm.alive():
            self.vm.stop()  # a QEMU that was killed: its hook connection and directory
        self.vm = start(self.spec, deadline_s=BOOT_DEADLINE_S, retries=2)
        self.workload = None
        took = time.monotonic() - t0
        self.boots.append(took)
        return took

    @property
    def guest_vm(self) -> VirtualMachine:
        assert self.vm is not None
        return self.vm

    # -- the guest ---------------------------------------------------------------------------
    def guest(self, cmd: list[str] | str, timeout_s: float = 60) -> str:
        return self.guest_vm.guest(cmd, timeout_s).check().stdout

    def agent_pid(self) -> int:
        return int(self.guest(["systemctl", "show", "-p", "MainPID", "--value", "pvagent"]))

    def port_opens(self, agent: int) -> int:
        """How many times the agent with guest pid ``agent`` has opened its port (each open
        starts a session with its Hello)."""
        out = self.guest(f"journalctl _PID={agent} -o cat --no-pager")
        return out.count(f"port {AGENT_PORT_NAME} open (")

    def start_workload(self) -> None:
        self.workload = self.guest_vm.guest_background(WORKLOAD)

    def stop_workload(self) -> None:
        if self.workload is not None:
            self.guest(f"kill {self.workload}")  # the shell's kill: no procps in the image
            self.workload = None

    def wish(self) -> dict[int, int]:
        """The placement the guest's current wish comes to under identity policy."""
        return {1: 1} if self.workload is not None else {}

    def reboot(self) -> int:
        """``systemctl reboot`` in the guest; the console mark its next boot begins after."""
        mark = self.guest_vm.console_mark()
        self.guest_vm.guest_background(["systemctl", "reboot"])
        return mark

    def wait_rebooted(self, mark: int) -> float:
        """After ``reboot()``: wait for the next boot's login and test hook; its duration.

        A boot that hangs (the lost TCG timer under host load: GuestHung) or crashes is the
        lab's, not the fault's: QMP ``system_reset`` (the same QEMU, so still a guest reboot)
        and wait again, at most twice, as ``vmlab.start`` retries a first boot.
        """
        t0 = time.monotonic()
        for attempt in range(1, BOOT_ATTEMPTS + 1):
            try:
                self.guest_vm.wait_booted(BOOT_DEADLINE_S, console_from=mark)
                break
            except (GuestHung, GuestCrashed) as err:
                if attempt == BOOT_ATTEMPTS:
                    raise
                log.warning("the reboot's boot failed (%s); system_reset", err)
                mark = self.guest_vm.console_mark()
                self.guest_vm.qmp("system_reset")
        self.workload = None
        took = time.monotonic() - t0
        self.boots.append(took)
        return took

    # -- pvhost ------------------------------------------------------------------------------
    @property
    def pvhost_pid(self) -> int:
        assert self.daemon.proc is not None
        return self.daemon.proc.pid

    def freeze_pvhost(self) -> None:
        os.kill(self.pvhost_pid, signal.SIGSTOP)

    def thaw_pvhost(self) -> None:
        os.kill(self.pvhost_pid, signal.SIGCONT)

    def load_program_async(self) -> None:
        """``pvctl program load`` of the affinity object, left waiting for the guest's ack."""
        self._loader = subprocess.Popen(
            [sys.executable, "-m", "pvhost.ctl", "--socket", str(self.daemon.socket),
             "program", "load", VM, str(CHECKOUT_AFFINITY_PROGRAM)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=self.daemon.cwd,
        )  # fmt: skip

    def _reap_loader(self) -> None:
        if self._loader is not None:
            with contextlib.suppress(ProcessLookupError):
                self._loader.kill()
            self._loader.wait(10)
            self._loader = None

    # -- the port ----------------------------------------------------------------------------
    def replug_port(self) -> None:
        """``device_del`` the agent's port, wait until QEMU dropped it, ``device_add`` it."""
        vm = self.guest_vm
        vm.qmp("device_del", {"id": AGENT_PORT_ID})
        end = time.monotonic() + 30
        while any(
            c.get("name") == AGENT_PORT_ID
            for c in vm.qmp("qom-list", {"path": "/machine/peripheral"})  # type: ignore[union-attr]
        ):
            assert time.monotonic() < end, "QEMU did not remove the agent's port"
            time.sleep(0.1)
        # QEMU lets go of the chardev a little after the device left the tree (RCU).
        while True:
            try:
                vm.qmp(
                    "device_add",
                    {"driver": "virtserialport", "bus": "vser0.0", "chardev": "pv0",
                     "name": AGENT_PORT_NAME, "id": AGENT_PORT_ID},
                )  # fmt: skip
            except MonitorError as err:
                if "already in use" not in str(err) or time.monotonic() > end:
                    raise
                time.sleep(0.1)
            else:
                return

    # -- what must hold ----------------------------------------------------------------------
    def converged(self, status: dict[str, Any]) -> bool:
        vm = status["vms"][VM]
        return (
            vm["programs"] == {"affinity": "loaded"}
            and vm["session"] == "ready"
            and placements(status, VM) == self.wish()
            and not status["orphans"]
        )

    def wait_converged(self, what: str, deadline_s: float) -> tuple[float, dict[str, Any]]:
        t0 = time.monotonic()
        try:
            st = self.daemon.wait_status(what, self.converged, deadline_s)
        except DaemonError as err:
            # The host's view is in the error; the guest's agent tells the other half.
            try:
                journal = self.guest("journalctl -u pvagent -n 40 -o short-monotonic --no-pager")
            except Exception as why:  # the guest may be what broke
                journal = f"(no guest journal: {why})"
            raise DaemonError(f"{err}\nguest agent journal:\n{journal}") from err
        return time.monotonic() - t0, st

    def check_host(self, status: dict[str, Any]) -> None:
        """Kernel state matches pvhost's: pinned threads, and no cgroup of a VM that is gone."""
        tids = {i: v.tid for i, v in self.guest_vm.vcpu_threads().items()}
        for vcpu, pcpu in self.wish().items():
            assert allowed(tids[vcpu]) == str(pcpu), f"vCPU {vcpu} not on pCPU {pcpu}"
        live = {VM: _threads(self.guest_vm.pid)}
        if self.bystander is not None:
            live[BYSTANDER] = _threads(self.bystander.vm.pid)
        base = CPUSET / self.daemon.group
        for cg in sorted(base.glob("vm-*")):
            name = cg.name.removeprefix("vm-")
            assert name in live, f"{cg} is left for a VM that is gone"
            for tasks in cg.rglob("tasks"):
                stale = {int(t) for t in tasks.read_text().split()} - live[name]
                assert not stale, f"{tasks} holds threads of a dead QEMU: {stale}"
        assert set(status["vms"]) == {VM, BYSTANDER}, status["vms"].keys()

    def check_bystander(self, sessions: tuple[int, int], pvhost_restarted: bool) -> None:
        """The bystander is served; unless pvhost itself restarted, its session never reset."""
        assert self.bystander is not None
        if not pvhost_restarted:
            assert self.bystander.sessions == sessions, (
                f"the bystander's session reset: {sessions} → {self.bystander.sessions}"
            )
        result = self.bystander.pin(RECOVER_S)
        assert result.placements[0].pcpu == 0, result
        assert allowed(self.bystander.tid()) == "0"

    def _baseline(self, *, workload: bool) -> None:
        if workload and self.workload is None:
            # Pinned once the agent runs its program (a thread pinned earlier is found too,
            # from /proc, but only at the agent's next fresh start).
            self.daemon.wait_status(
                "the program loaded",
                lambda s: s["vms"][VM]["programs"] == {"affinity": "loaded"},
                60,
            )
            self.start_workload()
        elif not workload and self.workload is not None:
            self.stop_workload()
        self.wait_converged("the baseline before the cell", 60)

    def ensure_baseline(self, *, workload: bool) -> None:
        """Converged, with or without the pinned workload, before a cell's phase starts.

        A cell before that failed may have left the lab broken (that cell has failed
        already): it is healed here, so one failure does not fail every later cell.
        """
        self._reap_loader()
        try:
            self._baseline(workload=workload)
        except LauncherError as err:  # DaemonError included
            log.warning("healing the lab: %s", str(err)[:300])
            self.heal()
            self._baseline(workload=workload)

    def heal(self) -> None:
        """A new QEMU where the old one is gone or its guest no longer answers; else the
        agent's port plugged in again and the agent restarted."""
        vm = self.guest_vm
        if not vm.alive():
            log.warning(
                "QEMU is gone: a new QEMU\nqemu.log: %s\nconsole:\n%s",
                vm.qemu_log()[-1000:],
                vm.console_tail(15),
            )
            self.boot()
            return
        try:
            vm.wait_guest_ready(30)
        except LauncherError as err:
            log.warning("the guest does not answer (%s); a new QEMU", err)
            vm.stop()
            self.boot()
            return
        ports = vm.qmp("qom-list", {"path": "/machine/peripheral"})
        if not any(c.get("name") == AGENT_PORT_ID for c in ports):  # type: ignore[union-attr]
            vm.qmp(
                "device_add",
                {"driver": "virtserialport", "bus": "vser0.0", "chardev": "pv0",
                 "name": AGENT_PORT_NAME, "id": AGENT_PORT_ID},
            )  # fmt: skip
        self.guest(
            "kill -CONT $(systemctl show -p MainPID --value pvagent) 2>/dev/null; "
            "systemctl reset-failed pvagent; systemctl restart pvagent"
        )


def _threads(pid: int) -> set[int]:
    return {int(t.name) for t in Path(f"/proc/{pid}/task").iterdir()}


def poll(what: str, pred: Callable[[], bool], deadline_s: float) -> float:
    """Wait for ``pred``; seconds waited."""
    t0 = time.monotonic()
    while not pred():
        assert time.monotonic() - t0 < deadline_s, f"no {what} within {deadline_s:.0f} s"
        time.sleep(0.1)
    return time.monotonic() - t0
