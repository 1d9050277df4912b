"""The affinity tracker: which vCPUs a guest's threads want pinned, right now.

It runs on the host, one per VM, in the affinity service (:mod:`pvhost.services.affinity`),
fed with the guest program's records (protocol-4 agents forward them undecoded); agents of
protocol 2 and 3 ran the same code in the guest and send its ``AffinityUpdate``s themselves.

Semantics (also in docs/design.md, "Affinity service"):

* A thread's **request** is the CPU set of its last *successful* ``sched_setaffinity``
  (or, for a thread created by a tracked thread, the mask it inherited at clone/fork — the
  kernel copies it, and exec keeps it, so ``taskset -c 1 app`` is seen), intersected with
  the online vCPUs — but only when that intersection is a *strict
  subset* of the online vCPUs. A mask covering every online vCPU (the default, or a
  widening back to it) is no request, and clears the thread's earlier one.
* A vCPU is **wanted pinned** while at least one live thread requests it:
  ``wanted = union of all requests``. A thread's exit (``sched_process_exit``, fired per thread, so
  a whole process exiting releases everything its threads requested) removes its request.
* The table is keyed by tid, so its size is bounded by the live threads that pinned
  themselves, whatever the call rate; exits remove entries. The guest is hostile (it can
  send records for made-up tids): the table also holds at most ``max_threads`` entries (the
  guest program's own table size); requests of further tids are ignored and counted
  (``overflowed``) until entries go away.
* **Coalescing**: a change is published at once if nothing was published during the
  last ``window`` seconds, otherwise at the end of that window. A storm of calls thus
  yields at most one ``AffinityUpdate`` per window, and the final state is published
  at most one window after the last call. Each update carries the *whole* state
  (idempotent), with a new ``seq``; a state equal to the last published is not resent.

The online set is the one the agent last reported: in its Hello, and (protocol 5) in each
``TopologyUpdate`` after a CPU came online or went offline; the affinity service then makes a
new tracker for the new set and rebuilds its table from the guest program's ``pv_tracked``.
An agent of protocol 4 reports it at Hello only (hot-plugged CPUs are known after the agent
restarts). Known limits: cpuset changes alter effective masks without a call and are not
observed. Explicit tids from a
caller in a non-initial PID namespace are that namespace's numbers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable

from pvhost.services.affinity_event import MAX_TRACKED, AffinityEvent, EventKind
from pvproto import AffinityUpdate, ThreadRequest

__all__ = ["MAX_LISTED_THREADS", "AffinityTracker"]

log = logging.getLogger(__name__)

#: AffinityUpdate lists at most this many threads (``threads_omitted`` counts the rest).
MAX_LISTED_THREADS = 1024


class AffinityTracker:
    """tid → requested vCPUs; publishes the union, coalesced (see the module docstring)."""

    def __init__(
        self,
        online: Iterable[int],
        publish: Callable[[AffinityUpdate], None],
        *,
        window: float = 0.020,
        clock: Callable[[], float] = time.monotonic,
        max_threads: int = MAX_TRACKED,
    ) -> None:
        self.online = frozenset(online)
        self.max_threads = max_threads
        #: Requests ignored because the table was full.
        self.overflowed = 0
        self.window = window
        self._publish = publish
        self._clock = clock
        self._table: dict[int, frozenset[int]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._last_sent = -float("inf")
        self._last_state: tuple[frozenset[int], tuple[tuple[int, frozenset[int]], ...]] | None = (
            None
        )
        self.seq = 0

    # -- state ------------------------------------------------------------------
    def request_of(self, cpus: Iterable[int]) -> frozenset[int] | None:
        """The request a mask makes: its online part if a strict subset of online, else None."""
        requested = frozenset(cpus) & self.online
        if requested and requested < self.online:
            return requested
        return None

    def handle(self, event: AffinityEvent) -> None:
        """Apply one event from the affinity program."""
        if event.kind is EventKind.SET:
            self.set_mask(event.target_tid, event.cpus)
        else:
            self.thread_exited(event.tid)

    def set_mask(self, tid: int, cpus: Iterable[int]) -> None:
        requested = self.request_of(cpus)
        if requested is None:
            if self._table.pop(tid, None) is not None:
                self._changed()
        elif self._table.get(tid) != requested:
            if tid not in self._table and len(self._table) >= self.max_threads:
                self.overflowed += 1
                return
            self._table[tid] = requested
            self._changed()

    def thread_exited(self, tid: int) -> None:
        if self._table.pop(tid, None) is not None:
            self._changed()

    def replace_all(self, masks: dict[int, frozenset[int]]) -> None:
        """Rebuild the table from an authoritative snapshot (the kernel's tracked map)."""
        table: dict[int, frozenset[int]] = {}
        for tid, cpus in masks.items():
            requested = self.request_of(cpus)
            if requested is not None and len(table) < self.max_threads:
                table[tid] = requested
        if table != self._table:
            self._table = table
            self._changed()

    def clear(self) -> None:
        """Forget every request (the program feeding the tracker went away)."""
        if self._table:
            self._table.clear()
            self._changed()

    @property
    def threads(self) -> dict[int, frozenset[int]]:
        """A copy of the table: tid → requested vCPUs."""
        return dict(self._table)

    def wanted(self) -> frozenset[int]:
        return frozenset().union(*self._table.values())

    # -- publication ----------------------------------------------------------------
    def update(self) -> AffinityUpdate:
        """The whole current state as a new AffinityUpdate (next seq)."""
        self.seq += 1
        items = sorted(self._table.items())
        listed = items[:MAX_LISTED_THREADS]
        return AffinityUpdate(
            seq=self.seq,
            wanted=sorted(self.wanted()),
            threads=[ThreadRequest(tid=tid, vcpus=sorted(cpus)) for tid, cpus in listed],
            threads_omitted=len(items) - len(listed),
        )

    def _changed(self) -> None:
        if self._timer is not None:
            return  # a publication is already due: it will carry this change
        delay = max(0.0, self._last_sent + self.window - self._clock())
        self._timer = asyncio.get_running_loop().call_later(delay, self._flush)

    def _flush(self) -> None:
        self._timer = None
        state = (self.wanted(), tuple(sorted(self._table.items())))
        if state == self._last_state:
            return
        self._last_state = state
        self._last_sent = self._clock()
        self._publish(self.update())

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
