"""A :class:`pvhost.session.VmSession` for tests that drive it by hand, without a VM.

Its QMP and agent sockets do not exist (a session run against them keeps retrying the channel,
as it does while a guest has not opened its port), it has no program to load, and its hooks
into the service (apply a plan, the VM gone, its vCPUs changed) fail the test if called: the
tests using it check what the session itself does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pvhost.session import VmSession

__all__ = ["lone_session"]


async def _never(*_: object) -> Any:
    raise AssertionError("not called")


def lone_session(name: str = "vm1") -> VmSession:
    """A session for VM ``name`` that no service drives (see the module's docstring)."""
    return VmSession(
        name,
        Path("/nonexistent/qmp.sock"),
        Path("/nonexistent/agent.sock"),
        applier=_never,
        on_gone=_never,
        on_vcpus_changed=_never,
        program=None,
        rate=1.0,
        burst=1,
        max_backoff=1.0,
    )
