"""The one exception tree of the host service.

::

    HostError                     anything the host service cannot do, with a message saying why
    ├── ConfigError               the config file (or a CLI value) is invalid: names file and key
    ├── TopologyError             sysfs describes no usable host topology (malformed CPU list, …)
    ├── QmpError                  QEMU's monitor is unreachable or answered something unexpected
    ├── ChannelError              the guest channel failed (connect, negotiation, program load)
    ├── GuestRequestError         a guest request refused as a whole (answered Error{bad-request})
    ├── PlacementError            a placement could not be applied; it was undone before raising
    │   ├── BackendUnavailable    no cpuset hierarchy this backend can drive on this host
    │   └── PartitionInvalid      the kernel left a partition ``isolated invalid (<reason>)``
    ├── ControlError              the control socket refused or failed a request
    └── SigningError              a signing key cannot be created or used (pvhost.signing)
"""

from __future__ import annotations

__all__ = [
    "BackendUnavailable",
    "ChannelError",
    "ConfigError",
    "ControlError",
    "GuestRequestError",
    "HostError",
    "PartitionInvalid",
    "PlacementError",
    "QmpError",
    "TopologyError",
]


class HostError(Exception):
    """Root of every error the host service raises on purpose."""


class ConfigError(HostError):
    """Invalid configuration; the message names the file and the key."""


class TopologyError(HostError):
    """The host's CPU topology could not be read."""


class QmpError(HostError):
    """QEMU's QMP monitor failed or answered something unexpected."""


class ChannelError(HostError):
    """The guest channel failed."""


class GuestRequestError(HostError):
    """A guest request the host refuses as a whole (e.g. more vCPUs wanted than the VM has)."""


class PlacementError(HostError):
    """A placement could not be applied (whatever was changed has been undone)."""


class BackendUnavailable(PlacementError):
    """This placement backend cannot run on this host."""


class PartitionInvalid(PlacementError):
    """The kernel reported a cpuset partition as invalid; ``reason`` is the kernel's word."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class ControlError(HostError):
    """A control-socket request failed."""
