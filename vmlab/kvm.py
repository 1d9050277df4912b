"""Acceleration: KVM only when it really runs a guest here, else multi-threaded TCG.

``/dev/kvm`` may exist and still refuse stock guests (e.g. kvm-pvm), so KVM is never judged
by the device node: :func:`probe_kvm` executes a few real-mode instructions under KVM and
looks for their output on the serial port.
"""

from __future__ import annotations

import functools
import logging
import os
import subprocess
import tempfile
import time
from pathlib import Path

from vmlab.errors import LauncherError

__all__ = ["ACCELERATORS", "QEMU", "choose_accel", "probe_kvm"]

log = logging.getLogger(__name__)

#: The one QEMU system emulator the lab runs.
QEMU = "qemu-system-x86_64"
#: What ``VMSpec.accel`` and ``--accel`` accept; ``EXTPV_ACCEL`` overrides either.
ACCELERATORS = ("auto", "kvm", "tcg")


def _probe_bios() -> bytes:
    """A 64 KiB BIOS whose reset vector writes "K" to COM1 and halts: real guest code, no disk."""
    code = bytes(
        [0xBA, 0xF8, 0x03, 0xB0, 0x4B, 0xEE, 0xF4, 0xEB, 0xFD]
    )  # mov dx,3f8; mov al,'K'; out; hlt
    bios = bytearray(b"\xf4" * 65536)
    bios[0xFFF0 : 0xFFF0 + len(code)] = code
    return bytes(bios)


@functools.cache
def probe_kvm(qemu: str = QEMU, deadline_s: float = 20.0) -> str | None:
    """Why KVM cannot run a guest here, or None when it can (cached per process)."""
    if os.environ.get("EXTPV_ACCEL") == "tcg":
        return "EXTPV_ACCEL=tcg"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "/dev/kvm is absent or not accessible"
    with tempfile.TemporaryDirectory(prefix="extpv-kvm-probe.") as tmp:
        bios, out = Path(tmp, "bios.bin"), Path(tmp, "serial.out")
        bios.write_bytes(_probe_bios())
        argv = [
            qemu, "-accel", "kvm", "-cpu", "host", "-machine", "pc", "-m", "16",
            "-nodefaults", "-display", "none", "-no-user-config",
            "-bios", str(bios), "-serial", f"file:{out}",
        ]  # fmt: skip
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


def choose_accel(requested: str, qemu: str = QEMU) -> tuple[str, list[str]]:
    """The accelerator to use (``kvm`` or ``tcg``) and its QEMU arguments.

    ``EXTPV_ACCEL`` overrides ``requested``; ``auto`` probes KVM and falls back to TCG.
    """
    accel = os.environ.get("EXTPV_ACCEL", requested)
    if accel == "auto":
        why = probe_kvm(qemu)
        if why is not None:
            log.info("using TCG: %s", why)
        accel = "tcg" if why else "kvm"
    if accel == "kvm":
        return accel, ["-accel", "kvm", "-cpu", "host"]
    if accel == "tcg":
        return accel, ["-accel", "tcg,thread=multi", "-cpu", "max"]
    raise LauncherError(f"unknown accelerator {accel!r} (use auto, kvm or tcg)")
