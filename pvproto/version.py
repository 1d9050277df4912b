"""Protocol versions and Hello negotiation."""

from __future__ import annotations

from collections.abc import Iterable

from pvproto.errors import VersionMismatch

__all__ = ["PROTOCOL_VERSION", "SUPPORTED_VERSIONS", "negotiate"]

#: The version this software writes by default.
#: 2: ``LoadProgram`` carries ``version`` and its signature covers the program envelope
#: (id, kind, digest, version), not the bare payload. Version 1 is not spoken any more: a
#: v1 agent would accept payload-only signatures, which can be replayed under any id.
#: 3: the generic agent's messages: ``ProgramRecords`` (a program's ring-buffer records, in
#: batches, as bytes) and ``ReadMap``/``MapContents``. A side sends them only in a session of
#: version 3; with a peer of version 2 (an agent image built before them) it falls back to
#: one ``ProgramEvent{data: {"raw": HEX}}`` per record and no map reads.
#: 4: each pinned ``VcpuPlacement`` of an ``AffinityResult`` says what the pin achieved
#: (``isolation``: isolated | restricted, and ``isolation_reason``). Additive: a host leaves
#: both out of the frames of a session of version 2 or 3, whose agents reject unknown fields.
PROTOCOL_VERSION = 4
#: Every version this software can read and write.
SUPPORTED_VERSIONS: tuple[int, ...] = (2, 3, 4)


def negotiate(ours: Iterable[int], theirs: Iterable[int]) -> int:
    """Return the highest version both sides speak, or raise :class:`VersionMismatch`."""
    ours_set, theirs_set = set(ours), set(theirs)
    common = ours_set & theirs_set
    if not common:
        raise VersionMismatch(
            f"no common protocol version: this side speaks {sorted(ours_set)}, "
            f"the peer speaks {sorted(theirs_set)}; upgrade the older side"
        )
    return max(common)
