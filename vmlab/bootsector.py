"""Guest code without a guest OS: a 512-byte boot sector that SeaBIOS runs at 0x7c00.

An empty machine (no image) whose vCPU 0 must *do* something runs one of these: burn its CPU
(a vCPU thread under load, for isolation tests) or talk to QEMU's ACPI CPU hot-plug block the
way a guest kernel acknowledges a hot-plug (``_OST``), which makes QEMU emit
``ACPI_DEVICE_OST`` — the event pvhost re-reads its vCPU map on. Real guest code, so what
QEMU and pvhost see is what a real guest causes; a few bytes, so no boot to wait for.
Other vCPUs stay halted in the firmware (waiting for a start-up IPI), idle.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["ACPI_OST_FLOOD", "ACPI_OST_PERIODIC", "SPIN", "write_boot_disk"]

#: ``jmp $``: vCPU 0 burns its CPU for ever.
SPIN = bytes.fromhex("ebfe")

# 16-bit real mode: switch QEMU's CPU hot-plug block at 0xcd8 to its modern interface (write 0
# at offset 0), select CPU 0, pick the "_OST status" command (2 at 0xcdd); then each 32-bit
# write to the data register at 0xce0 is one ACPI_DEVICE_OST event.
_OST_SETUP = bytes.fromhex(
    "fa"  # cli
    "bad80c"  # mov dx, 0x0cd8
    "30c0"  # xor al, al
    "ee"  # out dx, al         (legacy → modern CPU hot-plug)
    "6631c0"  # xor eax, eax
    "66ef"  # out dx, eax        (selector: CPU 0)
    "badd0c"  # mov dx, 0x0cdd
    "b002"  # mov al, 2
    "ee"  # out dx, al         (command: _OST status)
    "bae00c"  # mov dx, 0x0ce0
)

#: As fast as the vCPU can: a hostile guest's event flood (tens of thousands per second).
ACPI_OST_FLOOD = _OST_SETUP + bytes.fromhex(
    "66ef"  # loop: out dx, eax  (→ ACPI_DEVICE_OST)
    "ebfc"  # jmp loop
)

#: One ``_OST`` now and then (a busy-wait of 2^28 iterations between two: about 0.1 to 1 s under
#: TCG): a guest acknowledging hot-plugs, gently.
ACPI_OST_PERIODIC = _OST_SETUP + bytes.fromhex(
    "66ef"  # loop: out dx, eax  (→ ACPI_DEVICE_OST)
    "66b900000010"  # mov ecx, 0x10000000
    "67e2fd"  # wait: loop wait (a32: counts ecx)
    "ebf3"  # jmp loop
)


def write_boot_disk(code: bytes, path: Path) -> Path:
    """A raw disk at ``path`` whose first sector boots ``code``; returns ``path``."""
    if len(code) > 510:
        raise ValueError(f"boot sector code is {len(code)} bytes; at most 510 fit")
    sector = code.ljust(510, b"\0") + b"\x55\xaa"
    path.write_bytes(sector.ljust(1 << 20, b"\0"))  # SeaBIOS reads no disk smaller than a track
    return path
