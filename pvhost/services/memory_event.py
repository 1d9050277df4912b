"""The memory service's record layout, mirrored from ``bpf/memory.h`` (the one definition).

``struct pv_memory_event`` is ``<IIQQQ``: kind, pid, ktime_ns, duration_ns, nr_reclaimed.
A unit test compiles the header and checks this mirror (size, offsets, kind values).
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from pvhost.services.base import EventError

__all__ = ["EVENT_FORMAT", "EVENT_SIZE", "MemoryEvent", "MemoryKind", "decode_event"]

EVENT_FORMAT = "<IIQQQ"
EVENT_SIZE = struct.calcsize(EVENT_FORMAT)
_EVENT = struct.Struct(EVENT_FORMAT)


class MemoryKind(enum.IntEnum):
    RECLAIM = 1  # PV_MEMORY_RECLAIM
    OOM = 2  # PV_MEMORY_OOM


@dataclass(frozen=True)
class MemoryEvent:
    kind: MemoryKind
    pid: int
    ktime_ns: int
    duration_ns: int
    nr_reclaimed: int


def decode_event(record: bytes) -> MemoryEvent:
    """One ``pv_memory`` record; EventError for anything else (the guest is hostile)."""
    if len(record) != EVENT_SIZE:
        raise EventError(f"a memory record is {EVENT_SIZE} bytes, not {len(record)}")
    kind, pid, ktime_ns, duration_ns, nr_reclaimed = _EVENT.unpack(record)
    try:
        known = MemoryKind(kind)
    except ValueError as err:
        raise EventError(f"unknown memory event kind {kind}") from err
    return MemoryEvent(known, pid, ktime_ns, duration_ns, nr_reclaimed)
