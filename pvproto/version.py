"""Protocol versions and Hello negotiation."""

from __future__ import annotations

from collections.abc import Iterable

from pvproto.errors import VersionMismatch

__all__ = ["AGENT_VERSIONS", "PROTOCOL_VERSION", "SUPPORTED_VERSIONS", "negotiate"]

#: The version this software writes by default.
#: 2: ``LoadProgram`` carries ``version`` and its signature covers the program envelope
#: (id, kind, digest, version), not the bare payload. Version 1 is not spoken any more: a
#: v1 agent would accept payload-only signatures, which can be replayed under any id.
#: 3: the generic agent's messages: ``ProgramRecords`` (a program's ring-buffer records, in
#: batches, as bytes) and ``ReadMap``/``MapContents``. A side sends them only in a session of
#: version 3; with a peer of version 2 (an agent image built before them) it falls back to
#: one ``ProgramEvent{data: {"raw": HEX}}`` per record and no map reads.
#: 4: the generic agent. It holds no service logic: it forwards every ring buffer's records
#: (the affinity program's too: the host's affinity service tracks the guest's pins; it
#: sends no ``AffinityUpdate``), runs an object's iterator programs once after load, and
#: writes the host's ``GuestDocument``s; the host sends it no ``AffinityResult`` (its answer
#: is the ``placement`` document). Each pinned placement says what the pin achieved
#: (``isolation``: isolated | restricted, and ``isolation_reason``); a host leaves both out
#: of the ``AffinityResult`` frames of a session of version 2 or 3, whose agents reject
#: unknown fields. Agents of protocol 2 and 3 track affinity themselves and send
#: ``AffinityUpdate``; pvhost still serves them.
#: 5: ``TopologyUpdate`` (guest → host): the agent says when the guest's online CPUs change
#: (vCPU hot-plug) instead of only at Hello. Nothing else changes: a host of protocol 5 serves
#: an agent of 4 (which never sends it: the Hello's CPUs stand until the agent's next Hello),
#: and an agent of 5 serves a host of 4 (it then sends none).
PROTOCOL_VERSION = 5
#: Every version this library can read and write (pvhost speaks them all).
SUPPORTED_VERSIONS: tuple[int, ...] = (2, 3, 4, 5)
#: The versions a generic agent (pvagent) speaks: it cannot serve a host that expects the
#: agent to track affinity (protocol 2 and 3), and says so at Hello (``unsupported``).
AGENT_VERSIONS: tuple[int, ...] = (4, 5)


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
