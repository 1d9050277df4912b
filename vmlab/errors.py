"""The VM lab's errors: one tree, each message says what to do next.

::

    LauncherError
     ├── VMNameError       the VM name breaks the one VM-name rule (extpv.names)
     ├── ImageError        the image directory lacks a file, or the test image could not be built
     ├── VMExists          a live VM already has this name
     ├── VMNotFound        no VM with this name
     ├── BootError         QEMU would not start, or the guest never became ready
     │    ├── GuestCrashed the guest kernel oopsed or panicked (console lines attached)
     │    ├── GuestHung    a guest timer stopped while booting (console lines attached)
     │    └── QemuAborted  QEMU itself failed an assertion (an emulator bug; qemu.log attached)
     ├── WaitTimeout       a wait passed its deadline (says what it waited for)
     ├── MonitorError      a command on the lab's own QMP monitor failed
     ├── GuestCommandError a test-hook command could not be run in the guest
     └── DaemonError       the pvhost daemon run for a test or benchmark misbehaved
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "BootError",
    "DaemonError",
    "GuestCommandError",
    "GuestCrashed",
    "GuestHung",
    "ImageError",
    "LauncherError",
    "MonitorError",
    "QemuAborted",
    "VMExists",
    "VMNameError",
    "VMNotFound",
    "WaitTimeout",
]


class LauncherError(Exception):
    """Root of the VM lab's errors."""


class VMNameError(LauncherError):
    """The VM name cannot be used: pvhost would never see a VM of that name."""


class ImageError(LauncherError):
    """The image directory cannot be used, or the test image could not be built."""


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


class GuestHung(BootError):
    """The guest kernel reported a timer that never fired and did not finish booting after it;
    ``lines`` holds the console lines around the report."""

    def __init__(self, message: str, lines: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.lines = list(lines)


class QemuAborted(BootError):
    """QEMU exited on one of its own assertions: an emulator bug, not the guest's doing (QEMU
    10.0's multi-threaded TCG, under a starved host: ``iotlb_to_section`` or
    ``msix_table_mmio_write`` on a stale memory section). ``lines``: qemu.log, console tail."""

    def __init__(self, message: str, lines: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.lines = list(lines)


class WaitTimeout(LauncherError):
    """A wait passed its deadline."""


class MonitorError(LauncherError):
    """A command on the lab's own QMP monitor (``launcher-qmp.sock``) failed."""


class GuestCommandError(LauncherError):
    """A command could not be run in the guest through the test hook."""


class DaemonError(LauncherError):
    """The pvhost daemon started by the lab exited, or did not reach a wanted state."""
