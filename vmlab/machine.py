"""VMs as processes: start one (retrying a boot that crashed), find it again, wait on it, end it.

A boot that oopses or panics (e.g. QEMU 7.2's multi-threaded TCG race, ``Oops: int3`` in
``sched_clock_cpu``) is detected on the console and retried a bounded number of times. A VM
started by one process can be listed, attached to and stopped by another: everything needed is
in its runtime directory (``vm.json``, ``qemu.pid``, the sockets).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from extpv.autogroup import set_autogroup_nice
from extpv.names import is_vm_name
from extpv.vcpus import VcpuThread, parse_query_cpus_fast
from vmlab.bootsector import write_boot_disk
from vmlab.errors import (
    BootError,
    GuestCommandError,
    GuestCrashed,
    GuestHung,
    LauncherError,
    MonitorError,
    QemuAborted,
    VMExists,
    VMNotFound,
    WaitTimeout,
)
from vmlab.monitor import qmp_command
from vmlab.priority import renice_all_threads
from vmlab.qemu import (
    BOOT_DISK,
    DEFAULT_RUNTIME_DIR,
    VMSpec,
    accel_for,
    check_image,
    qemu_argv,
)
from vmlab.testhook import GuestResult, TestHook

__all__ = [
    "CRASH_PATTERN",
    "READY_PATTERN",
    "VirtualMachine",
    "attach",
    "list_vms",
    "start",
    "stop",
]

log = logging.getLogger(__name__)

#: Console lines that mean the guest kernel is broken: the boot is not trustworthy.
CRASH_PATTERN = re.compile(
    r"(Oops: |Kernel panic - not syncing|BUG: kernel NULL pointer|general protection fault)"
)
#: The guest kernel's report that a CPU's timer never fired. Seen once in CI (2026-12-01) on a
#: 4-vCPU TCG boot that then hung for its whole 300 s deadline (CPU 1 had taken 7 timer
#: softirqs since boot): a lost timer under TCG does not come back, a new boot does.
HANG_PATTERN = re.compile(r"rcu: \S+ kthread timer wakeup didn't happen")
#: How long a boot may go on after HANG_PATTERN (a host starved for a moment also prints it,
#: and then finishes booting) before it counts as hung and is retried: twice a whole boot here
#: (30-45 s), far less than the 300 s the hung boot of CI waited out.
HANG_GRACE_S = 90.0
#: How often a boot's wait looks at the console for HANG_PATTERN.
_HANG_POLL_S = 10.0
#: The serial getty's automatic login (images/rootfs/autologin.conf), or any guest's login
#: prompt (a stock image has no autologin): userspace is up.
#: QEMU's own failed assertion in its log (glibc's assert message): an emulator bug.
QEMU_ASSERTION = re.compile(r"Assertion `.*' failed")
READY_PATTERN = r"login: root \(automatic login\)|(?m:^[\w.-]+ login: )"


def _alive(pid: int, name: str) -> bool:
    """True when ``pid`` is a live QEMU started for VM ``name`` (guards against pid reuse)."""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    if stat.rsplit(")", 1)[1].split()[0] == "Z":
        return False
    return f"{name},debug-threads=on".encode() in cmd


class VirtualMachine:
    """A running (or ended) VM: its pid, sockets, console, and ways to wait on and end it."""

    def __init__(
        self, spec: VMSpec, pid: int, accel: str, proc: subprocess.Popen[bytes] | None = None
    ) -> None:
        self.spec = spec
        self.name = spec.name
        self.dir = spec.vm_dir
        self.pid = pid
        self.accel = accel
        self._proc = proc
        self._console_pos = 0
        self._hook: TestHook | None = None

    # Paths pvhost and users need.
    @property
    def qmp_socket(self) -> Path:
        return self.dir / "qmp.sock"

    @property
    def agent_socket(self) -> Path:
        return self.dir / "agent.sock"

    @property
    def console_log(self) -> Path:
        return self.dir / "console.log"

    def __repr__(self) -> str:
        return f"VirtualMachine({self.name!r}, pid={self.pid}, accel={self.accel!r})"

    def alive(self) -> bool:
        if self._proc is not None:
            return self._proc.poll() is None
        return _alive(self.pid, self.name)

    # The lab's own monitor.
    def qmp(
        self, command: str, arguments: Mapping[str, object] | None = None, timeout_s: float = 10.0
    ) -> object:
        """Run a QMP command on ``launcher-qmp.sock`` (pvhost keeps ``qmp.sock``)."""
        return qmp_command(self.dir / "launcher-qmp.sock", command, arguments, timeout_s=timeout_s)

    def vcpu_threads(self) -> dict[int, VcpuThread]:
        """vCPU index → its host thread, as QEMU reports it (``query-cpus-fast``)."""
        reply = self.qmp("query-cpus-fast")
        try:
            return parse_query_cpus_fast(reply)
        except ValueError as err:
            raise MonitorError(f"{self.name}: {err}") from err

    def hot_plug_vcpu(self) -> VcpuThread:
        """QMP ``device_add`` of a vCPU into the lowest free slot (room from ``maxcpus``); the
        new vCPU and its host thread. The guest sees a CPU appear as on a real host: it
        onlines it when its kernel (or its firmware code) acknowledges the hot-plug."""
        slots: Any = self.qmp("query-hotpluggable-cpus")
        prop_order = ("socket-id", "die-id", "cluster-id", "core-id", "thread-id")
        free = sorted(
            (s for s in slots if "qom-path" not in s),
            key=lambda s: tuple(s["props"].get(k, 0) for k in prop_order),
        )
        if not free:
            raise MonitorError(
                f"{self.name}: no free vCPU slot to hot-plug (start the VM with maxcpus > smp)"
            )
        before = self.vcpu_threads()
        slot = free[0]
        self.qmp("device_add", {"driver": slot["type"], "id": f"cpu{len(before)}", **slot["props"]})
        (added,) = (v for i, v in self.vcpu_threads().items() if i not in before)
        return added

    # The console.
    def console_text(self) -> str:
        try:
            return self.console_log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def console_tail(self, lines: int = 25) -> str:
        return "\n".join(self.console_text().splitlines()[-lines:])

    def console_mark(self) -> int:
        """Where the console's next output will begin: what ``wait_booted`` takes as
        ``console_from`` for a boot that starts after this moment (a reboot)."""
        return len(self.console_text())

    def check_crash(self, since: int = 0) -> None:
        """Raise GuestCrashed when the console shows an oops or panic (from offset ``since``)."""
        text = self.console_text()
        m = CRASH_PATTERN.search(text, since)
        if m:
            start = text.rfind("\n", 0, max(0, m.start() - 400)) + 1
            lines = text[start : m.end() + 1500].splitlines()
            raise GuestCrashed(f"guest {self.name} crashed: {m.group(0).strip()}", lines)

    def wait_for(self, pattern: str, deadline_s: float, what: str | None = None) -> re.Match[str]:
        """Wait until the console prints ``pattern`` (new output since the last match).

        Raises GuestCrashed on an oops/panic in that new output, BootError if QEMU exits,
        WaitTimeout at the deadline.
        """
        rx = re.compile(pattern)
        what = what or f"console pattern {pattern!r}"
        end = time.monotonic() + deadline_s
        while True:
            text = self.console_text()
            m = rx.search(text, self._console_pos)
            if m:
                self._console_pos = m.end()
                return m
            self.check_crash(since=self._console_pos)
            if not self.alive():
                raise self.exited(f"while waiting for {what}")
            if time.monotonic() > end:
                raise WaitTimeout(
                    f"{self.name}: no {what} within {deadline_s:.0f} s; console tail:\n"
                    f"{self.console_tail()}"
                )
            time.sleep(0.1)

    def exited(self, when: str) -> BootError:
        """The error for a QEMU found gone ``when``: QemuAborted where qemu.log shows one of
        QEMU's own assertions (``start`` retries those), else BootError; both carry the log."""
        qlog = self.qemu_log()
        message = (
            f"QEMU for {self.name} exited {when}; qemu.log: {qlog[-500:]}\n"
            f"console:\n{self.console_tail()}"
        )
        if QEMU_ASSERTION.search(qlog):
            tail = [*qlog.splitlines()[-5:], *self.console_tail(15).splitlines()]
            return QemuAborted(message, tail)
        return BootError(message)

    def qemu_log(self) -> str:
        """What QEMU printed (its stdout and stderr): why it exited, where it did."""
        try:
            return (self.dir / "qemu.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # Test hook (test images only).
    def guest(
        self, argv: Sequence[str] | str, timeout_s: float = 60.0, input_text: str = ""
    ) -> GuestResult:
        """Run a command in the guest (a list: argv; a string: ``sh -c``); needs ``test_hook``."""
        return self._test_hook().run(argv, timeout_s, input_text)

    def mount_virtfs(self, tag: str, where: str, *, timeout_s: float = 60.0) -> None:
        """Mount the host directory shared as ``tag`` (``VMSpec.virtfs``) read-only at ``where``.

        Loads the 9p transport first: right after boot udev may not have loaded it yet, and
        the tag only exists once the virtio device is bound (a race seen under TCG).
        """
        self.guest(
            f"modprobe -a 9pnet_virtio 9p && udevadm settle --timeout={int(timeout_s)} && "
            f"mkdir -p {shlex.quote(where)} && (mountpoint -q {shlex.quote(where)} || "
            f"mount -t 9p -o trans=virtio,version=9p2000.L,ro {shlex.quote(tag)} "
            f"{shlex.quote(where)})",
            timeout_s=timeout_s,
        ).check()

    def guest_background(
        self, argv: Sequence[str], log_path: str = "/dev/null", timeout_s: float = 30.0
    ) -> int:
        """Start a command in the guest without waiting for it; returns its guest pid."""
        return self._test_hook().background(argv, log_path, timeout_s)

    def clock_offset(self, samples: int = 30) -> tuple[float, float]:
        """Guest CLOCK_REALTIME minus host's, and its error bound (half the best round trip).

        NTP-style over the test hook: of ``samples`` probes the one with the shortest round
        trip wins. Lets host-side timings be compared with guest timestamps.
        """
        return self._test_hook().clock_offset(samples)

    def wait_guest_ready(self, deadline_s: float = 180.0, *, console_from: int = 0) -> None:
        """Wait until the guest's test hook answers (userspace up, udev ran); an oops or panic
        on the console after ``console_from`` is GuestCrashed."""
        hook = self._test_hook()
        end = time.monotonic() + deadline_s
        while True:
            self.check_crash(since=console_from)
            if not self.alive():
                raise self.exited("before the guest test hook answered")
            try:
                hook.ping(3.0)
            except (WaitTimeout, GuestCommandError):
                # Not up yet: the guest reads our stale requests later and answers them; ids differ.
                if time.monotonic() > end:
                    raise WaitTimeout(
                        f"{self.name}: guest test hook did not answer within {deadline_s:.0f} s; "
                        f"console tail:\n{self.console_tail()}"
                    ) from None
                time.sleep(0.5)
            else:
                return

    def wait_booted(self, deadline_s: float, *, console_from: int = 0) -> None:
        """Wait until the boot whose console output begins at ``console_from`` is up: its
        login on the console and, on a VM with a test hook, the hook answering.

        ``console_from`` is ``console_mark()`` taken before a reboot: the last boot's login
        and reports are not this one's. Raises GuestCrashed on an oops or panic, GuestHung
        when the kernel reported a lost timer (HANG_PATTERN) and the guest was still not up
        HANG_GRACE_S later (rather than wait out the deadline on a boot that never will),
        BootError if QEMU exits, WaitTimeout at the deadline.
        """
        self._console_pos = max(self._console_pos, console_from)
        end = time.monotonic() + deadline_s
        hang_seen: float | None = None
        login = False
        while True:
            slice_s = max(0.0, min(_HANG_POLL_S, end - time.monotonic()))
            try:
                if not login:
                    self.wait_for(READY_PATTERN, slice_s, "the console login")
                    login = True
                if self.spec.test_hook:
                    self.wait_guest_ready(slice_s, console_from=console_from)
            except WaitTimeout as err:
                now = time.monotonic()
                if now >= end:
                    raise WaitTimeout(
                        f"{self.name}: userspace not up within {deadline_s:.0f} s; console "
                        f"tail:\n{self.console_tail()}"
                    ) from err
                text = self.console_text()
                m = HANG_PATTERN.search(text, console_from)
                if m is None:
                    continue
                hang_seen = now if hang_seen is None else hang_seen
                if now - hang_seen >= HANG_GRACE_S:
                    first = text.rfind("\n", 0, max(0, m.start() - 400)) + 1
                    raise GuestHung(
                        f"guest {self.name} hung while booting: {m.group(0)!r}, and not up "
                        f"{HANG_GRACE_S:.0f} s later",
                        text[first : m.end() + 1500].splitlines(),
                    ) from err
            else:
                return

    def _test_hook(self) -> TestHook:
        if not self.spec.test_hook:
            raise GuestCommandError(f"{self.name} was started without test_hook=True")
        if self._hook is None:
            self._hook = TestHook(self.dir / "test.sock", self.name)
        return self._hook

    def _wait_vcpus(self, deadline_s: float) -> None:
        """Wait until the monitor answers with every vCPU (an empty machine's readiness)."""
        end = time.monotonic() + deadline_s
        while True:
            if not self.alive():
                raise BootError(f"QEMU for {self.name} exited: {self.qemu_log()[-500:]}")
            try:
                if len(self.vcpu_threads()) >= self.spec.smp:
                    return
            except MonitorError:
                pass
            if time.monotonic() > end:
                raise WaitTimeout(f"{self.name}: no {self.spec.smp} vCPUs within {deadline_s} s")
            time.sleep(0.05)

    # Ending it.
    def stop(self, deadline_s: float = 30.0) -> None:
        """End the VM: QMP ``quit``, then SIGTERM, then SIGKILL; remove its runtime directory."""
        if self._hook is not None:
            self._hook.close()
            self._hook = None
        if self.alive():
            with contextlib.suppress(LauncherError):
                self.qmp("quit", timeout_s=min(10.0, deadline_s / 2))
            end = time.monotonic() + deadline_s
            for sig in (None, signal.SIGTERM, signal.SIGKILL):
                if sig is not None and self.alive():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(self.pid, sig)
                while self.alive() and time.monotonic() < end:
                    time.sleep(0.05)
                if not self.alive():
                    break
                end = time.monotonic() + 5.0
            if self.alive():
                raise LauncherError(f"QEMU pid {self.pid} of {self.name} would not die")
        if self._proc is not None:
            self._proc.wait(timeout=5)
        shutil.rmtree(self.dir, ignore_errors=True)

    def kill(self) -> None:
        """SIGKILL QEMU, as a crash would: its runtime directory and sockets stay behind."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        if self._proc is not None:
            self._proc.wait(timeout=10)
        else:
            end = time.monotonic() + 10
            while self.alive() and time.monotonic() < end:
                time.sleep(0.05)

    def wait_exit(self, deadline_s: float) -> None:
        """Wait for QEMU to exit by itself (e.g. the guest powered off)."""
        end = time.monotonic() + deadline_s
        while self.alive():
            if time.monotonic() > end:
                raise WaitTimeout(
                    f"{self.name}: QEMU still running {deadline_s:.0f} s after shutdown"
                )
            time.sleep(0.1)

    def __enter__(self) -> VirtualMachine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- start / stop / list -----------------------------------------------------------------------


def _spawn(spec: VMSpec) -> VirtualMachine:
    if spec.image is not None:
        check_image(spec.image)
    if shutil.which(spec.qemu) is None:
        raise BootError(f"{spec.qemu} is not installed (apt-get install qemu-system-x86)")
    d = spec.vm_dir
    if d.exists():
        old = _read_pid(d)
        if old is not None and _alive(old, spec.name):
            raise VMExists(f"VM {spec.name} is already running (pid {old}); stop it first")
        shutil.rmtree(d)  # leftovers of a VM that died
    d.mkdir(parents=True, mode=0o700)
    if spec.boot_code is not None:
        write_boot_disk(spec.boot_code, d / BOOT_DISK)
    accel, accel_args = accel_for(spec)
    argv = qemu_argv(spec, accel_args)
    info = {
        "name": spec.name,
        "image": str(spec.image.resolve()) if spec.image is not None else None,
        "smp": spec.smp,
        "memory_mib": spec.memory_mib,
        "accel": accel,
        "test_hook": spec.test_hook,
        "ssh_port": spec.ssh_port,
        "nice": spec.nice,
        "argv": argv,
    }
    (d / "vm.json").write_text(json.dumps(info, indent=2) + "\n")
    with open(d / "qemu.log", "wb") as qlog:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=qlog, stderr=qlog, start_new_session=True
        )
    vm = VirtualMachine(spec, proc.pid, accel, proc)
    if spec.nice is not None:
        _set_nice(vm, spec.nice)
    end = time.monotonic() + 15.0
    while not (d / "qemu.pid").exists() or not (d / "launcher-qmp.sock").exists():
        if proc.poll() is not None:
            msg = vm.qemu_log().strip()
            shutil.rmtree(d, ignore_errors=True)
            raise BootError(f"QEMU for {spec.name} exited at once (rc {proc.returncode}): {msg}")
        if time.monotonic() > end:
            vm.stop()
            raise BootError(f"QEMU for {spec.name} created no sockets within 15 s")
        time.sleep(0.05)
    log.info("started %s: pid %d, %s, -smp %d", spec.name, proc.pid, accel, spec.smp)
    return vm


def _set_nice(vm: VirtualMachine, nice: int) -> None:
    """QEMU's threads at ``nice``, or the VM stopped and a clear error (never a VM left at
    another priority than asked)."""
    try:
        renice_all_threads(vm.pid, nice)
        # QEMU leads its own session: where autogroup is on, that group's value is what
        # weighs it against other sessions' load (vmlab.priority).
        grouped = set_autogroup_nice(vm.pid, nice)
    except (OSError, RuntimeError) as err:
        vm.stop()
        hint = " (below 0 needs root or CAP_SYS_NICE)" if isinstance(err, PermissionError) else ""
        raise BootError(f"cannot set QEMU's nice to {nice} for {vm.name}: {err}{hint}") from err
    also = ", and its autogroup" if grouped else ""
    log.info("%s: every QEMU thread at nice %d%s", vm.name, nice, also)


def start(
    spec: VMSpec, *, wait: bool = True, deadline_s: float = 240.0, retries: int = 2
) -> VirtualMachine:
    """Start a VM; with ``wait``, until userspace is up (test hook or console login).

    An empty machine (``spec.image is None``) is ready once its monitor lists every vCPU.
    A boot whose kernel oopses or panics, or hangs (GuestHung), or whose QEMU fails one of its
    own assertions (QemuAborted), is stopped and retried up to ``retries`` times.
    """
    attempts = retries + 1
    for attempt in range(1, attempts + 1):
        vm = _spawn(spec)
        if not wait:
            return vm
        try:
            if spec.image is None:
                vm._wait_vcpus(min(deadline_s, 20.0))
            else:
                vm.wait_booted(deadline_s)
            vm.check_crash()
        except (GuestCrashed, GuestHung, QemuAborted) as err:
            tail = "\n".join(err.lines[-15:])
            log.warning("boot %d/%d of %s failed: %s\n%s", attempt, attempts, spec.name, err, tail)
            keep = spec.vm_dir.with_name(f".{spec.name}.failed-boot-console.log")
            with contextlib.suppress(OSError):
                shutil.copy(vm.console_log, keep)
            vm.stop()
            if attempt == attempts:
                raise type(err)(
                    f"{err} (on all {attempts} boots; console kept in {keep})", err.lines
                ) from err
            continue
        except BaseException:
            vm.stop()
            raise
        return vm
    raise AssertionError("unreachable")


def _read_pid(d: Path) -> int | None:
    try:
        return int((d / "qemu.pid").read_text().strip())
    except (OSError, ValueError):
        return None


def attach(name: str, runtime_dir: Path = DEFAULT_RUNTIME_DIR) -> VirtualMachine:
    """The VM ``name`` as its runtime directory describes it (started by any process)."""
    d = runtime_dir / name
    try:
        info = json.loads((d / "vm.json").read_text())
    except (OSError, ValueError) as err:
        raise VMNotFound(f"no VM named {name} in {runtime_dir}") from err
    pid = _read_pid(d)
    spec = VMSpec(
        name=name,
        image=Path(info["image"]) if info.get("image") else None,
        smp=int(info["smp"]),
        memory_mib=int(info["memory_mib"]),
        runtime_dir=runtime_dir,
        test_hook=bool(info.get("test_hook")),
        nice=info.get("nice"),
    )
    return VirtualMachine(spec, pid if pid is not None else -1, str(info.get("accel", "?")))


def stop(name: str, runtime_dir: Path = DEFAULT_RUNTIME_DIR, deadline_s: float = 30.0) -> None:
    """Stop the VM ``name`` started by any process."""
    attach(name, runtime_dir).stop(deadline_s)


def list_vms(runtime_dir: Path = DEFAULT_RUNTIME_DIR) -> list[dict[str, Any]]:
    """The VMs under ``runtime_dir``: name, pid, alive, smp, accel, nice, image."""
    out = []
    if runtime_dir.is_dir():
        for d in sorted(runtime_dir.iterdir()):
            # What pvhost would not pick up is no VM (e.g. ``.NAME.failed-boot-console.log``).
            if not d.is_dir() or not is_vm_name(d.name):
                continue
            try:
                vm = attach(d.name, runtime_dir)
            except VMNotFound:
                continue
            out.append(
                {
                    "name": vm.name,
                    "pid": vm.pid,
                    "alive": vm.alive(),
                    "smp": vm.spec.smp,
                    "accel": vm.accel,
                    "nice": vm.spec.nice,
                    "image": str(vm.spec.image) if vm.spec.image is not None else None,
                    "dir": str(d),
                }
            )
    return out
