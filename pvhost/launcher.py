"""QEMU launcher for extpv guests: boot an image wired to pvhost, and end it cleanly.

A VM named ``NAME`` lives in ``<runtime_dir>/NAME/`` (default ``/run/extpv/vms/NAME/``), which
is where pvhost discovers it (docs/interfaces.md):

``qmp.sock``            QMP for pvhost (QEMU serves one client per monitor)
``launcher-qmp.sock``   the launcher's own QMP monitor (``quit``)
``agent.sock``          virtio-serial port ``org.extpv.agent.0`` (QEMU serves, pvhost connects)
``console.sock``        the serial console (interactive: ``pvctl vm console NAME``)
``console.log``         everything the serial console printed, from the first kernel line
``qemu.pid``, ``vm.json``, ``qemu.log``   QEMU's pid, how it was started, its own stderr
``test.sock``           only with ``test_hook=True``: port ``org.extpv.test.0`` served in test
                        images by the guest's command hook (see images/rootfs/extpv-testhook)

Acceleration: KVM only when it really runs a guest here (probed by executing a few real-mode
instructions, never judged by ``/dev/kvm`` existing), else multi-threaded TCG with ``-cpu max``.
A boot that oopses or panics (e.g. QEMU 7.2's multi-threaded TCG race, ``Oops: int3`` in
``sched_clock_cpu``) is detected on the console and retried a bounded number of times.

Errors form one tree::

    LauncherError
     ├── ImageError        the image directory lacks a file, or the name is unusable
     ├── VMExists          a live VM already has this name
     ├── VMNotFound        no VM with this name
     ├── BootError         QEMU would not start, or the guest never became ready
     │    └── GuestCrashed the guest kernel oopsed or panicked (console lines attached)
     ├── WaitTimeout       a wait passed its deadline (says what it waited for)
     └── GuestCommandError a test-hook command could not be run in the guest
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import re
import select
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "AGENT_PORT_NAME",
    "DEFAULT_RUNTIME_DIR",
    "TEST_PORT_NAME",
    "BootError",
    "GuestCommandError",
    "GuestCrashed",
    "GuestResult",
    "ImageError",
    "LauncherError",
    "VMExists",
    "VMNotFound",
    "VMSpec",
    "VirtualMachine",
    "WaitTimeout",
    "list_vms",
    "main",
    "probe_kvm",
    "qemu_argv",
    "register_cli",
    "start",
    "stop",
]

log = logging.getLogger(__name__)

DEFAULT_RUNTIME_DIR = Path("/run/extpv/vms")
AGENT_PORT_NAME = "org.extpv.agent.0"
TEST_PORT_NAME = "org.extpv.test.0"
QEMU = "qemu-system-x86_64"
KERNEL_CMDLINE = "root=/dev/vda rw console=ttyS0 panic=-1"

#: Console lines that mean the guest kernel is broken: the boot is not trustworthy.
CRASH_PATTERN = re.compile(
    r"(Oops: |Kernel panic - not syncing|BUG: kernel NULL pointer|general protection fault)"
)
#: The serial getty's automatic login (images/rootfs/autologin.conf): userspace is up.
READY_PATTERN = r"login: root \(automatic login\)|extpv-guest login:"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class LauncherError(Exception):
    """Root of the launcher's errors."""


class ImageError(LauncherError):
    """The image directory or VM name cannot be used."""


class VMExists(LauncherError):
    """A live VM already has this name."""


class VMNotFound(LauncherError):
    """No VM with this name."""


class BootError(LauncherError):
    """QEMU did not start, or the guest never became ready."""


class GuestCrashed(BootError):
    """The guest kernel oopsed or panicked; ``lines`` holds the console lines around it."""

    def __init__(self, message: str, lines: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.lines = list(lines)


class WaitTimeout(LauncherError):
    """A wait passed its deadline."""


class GuestCommandError(LauncherError):
    """A command could not be run in the guest through the test hook."""


@dataclasses.dataclass(frozen=True)
class VMSpec:
    """How to start one VM."""

    name: str
    image: Path
    smp: int = 2
    memory_mib: int = 1024
    runtime_dir: Path = DEFAULT_RUNTIME_DIR
    #: ``(host_path, mount_tag)`` shared with the guest over 9p.
    virtfs: tuple[tuple[Path, str], ...] = ()
    #: Serve the guest's test hook on ``test.sock`` (test images only).
    test_hook: bool = False
    #: ``auto`` probes KVM and falls back to TCG.
    accel: str = "auto"
    extra_cmdline: str = ""
    qemu: str = QEMU

    @property
    def vm_dir(self) -> Path:
        return self.runtime_dir / self.name


@dataclasses.dataclass(frozen=True)
class GuestResult:
    """What a guest command did."""

    argv: list[str]
    returncode: int
    stdout: str
    stderr: str

    def check(self) -> GuestResult:
        if self.returncode != 0:
            err = self.stderr.strip()[-2000:]
            raise GuestCommandError(f"guest command {self.argv!r} exited {self.returncode}: {err}")
        return self


# -- acceleration ------------------------------------------------------------------------------


#: A 64 KiB BIOS whose reset vector writes "K" to COM1 and halts: real guest code, no disk.
def _probe_bios() -> bytes:
    code = bytes(
        [0xBA, 0xF8, 0x03, 0xB0, 0x4B, 0xEE, 0xF4, 0xEB, 0xFD]
    )  # mov dx,3f8; mov al,'K'; out; hlt
    bios = bytearray(b"\xf4" * 65536)
    bios[0xFFF0 : 0xFFF0 + len(code)] = code
    return bytes(bios)


@functools.cache
def probe_kvm(qemu: str = QEMU, deadline_s: float = 20.0) -> str | None:
    """Why KVM cannot run a guest here, or None when it can (cached per process).

    ``/dev/kvm`` may exist and still refuse stock guests (e.g. kvm-pvm), so this runs a few
    real instructions under KVM and looks for their output on the serial port.
    """
    if os.environ.get("EXTPV_ACCEL") == "tcg":
        return "EXTPV_ACCEL=tcg"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "/dev/kvm is absent or not accessible"
    with tempfile.TemporaryDirectory(prefix="extpv-kvm-probe.") as tmp:
        bios, out = Path(tmp, "bios.bin"), Path(tmp, "serial.out")
        bios.write_bytes(_probe_bios())
        argv = [
            qemu,
            "-accel",
            "kvm",
            "-cpu",
            "host",
            "-machine",
            "pc",
            "-m",
            "16",
            "-nodefaults",
            "-display",
            "none",
            "-no-user-config",
            "-bios",
            str(bios),
            "-serial",
            f"file:{out}",
        ]
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        end = time.monotonic() + deadline_s
        try:
            while time.monotonic() < end and proc.poll() is None:
                if out.exists() and b"K" in out.read_bytes():
                    return None
                time.sleep(0.05)
            if proc.poll() is not None:
                msg = (proc.stdout.read() if proc.stdout else b"").decode(errors="replace")
                return (
                    f"KVM could not run a guest: {msg.strip()[-300:] or f'exit {proc.returncode}'}"
                )
            return f"KVM ran no guest code within {deadline_s:.0f} s"
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            if proc.stdout:
                proc.stdout.close()


def _accel_args(spec: VMSpec) -> tuple[str, list[str]]:
    accel = os.environ.get("EXTPV_ACCEL", spec.accel)
    if accel == "auto":
        why = probe_kvm(spec.qemu)
        if why is not None:
            log.info("using TCG: %s", why)
        accel = "tcg" if why else "kvm"
    if accel == "kvm":
        return accel, ["-accel", "kvm", "-cpu", "host"]
    if accel == "tcg":
        return accel, ["-accel", "tcg,thread=multi", "-cpu", "max"]
    raise LauncherError(f"unknown accelerator {accel!r} (use auto, kvm or tcg)")


# -- command line ------------------------------------------------------------------------------


def _check_image(image: Path) -> None:
    missing = [f for f in ("rootfs.img", "vmlinuz", "initrd.img") if not (image / f).is_file()]
    if missing:
        raise ImageError(
            f"image directory {image} lacks {', '.join(missing)}; "
            "build one with: sudo images/build-image --out images/out"
        )


def qemu_argv(spec: VMSpec, accel_args: Sequence[str] | None = None) -> list[str]:
    """The QEMU command line for ``spec`` (the README shows it for users, libvirt included)."""
    d, img = spec.vm_dir, spec.image.resolve()
    if accel_args is None:
        accel_args = _accel_args(spec)[1]
    cmdline = KERNEL_CMDLINE + (" extpv.testhook=1" if spec.test_hook else "")
    cmdline += f" {spec.extra_cmdline}" if spec.extra_cmdline else ""
    argv = [
        spec.qemu, "-name", f"{spec.name},debug-threads=on",
        "-machine", "q35", *accel_args,
        "-smp", str(spec.smp), "-m", str(spec.memory_mib),
        "-nodefaults", "-no-user-config", "-display", "none",
        "-kernel", str(img / "vmlinuz"), "-initrd", str(img / "initrd.img"), "-append", cmdline,
        # The image stays pristine: writes go to a temporary overlay dropped at exit.
        "-drive", f"file={img / 'rootfs.img'},if=virtio,format=raw,snapshot=on",
        # Serial console: logged from the first byte even while nobody is attached.
        "-chardev", f"socket,id=con0,path={d / 'console.sock'},server=on,wait=off,"
                    f"logfile={d / 'console.log'},logappend=on",
        "-serial", "chardev:con0",
        "-chardev", f"socket,id=qmp0,path={d / 'qmp.sock'},server=on,wait=off",
        "-mon", "chardev=qmp0,mode=control",
        "-chardev", f"socket,id=qmp1,path={d / 'launcher-qmp.sock'},server=on,wait=off",
        "-mon", "chardev=qmp1,mode=control",
        "-device", "virtio-serial-pci,id=vser0",
        "-chardev", f"socket,id=pv0,path={d / 'agent.sock'},server=on,wait=off",
        "-device", f"virtserialport,bus=vser0.0,chardev=pv0,name={AGENT_PORT_NAME}",
        "-pidfile", str(d / "qemu.pid"),
    ]  # fmt: skip
    if spec.test_hook:
        argv += [
            "-chardev", f"socket,id=test0,path={d / 'test.sock'},server=on,wait=off",
            "-device", f"virtserialport,bus=vser0.0,chardev=test0,name={TEST_PORT_NAME}",
        ]  # fmt: skip
    for i, (path, tag) in enumerate(spec.virtfs):
        argv += [
            "-virtfs",
            f"local,path={Path(path).resolve()},mount_tag={tag},security_model=none,id=fs{i}",
        ]
    return argv


# -- the VM handle -----------------------------------------------------------------------------


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
        self._hook: _TestHook | None = None

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

    def console_text(self) -> str:
        try:
            return self.console_log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def console_tail(self, lines: int = 25) -> str:
        return "\n".join(self.console_text().splitlines()[-lines:])

    def check_crash(self) -> None:
        """Raise GuestCrashed when the console shows an oops or panic."""
        text = self.console_text()
        m = CRASH_PATTERN.search(text)
        if m:
            start = text.rfind("\n", 0, max(0, m.start() - 400)) + 1
            lines = text[start : m.end() + 1500].splitlines()
            raise GuestCrashed(f"guest {self.name} crashed: {m.group(0).strip()}", lines)

    def wait_for(self, pattern: str, deadline_s: float, what: str | None = None) -> re.Match[str]:
        """Wait until the console prints ``pattern`` (new output since the last match).

        Raises GuestCrashed on an oops/panic, BootError if QEMU exits, WaitTimeout at the deadline.
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
            self.check_crash()
            if not self.alive():
                raise BootError(
                    f"QEMU for {self.name} exited while waiting for {what}; "
                    f"qemu.log: {self._qemu_log()[-500:]}\nconsole:\n{self.console_tail()}"
                )
            if time.monotonic() > end:
                raise WaitTimeout(
                    f"{self.name}: no {what} within {deadline_s:.0f} s; console tail:\n"
                    f"{self.console_tail()}"
                )
            time.sleep(0.1)

    def _qemu_log(self) -> str:
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

    def wait_guest_ready(self, deadline_s: float = 180.0) -> None:
        """Wait until the guest's test hook answers (userspace up, udev ran)."""
        self._test_hook().wait_ready(deadline_s, self)

    def _test_hook(self) -> _TestHook:
        if not self.spec.test_hook:
            raise GuestCommandError(f"{self.name} was started without test_hook=True")
        if self._hook is None:
            self._hook = _TestHook(self.dir / "test.sock", self.name)
        return self._hook

    def stop(self, deadline_s: float = 30.0) -> None:
        """End the VM: QMP ``quit``, then SIGTERM, then SIGKILL; remove its runtime directory."""
        if self._hook is not None:
            self._hook.close()
            self._hook = None
        if self.alive():
            with contextlib.suppress(OSError, LauncherError):
                _qmp_quit(self.dir / "launcher-qmp.sock", min(10.0, deadline_s / 2))
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


def _qmp_quit(path: Path, deadline_s: float) -> None:
    """Send QMP ``quit`` on the launcher's own monitor (plain JSON; no event loop needed)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(deadline_s)
        s.connect(str(path))
        f = s.makefile("rwb")
        json.loads(f.readline())  # greeting
        for cmd in ("qmp_capabilities", "quit"):
            f.write(json.dumps({"execute": cmd}).encode() + b"\n")
            f.flush()
            while True:
                line = f.readline()
                if not line:
                    return  # QEMU closed the monitor: it is quitting
                msg = json.loads(line)
                if "return" in msg or "error" in msg:
                    break


class _TestHook:
    """Client of the guest's test hook: JSON lines over the ``org.extpv.test.0`` port."""

    def __init__(self, path: Path, vm: str) -> None:
        self.path, self.vm = path, vm
        self._sock: socket.socket | None = None
        self._buf = b""
        self._next_id = 1
        self._lock = threading.Lock()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _connect(self) -> socket.socket:
        if self._sock is None:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(str(self.path))
            except OSError as err:
                s.close()
                raise GuestCommandError(f"{self.vm}: cannot connect to {self.path}: {err}") from err
            self._sock, self._buf = s, b""
        return self._sock

    def _request(self, req: dict[str, Any], deadline_s: float) -> dict[str, Any]:
        with self._lock:
            rid = self._next_id
            self._next_id += 1
            s = self._connect()
            try:
                s.sendall(json.dumps({"id": rid, **req}).encode() + b"\n")
            except OSError as err:
                self.close()
                raise GuestCommandError(f"{self.vm}: test hook socket: {err}") from err
            end = time.monotonic() + deadline_s
            while True:
                while b"\n" in self._buf:
                    line, self._buf = self._buf.split(b"\n", 1)
                    try:
                        msg = json.loads(line)
                    except ValueError:
                        continue
                    if isinstance(msg, dict) and msg.get("id") == rid:
                        return msg
                left = end - time.monotonic()
                if left <= 0:
                    raise WaitTimeout(
                        f"{self.vm}: no answer from the guest test hook to {req!r} "
                        f"within {deadline_s:.0f} s"
                    )
                ready, _, _ = select.select([s], [], [], min(left, 1.0))
                if ready:
                    try:
                        chunk = s.recv(65536)
                    except OSError as err:
                        # QEMU resets the chardev connection while the guest opens its port
                        # (seen during boot): the same as a close, the caller reconnects.
                        self.close()
                        raise GuestCommandError(f"{self.vm}: test hook socket: {err}") from err
                    if not chunk:
                        self.close()
                        raise GuestCommandError(f"{self.vm}: test hook socket closed by QEMU")
                    self._buf += chunk

    def run(self, argv: Sequence[str] | str, timeout_s: float, input_text: str) -> GuestResult:
        req: dict[str, Any] = {"timeout": timeout_s, "input": input_text}
        if isinstance(argv, str):
            req["sh"], shown = argv, ["sh", "-c", argv]
        else:
            req["argv"], shown = list(argv), list(argv)
        msg = self._request(req, timeout_s + 15.0)
        if "error" in msg:
            raise GuestCommandError(f"{self.vm}: guest could not run {shown!r}: {msg['error']}")
        return GuestResult(shown, int(msg["rc"]), str(msg["stdout"]), str(msg["stderr"]))

    def background(self, argv: Sequence[str], log_path: str, deadline_s: float) -> int:
        msg = self._request({"argv": list(argv), "background": True, "log": log_path}, deadline_s)
        if "error" in msg:
            raise GuestCommandError(f"{self.vm}: guest could not start {argv!r}: {msg['error']}")
        return int(msg["pid"])

    def clock_offset(self, samples: int) -> tuple[float, float]:
        best: tuple[float, float] | None = None
        for _ in range(samples):
            t0 = time.time()
            msg = self._request({"clock": True}, 10.0)
            t1 = time.time()
            if "time" not in msg:
                raise GuestCommandError(f"{self.vm}: the guest test hook has no clock request")
            rtt = t1 - t0
            if best is None or rtt < 2 * best[1]:
                best = (float(msg["time"]) - (t0 + t1) / 2, rtt / 2)
        assert best is not None
        return best

    def wait_ready(self, deadline_s: float, vm: VirtualMachine) -> None:
        end = time.monotonic() + deadline_s
        while True:
            vm.check_crash()
            if not vm.alive():
                raise BootError(f"{self.vm}: QEMU exited before the guest test hook answered")
            try:
                self._request({"argv": ["true"], "timeout": 5}, 3.0)
            except (WaitTimeout, GuestCommandError):
                # Not up yet: the guest reads our stale requests later and answers them; ids differ.
                if time.monotonic() > end:
                    raise WaitTimeout(
                        f"{self.vm}: guest test hook did not answer within {deadline_s:.0f} s; "
                        f"console tail:\n{vm.console_tail()}"
                    ) from None
                time.sleep(0.5)
            else:
                return


# -- start / stop / list -----------------------------------------------------------------------


def _spawn(spec: VMSpec) -> VirtualMachine:
    _check_image(spec.image)
    if not _NAME.match(spec.name):
        raise ImageError(f"bad VM name {spec.name!r}: use letters, digits, '.', '_', '-' (max 64)")
    if shutil.which(spec.qemu) is None:
        raise BootError(f"{spec.qemu} is not installed (apt-get install qemu-system-x86)")
    d = spec.vm_dir
    if d.exists():
        old = _read_pid(d)
        if old is not None and _alive(old, spec.name):
            raise VMExists(f"VM {spec.name} is already running (pid {old}); stop it first")
        shutil.rmtree(d)  # leftovers of a VM that died
    d.mkdir(parents=True, mode=0o700)
    accel, accel_args = _accel_args(spec)
    argv = qemu_argv(spec, accel_args)
    (d / "vm.json").write_text(
        json.dumps(
            {
                "name": spec.name,
                "image": str(spec.image.resolve()),
                "smp": spec.smp,
                "memory_mib": spec.memory_mib,
                "accel": accel,
                "test_hook": spec.test_hook,
                "argv": argv,
            },
            indent=2,
        )
        + "\n"
    )
    with open(d / "qemu.log", "wb") as qlog:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=qlog, stderr=qlog, start_new_session=True
        )
    vm = VirtualMachine(spec, proc.pid, accel, proc)
    end = time.monotonic() + 15.0
    while not (d / "qemu.pid").exists() or not (d / "launcher-qmp.sock").exists():
        if proc.poll() is not None:
            msg = vm._qemu_log().strip()
            shutil.rmtree(d, ignore_errors=True)
            raise BootError(f"QEMU for {spec.name} exited at once (rc {proc.returncode}): {msg}")
        if time.monotonic() > end:
            vm.stop()
            raise BootError(f"QEMU for {spec.name} created no sockets within 15 s")
        time.sleep(0.05)
    log.info("started %s: pid %d, %s, -smp %d", spec.name, proc.pid, accel, spec.smp)
    return vm


def start(
    spec: VMSpec, *, wait: bool = True, deadline_s: float = 240.0, retries: int = 2
) -> VirtualMachine:
    """Start a VM; with ``wait``, until userspace is up (test hook or console login).

    A boot whose kernel oopses or panics is stopped and retried up to ``retries`` times.
    """
    attempts = retries + 1
    for attempt in range(1, attempts + 1):
        vm = _spawn(spec)
        if not wait:
            return vm
        try:
            if spec.test_hook:
                vm.wait_guest_ready(deadline_s)
            else:
                vm.wait_for(READY_PATTERN, deadline_s, "the serial console's automatic login")
            vm.check_crash()
        except GuestCrashed as err:
            tail = "\n".join(err.lines[-15:])
            log.warning("boot %d/%d of %s crashed: %s\n%s", attempt, attempts, spec.name, err, tail)
            keep = spec.vm_dir.with_name(f".{spec.name}.crashed-console.log")
            with contextlib.suppress(OSError):
                shutil.copy(vm.console_log, keep)
            vm.stop()
            if attempt == attempts:
                raise GuestCrashed(
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


def _attach(name: str, runtime_dir: Path) -> VirtualMachine:
    d = runtime_dir / name
    try:
        info = json.loads((d / "vm.json").read_text())
    except (OSError, ValueError) as err:
        raise VMNotFound(f"no VM named {name} in {runtime_dir}") from err
    pid = _read_pid(d)
    spec = VMSpec(
        name=name,
        image=Path(info["image"]),
        smp=int(info["smp"]),
        memory_mib=int(info["memory_mib"]),
        runtime_dir=runtime_dir,
        test_hook=bool(info.get("test_hook")),
    )
    return VirtualMachine(spec, pid if pid is not None else -1, str(info.get("accel", "?")))


def stop(name: str, runtime_dir: Path = DEFAULT_RUNTIME_DIR, deadline_s: float = 30.0) -> None:
    """Stop the VM ``name`` started by any process."""
    _attach(name, runtime_dir).stop(deadline_s)


def list_vms(runtime_dir: Path = DEFAULT_RUNTIME_DIR) -> list[dict[str, Any]]:
    """The VMs under ``runtime_dir``: name, pid, alive, smp, accel, image."""
    out = []
    if runtime_dir.is_dir():
        for d in sorted(runtime_dir.iterdir()):
            if not d.is_dir() or d.name.startswith("."):
                continue
            try:
                vm = _attach(d.name, runtime_dir)
            except VMNotFound:
                continue
            out.append(
                {
                    "name": vm.name,
                    "pid": vm.pid,
                    "alive": vm.alive(),
                    "smp": vm.spec.smp,
                    "accel": vm.accel,
                    "image": str(vm.spec.image),
                    "dir": str(d),
                }
            )
    return out


# -- CLI ---------------------------------------------------------------------------------------


def _die(msg: str, hint: str | None = None) -> int:
    print(f"pvctl vm: {msg}", file=sys.stderr)
    if hint:
        print(f"hint: {hint}", file=sys.stderr)
    return 1


def _cmd_start(args: Any) -> int:
    spec = VMSpec(
        name=args.name,
        image=Path(args.image),
        smp=args.smp,
        memory_mib=args.memory,
        runtime_dir=Path(args.runtime_dir),
        accel=args.accel,
        virtfs=tuple((Path(p), t) for p, t in (v.split(":", 1) for v in args.virtfs)),
        test_hook=args.test_hook,
    )
    vm = start(spec, wait=not args.no_wait, deadline_s=args.timeout)
    print(json.dumps({"name": vm.name, "pid": vm.pid, "accel": vm.accel, "dir": str(vm.dir)}))
    return 0


def _cmd_stop(args: Any) -> int:
    stop(args.name, Path(args.runtime_dir))
    return 0


def _cmd_list(args: Any) -> int:
    vms = list_vms(Path(args.runtime_dir))
    if args.json:
        print(json.dumps(vms, indent=2))
    else:
        for v in vms:
            state = "running" if v["alive"] else "dead"
            print(f"{v['name']:16} {state:8} pid {v['pid']:<8} smp {v['smp']:<3} ", end="")
            print(f"{v['accel']:4} {v['image']}")
    return 0


def _cmd_console(args: Any) -> int:
    """Attach the terminal to the serial console (Ctrl-] detaches)."""
    path = Path(args.runtime_dir) / args.name / "console.sock"
    if not path.exists():
        raise VMNotFound(f"no console for VM {args.name} ({path} is missing)")
    import termios  # noqa: PLC0415 - only for the interactive console
    import tty  # noqa: PLC0415

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(str(path))
        fd = sys.stdin.fileno()
        saved = termios.tcgetattr(fd) if os.isatty(fd) else None
        print(f"[connected to {args.name}'s console; Ctrl-] detaches]", file=sys.stderr)
        try:
            if saved is not None:
                tty.setraw(fd)
            while True:
                ready, _, _ = select.select([s, fd], [], [])
                if s in ready:
                    data = s.recv(4096)
                    if not data:
                        break
                    os.write(sys.stdout.fileno(), data)
                if fd in ready:
                    data = os.read(fd, 1024)
                    if not data or b"\x1d" in data:
                        break
                    s.sendall(data)
        finally:
            if saved is not None:
                termios.tcsetattr(fd, termios.TCSADRAIN, saved)
    return 0


def register_cli(subparsers: Any) -> None:
    """Add ``vm start|stop|list|console`` to a CLI's argparse subparsers (pvctl does)."""
    vm = subparsers.add_parser(
        "vm",
        help="start, stop and list QEMU guests wired to pvhost",
        description="Start, stop and list extpv QEMU guests.",
    )
    vm.add_argument(
        "--runtime-dir",
        default=str(DEFAULT_RUNTIME_DIR),
        help="where VM directories live; pvhost watches it (default %(default)s)",
    )
    sub = vm.add_subparsers(dest="vm_command", required=True)
    p = sub.add_parser("start", help="boot a guest image")
    p.add_argument("name", help="VM name (letters, digits, '.', '_', '-')")
    p.add_argument("--image", required=True, help="image directory from images/build-image")
    p.add_argument("--smp", type=int, default=2, help="vCPUs (default %(default)s)")
    p.add_argument("--memory", type=int, default=1024, help="MiB (default %(default)s)")
    p.add_argument(
        "--accel",
        choices=["auto", "kvm", "tcg"],
        default="auto",
        help="auto: KVM when it really runs guests here, else TCG",
    )
    p.add_argument(
        "--virtfs",
        action="append",
        default=[],
        metavar="HOSTDIR:TAG",
        help="share a host directory over 9p (mount -t 9p TAG in the guest)",
    )
    p.add_argument(
        "--test-hook", action="store_true", help="serve the test images' command hook on test.sock"
    )
    p.add_argument("--no-wait", action="store_true", help="return once QEMU runs")
    p.add_argument("--timeout", type=float, default=240.0, help="boot deadline, s")
    p.set_defaults(vm_func=_cmd_start)
    p = sub.add_parser("stop", help="end a guest (QMP quit, then signals)")
    p.add_argument("name")
    p.set_defaults(vm_func=_cmd_stop)
    p = sub.add_parser("list", help="list guests")
    p.add_argument("--json", action="store_true")
    p.set_defaults(vm_func=_cmd_list)
    p = sub.add_parser("console", help="attach to a guest's serial console")
    p.add_argument("name")
    p.set_defaults(vm_func=_cmd_console)
    vm.set_defaults(func=run_cli)


def run_cli(args: Any) -> int:
    """Run a parsed ``vm`` command; errors become one clear message and exit status 1."""
    try:
        return int(args.vm_func(args))
    except ImageError as err:
        return _die(str(err), "build an image: sudo images/build-image")
    except LauncherError as err:
        return _die(str(err))


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pvhost.launcher vm …`` (the same commands as ``pvctl vm …``)."""
    import argparse  # noqa: PLC0415

    parser = argparse.ArgumentParser(
        prog="python -m pvhost.launcher", description="extpv QEMU launcher"
    )
    register_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return run_cli(args)


if __name__ == "__main__":
    sys.exit(main())
