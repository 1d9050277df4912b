"""Keep the agent's own pages in memory: it must report pressure while the guest thrashes.

A guest that runs out of memory without swap reclaims file-backed pages, among them the
agent's interpreter and libraries; the agent then refaults on every wake-up and forwards the
memory service's records seconds late, exactly when the host needs them (measured in a TCG
guest: ~5 s from the first direct reclaim to its record reaching the host). ``mlockall`` with
``MCL_ONFAULT`` locks only what the agent has touched or touches later, not whole mappings.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

__all__ = ["lock_memory"]

MCL_CURRENT = 1
MCL_FUTURE = 2
MCL_ONFAULT = 4


def lock_memory() -> str | None:
    """mlockall(current | future | on-fault); None, or why not (the agent runs on unlocked)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError as err:
        return f"no libc: {err}"
    if libc.mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT) != 0:
        return os.strerror(ctypes.get_errno())
    return None
