"""The one exception tree of the guest agent.

::

    AgentError                 anything the agent refuses or fails to do
    ├── ConfigError            a bad configuration file or command-line value
    ├── ObjectMissing          a built-in eBPF object was not built (run make -C bpf)
    ├── TrustRefused           a program failed the trust check (signature or allow-list)
    ├── LoadFailed             the loader or the kernel verifier refused a program
    └── PortError              the virtio-serial port (or test socket) cannot be used

Every message says what to do about it; ``LoadFailed.log`` carries the loader's and
verifier's log so the host sees why the kernel said no.
"""

from __future__ import annotations

__all__ = [
    "AgentError",
    "ConfigError",
    "LoadFailed",
    "ObjectMissing",
    "PortError",
    "TrustRefused",
]


class AgentError(Exception):
    """Root of every error the agent raises on purpose."""


class ConfigError(AgentError):
    """A configuration file or command-line value the agent cannot use."""


class ObjectMissing(AgentError):
    """A compiled eBPF object or bcc source shipped with the agent is absent."""


class TrustRefused(AgentError):
    """The program is not trusted: unsigned, unknown key, bad signature, or not allowed."""


class LoadFailed(AgentError):
    """The loader or the kernel refused the program; ``log`` has the verifier's words."""

    def __init__(self, message: str, log: str = "") -> None:
        super().__init__(message)
        self.log = log


class PortError(AgentError):
    """The channel to the host cannot be opened or used."""
