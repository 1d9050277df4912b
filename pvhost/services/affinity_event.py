"""Decoder of ``struct pv_affinity_event`` and ``struct pv_affinity_tracked`` (bpf/affinity.h —
the layout is defined there once; this is its only decoder, on the host).

The event is 160 bytes: seven little-endian header words then a 128-byte CPU bitmap.
A record of the wrong size is an :class:`EventError` (a program that does not match
this service, or a hostile guest), never a silent misreading.
"""

from __future__ import annotations

import struct
from enum import IntEnum, IntFlag
from typing import NamedTuple

__all__ = [
    "EVENT_SIZE",
    "MASK_BYTES",
    "MAX_TRACKED",
    "TRACKED",
    "AffinityEvent",
    "EventError",
    "EventFlag",
    "EventKind",
    "decode",
    "decode_tracked",
    "mask_cpus",
]

_HEADER = struct.Struct("<IIIIIIQ")  # kind tgid tid target mask_bytes flags ktime_ns
MASK_BYTES = 128  # PV_AFFINITY_MASK_BYTES
EVENT_SIZE = _HEADER.size + MASK_BYTES
#: Layout of ``struct pv_affinity_tracked`` (the in-kernel per-tid table): mask_bytes, pad, mask.
TRACKED = struct.Struct(f"<II{MASK_BYTES}s")
#: PV_AFFINITY_MAX_TRACKED: live tids the guest program tracks at most.
MAX_TRACKED = 8192
_TID = struct.Struct("<I")


class EventKind(IntEnum):
    SET = 1  # a sched_setaffinity() call that returned 0
    EXIT = 2  # a tracked thread exited


class EventFlag(IntFlag):
    TRUNCATED = 1  # the user mask was longer than MASK_BYTES
    OVERFLOW = 2  # the kernel's tracked-tid table was full
    INHERITED = 4  # not a call: a new thread inherited its creator's mask


class EventError(ValueError):
    """A ring-buffer record (or map entry) that is not what bpf/affinity.h declares."""


class AffinityEvent(NamedTuple):
    """One decoded event (a NamedTuple: cheap to build at 100 000 events per second)."""

    kind: EventKind
    tgid: int
    tid: int  # the calling (or exiting) thread
    target: int  # tid argument: 0 means the caller
    cpus: frozenset[int]  # CPUs set in the mask (SET only)
    flags: EventFlag
    ktime_ns: int

    @property
    def target_tid(self) -> int:
        """The thread whose affinity changed (the caller when ``target`` is 0)."""
        return self.target or self.tid


def mask_cpus(mask: bytes) -> frozenset[int]:
    """CPU numbers of the set bits of a little-endian bitmap."""
    value = int.from_bytes(mask, "little")
    cpus = []
    while value:
        low = value & -value
        cpus.append(low.bit_length() - 1)
        value ^= low
    return frozenset(cpus)


_KINDS = {int(k): k for k in EventKind}
_FLAGS = tuple(EventFlag(v) for v in range(8))
_NO_CPUS: frozenset[int] = frozenset()
#: mask bytes → CPU set, for the few distinct masks a workload uses (bounded, reset when full)
_mask_cache: dict[bytes, frozenset[int]] = {}
_MASK_CACHE_MAX = 1024


def decode(record: bytes) -> AffinityEvent:
    if len(record) != EVENT_SIZE:
        raise EventError(f"affinity event of {len(record)} bytes; expected {EVENT_SIZE}")
    kind, tgid, tid, target, mask_bytes, flags, ktime = _HEADER.unpack_from(record)
    event_kind = _KINDS.get(kind)
    if event_kind is None:
        raise EventError(f"unknown affinity event kind {kind}")
    if event_kind is EventKind.EXIT:
        cpus = _NO_CPUS
    else:
        mask = record[_HEADER.size : _HEADER.size + min(mask_bytes, MASK_BYTES)]
        found = _mask_cache.get(mask)
        if found is None:
            if len(_mask_cache) >= _MASK_CACHE_MAX:
                _mask_cache.clear()
            found = _mask_cache[mask] = mask_cpus(mask)
        cpus = found
    return AffinityEvent(event_kind, tgid, tid, target, cpus, _FLAGS[flags & 7], ktime)


def decode_tracked(key: bytes, value: bytes) -> tuple[int, frozenset[int]]:
    """One entry of the program's ``pv_tracked`` map: (tid, the CPUs of its last mask)."""
    if len(key) != _TID.size or len(value) != TRACKED.size:
        raise EventError(
            f"pv_tracked entry of {len(key)}+{len(value)} bytes; "
            f"expected {_TID.size}+{TRACKED.size}"
        )
    nbytes, _pad, mask = TRACKED.unpack(value)
    return _TID.unpack(key)[0], mask_cpus(mask[: min(nbytes, MASK_BYTES)])
