"""The memory service's resynchronisation from the program's own counters (pure: unit-tested).

Records can be lost on their way to the host: the kernel's ring buffer was full, the guest's
agent had no ready connection (an agent whose pages the guest evicted misses the channel's
liveness deadline, and drops what it drains while it says Hello again), or pvhost's per-VM
bounds dropped them. A lost OOM record is the worst: after the kill the pressure is gone, and
no later batch tells the host what happened. So the program also counts every event in its
``pv_mem_state`` map (:class:`~pvhost.services.memory_event.MemoryCounters`), and the service
reads it (``ReadMap``) when the program is loaded, on every lost-records notice and on its
timer. :class:`CounterSync` turns those reads into what the received records did not account
for.

How, per VM (all values in the program's own coordinates: counts since it was loaded):

* ``accounted``: what the host knows happened: the first read (the baseline), plus every
  record received since, plus what earlier resyncs added.
* A read is not compared at once: records of events just before it may still be on their way
  (in the ring buffer, in the agent's batch, in pvhost's queue). It is kept as ``pending`` and
  compared at the first read at least ``confirm_s`` later: what it counted and the host still
  has not received by then (``pending - accounted``, per counter, never negative) was lost; it
  is added to ``accounted`` and returned, for the service to treat as pressure.
* A counter lower than the last read means the program was loaded again (the agent
  restarted, or the service was enabled again): the counters started from 0. The new read is
  the new baseline; nothing is returned (never a negative delta). (A program loaded again that
  already counted more than the last read of the previous one cannot be told apart; what it
  counted beyond that reads as lost, once: pressure, bounded like any.)
* The guest is hostile: every delta is clamped (``MAX_DELTA``); the policy bounds what any
  pressure, however large, may change (a step, two after an OOM kill, at the rate limit).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from pvhost.services.memory_event import MemoryCounters

__all__ = ["MAX_DELTA", "CounterSync", "Resync"]

#: The most one resync reports (a hostile guest's counters jump by 2**64): enough for status
#: to say "a lot", and the policy's response does not grow with it anyway.
MAX_DELTA = MemoryCounters(reclaims=1_000_000, stall_ns=3_600 * 10**9, ooms=1_000, lost=10**9)


@dataclass(frozen=True)
class Resync:
    """What one read found, for the service: ``missing`` counts as pressure if non-zero."""

    #: Events the program counted that no received record accounted for (clamped).
    missing: MemoryCounters
    #: The read was the first (a baseline) or found the program loaded again.
    baseline: bool = False

    @property
    def pressure(self) -> bool:
        return bool(self.missing.reclaims or self.missing.ooms)


def _add(a: MemoryCounters, b: MemoryCounters) -> MemoryCounters:
    return MemoryCounters(*(getattr(a, f.name) + getattr(b, f.name) for f in fields(a)))


class CounterSync:
    """One VM's counters: the baseline, what was accounted for, the read awaiting its check."""

    def __init__(self, confirm_s: float) -> None:
        self.confirm_s = confirm_s
        self.accounted: MemoryCounters | None = None
        self.pending: MemoryCounters | None = None
        self.pending_at = 0.0
        #: The last read (what status shows as the guest's counters).
        self.last: MemoryCounters | None = None
        self.reads = 0
        self.baselines = 0

    def reset(self) -> None:
        """The program is gone (service disabled): the next read is a baseline."""
        self.accounted = self.pending = self.last = None

    def received(self, reclaims: int, stall_ns: int, ooms: int) -> None:
        """Records the host received (counted before any read: a baseline replaces them)."""
        if self.accounted is not None:
            self.accounted = _add(self.accounted, MemoryCounters(reclaims, stall_ns, ooms))

    def observe(self, now: float, counters: MemoryCounters) -> Resync:
        """One read of ``pv_mem_state`` at ``now`` (monotonic seconds)."""
        self.reads += 1
        previous, self.last = self.last, counters
        if self.accounted is None or previous is None or _backwards(previous, counters):
            self.accounted = self.pending = counters
            self.pending_at = now
            self.baselines += 1
            return Resync(MemoryCounters(), baseline=True)
        if self.pending is None or now - self.pending_at < self.confirm_s:
            if self.pending is None:
                self.pending, self.pending_at = counters, now
            return Resync(MemoryCounters())
        confirmed, self.pending, self.pending_at = self.pending, counters, now
        accounted = self.accounted
        missing = MemoryCounters(
            *(
                min(
                    max(0, getattr(confirmed, f.name) - getattr(accounted, f.name)),
                    getattr(MAX_DELTA, f.name),
                )
                for f in fields(confirmed)
            )
        )
        # What the host knows now covers the confirmed read (records received after it for
        # events after it stay counted: accounted never goes below what it was).
        self.accounted = MemoryCounters(
            *(
                max(getattr(accounted, f.name), getattr(confirmed, f.name))
                for f in fields(confirmed)
            )
        )
        # The lost slot is the ring buffer's; it is not an event the host is owed.
        return Resync(replace(missing, lost=0))


def _backwards(before: MemoryCounters, after: MemoryCounters) -> bool:
    return any(getattr(after, f.name) < getattr(before, f.name) for f in fields(after))
