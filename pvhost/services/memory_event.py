"""The memory service's record layout, mirrored from ``bpf/memory.h`` (the one definition).

``struct pv_memory_event`` is ``<IIQQQ``: kind, pid, ktime_ns, duration_ns, nr_reclaimed.
The ``pv_mem_state`` array map's slots (``PV_MEM_STATE_*``: u32 keys, u64 values, counters the
program keeps itself) are :class:`StateSlot`; :func:`decode_counters` reads a ``ReadMap`` of it.
A unit test compiles the header and checks this mirror (size, offsets, kind values, slots).
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from pvhost.services.base import EventError

__all__ = [
    "EVENT_FORMAT",
    "EVENT_SIZE",
    "STATE_MAP",
    "STATE_SLOTS",
    "MemoryCounters",
    "MemoryEvent",
    "MemoryKind",
    "StateSlot",
    "decode_counters",
    "decode_event",
]

EVENT_FORMAT = "<IIQQQ"
EVENT_SIZE = struct.calcsize(EVENT_FORMAT)
_EVENT = struct.Struct(EVENT_FORMAT)
#: The program's counters: ``pv_mem_state``, an array map of STATE_SLOTS u64 values.
STATE_MAP = "pv_mem_state"
_KEY = struct.Struct("<I")
_VALUE = struct.Struct("<Q")


class MemoryKind(enum.IntEnum):
    RECLAIM = 1  # PV_MEMORY_RECLAIM
    OOM = 2  # PV_MEMORY_OOM


class StateSlot(enum.IntEnum):
    LOST = 0  # PV_MEM_STATE_LOST: records the ring buffer had no room for
    RECLAIMS = 1  # PV_MEM_STATE_RECLAIMS: direct reclaims finished
    STALL_NS = 2  # PV_MEM_STATE_STALL_NS: their total stall (ns)
    OOMS = 3  # PV_MEM_STATE_OOMS: OOM victims marked


STATE_SLOTS = len(StateSlot)  # PV_MEM_STATE_SLOTS


@dataclass(frozen=True)
class MemoryCounters:
    """``pv_mem_state`` as read: what the program counted since it was loaded."""

    reclaims: int = 0
    stall_ns: int = 0
    ooms: int = 0
    lost: int = 0


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


def decode_counters(entries: Sequence[tuple[bytes, bytes]], *, truncated: bool) -> MemoryCounters:
    """``pv_mem_state`` from a ``ReadMap`` answer's (key, value) pairs: exactly one u64 per
    slot. EventError for anything else (the guest is hostile: no guess at a partial map)."""
    if truncated or len(entries) != STATE_SLOTS:
        more = "more than" if truncated else f"{len(entries)}, not"
        raise EventError(f"{STATE_MAP} has {more} {STATE_SLOTS} entries")
    values: dict[int, int] = {}
    for key, value in entries:
        if len(key) != _KEY.size or len(value) != _VALUE.size:
            raise EventError(
                f"a {STATE_MAP} entry has {len(key)}-byte key and {len(value)}-byte value, "
                f"not {_KEY.size} and {_VALUE.size}"
            )
        (slot,) = _KEY.unpack(key)
        if slot >= STATE_SLOTS or slot in values:
            raise EventError(f"{STATE_MAP}: unexpected or repeated slot {slot}")
        values[slot] = _VALUE.unpack(value)[0]
    return MemoryCounters(
        reclaims=values[StateSlot.RECLAIMS],
        stall_ns=values[StateSlot.STALL_NS],
        ooms=values[StateSlot.OOMS],
        lost=values[StateSlot.LOST],
    )
