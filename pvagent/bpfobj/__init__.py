"""The built eBPF programs, as the agent sees them (they live in :mod:`extpv.bpfobj`).

Kept so that ``pvagent trace`` and agent code raise the agent's own
:class:`~pvagent.errors.ObjectMissing`; the objects themselves are built into the neutral
package that the host also reads, so the host never imports the agent.
"""

from __future__ import annotations

from pathlib import Path

from extpv import bpfobj as _built
from pvagent.errors import ObjectMissing

__all__ = ["path", "read"]


def path(name: str) -> Path:
    """Path of the built program ``name`` (e.g. ``"affinity.bpf.o"``); it must exist."""
    try:
        return _built.path(name)
    except _built.ObjectMissing as err:
        raise ObjectMissing(str(err)) from err


def read(name: str) -> bytes:
    """Bytes of the built program ``name``."""
    return path(name).read_bytes()
