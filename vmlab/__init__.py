"""extpv's VM lab: boot guest images wired to pvhost, for ``pvctl vm``, tests, benchmarks, demo.

Utilities for testing, not part of the host service: pvhost never starts VMs (QEMU keeps the
same split between ``qemu.qmp`` and ``qemu.machine``). The lab imports pvproto and extpv only.

* :mod:`vmlab.qemu` — :class:`VMSpec` and the QEMU command line (the runtime-directory layout);
* :mod:`vmlab.kvm` — KVM when it really runs a guest here, else TCG;
* :mod:`vmlab.machine` — :class:`VirtualMachine`: start, find, wait on, end; its vCPU threads;
* :mod:`vmlab.priority` — QEMU's nice value on every one of its threads;
* :mod:`vmlab.monitor` — one QMP command on the lab's own monitor (qemu.qmp);
* :mod:`vmlab.testhook` — the test images' command hook (run commands in the guest);
* :mod:`vmlab.console` — the interactive serial console;
* :mod:`vmlab.cli` — ``pvctl vm …`` / ``python -m vmlab vm …``;
* :mod:`vmlab.errors` — the error tree, rooted at :class:`LauncherError` (the errors of the
  monitor and of the test daemon are caught as that root, or imported from there).

For tests and benchmarks (imported from their modules, not re-exported here):
:mod:`vmlab.images` (build or reuse the test image), :mod:`vmlab.daemon` (the real pvhost
daemon as a subprocess), :mod:`vmlab.guestpeer` (a fake guest peer on a channel socket) and
:mod:`vmlab.hostpeer` (a host peer against a real agent).
"""

from vmlab.errors import (
    BootError,
    GuestCommandError,
    GuestCrashed,
    GuestHung,
    ImageError,
    LauncherError,
    QemuAborted,
    VMExists,
    VMNameError,
    VMNotFound,
    WaitTimeout,
)
from vmlab.kvm import probe_kvm
from vmlab.machine import CRASH_PATTERN, VirtualMachine, attach, list_vms, start, stop
from vmlab.qemu import AGENT_PORT_NAME, DEFAULT_RUNTIME_DIR, TEST_PORT_NAME, VMSpec, qemu_argv
from vmlab.testhook import GuestResult

__all__ = [
    "AGENT_PORT_NAME",
    "CRASH_PATTERN",
    "DEFAULT_RUNTIME_DIR",
    "TEST_PORT_NAME",
    "BootError",
    "GuestCommandError",
    "GuestCrashed",
    "GuestHung",
    "GuestResult",
    "ImageError",
    "LauncherError",
    "QemuAborted",
    "VMExists",
    "VMNameError",
    "VMNotFound",
    "VMSpec",
    "VirtualMachine",
    "WaitTimeout",
    "attach",
    "list_vms",
    "probe_kvm",
    "qemu_argv",
    "start",
    "stop",
]
