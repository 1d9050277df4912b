"""The affinity service, the first plugin: guest CPU-affinity hints → isolated host placements.

Its program is ``bpf/affinity.bpf.c`` (``[service] affinity_program`` overrides it): it reports
the guest's successful ``sched_setaffinity`` calls, inherited masks and thread exits as
``struct pv_affinity_event`` records (bpf/affinity.h), keeps the last mask of every tracked
thread in its ``pv_tracked`` map, counts ring-buffer overflows in ``pv_state``, and its task
iterator fills ``pv_tracked`` with the threads pinned before it was loaded.

How the guest's wish reaches the placement engine (:class:`pvhost.service.Service`: planning
under one lock, cgroup backends, reconcile at start) depends on the agent:

* **Protocol 4** (the generic agent): the agent forwards the records undecoded; this service
  decodes them (:mod:`pvhost.services.affinity_event`, the layout's only decoder) and runs the
  tracker (:mod:`pvhost.services.affinity_tracker`) per VM, with the online vCPUs of the
  agent's Hello, renewed and resynchronised when an agent of protocol 5 says they changed
  (``TopologyUpdate``: a vCPU hot-plugged and brought online). Its ``AffinityUpdate``s enter
  the VM session's placement path exactly where a guest's did (rate-limited, coalesced), and
  the answer goes back to the guest as the ``placement`` document (``GuestDocument``:
  ``/run/pvagent/placement.json``).
  Resynchronisation needs no code in the guest: when the agent reports the program loaded (a
  fresh load, or one found loaded after pvhost restarted) and whenever records were lost (the
  kernel's ring buffer overflowed — ``pv_state`` is read at most every ``LOST_CHECK_S`` after
  records arrived — the agent dropped some, or this VM's bounds in pvhost did), the service
  reads ``pv_tracked`` (``ReadMap``) and replaces its table with it.
* **Protocol 2 and 3** (agent images built before): the agent tracks affinity in the guest and
  sends ``AffinityUpdate``; the VM session hands it to the same placement path, and answers
  with ``AffinityResult`` as it always did.

Bounds: records per second and queued calls per VM are the service manager's; the tracker's
table holds at most ``MAX_TRACKED`` threads per VM; a resync reads at most
``MAX_MAP_ENTRIES`` entries, and resyncs and loss checks happen at most one at a time per VM.
"""

from __future__ import annotations

import asyncio
import json
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pvhost.errors import ChannelError
from pvhost.programs import SignedAffinityProgram, SignedProgram
from pvhost.services.affinity_event import EventError, decode, decode_tracked
from pvhost.services.affinity_tracker import AffinityTracker
from pvhost.services.base import ServiceContext, ServicePlugin, VmHandle
from pvproto import AffinityResult, AffinityUpdate, GuestDocument
from pvproto.messages import MAX_MAP_ENTRIES

__all__ = ["GENERIC_PROTOCOL", "LOST_CHECK_S", "AffinityService", "placement_document"]

#: The first protocol whose agents forward the affinity records instead of tracking them.
GENERIC_PROTOCOL = 4
#: Delay of the ring-buffer loss check after records arrive (one ``pv_state`` read per VM
#: and interval, however many records a storm brings).
LOST_CHECK_S = 0.05
_TRACKED_MAP = "pv_tracked"
_STATE_MAP = "pv_state"
_STATE_LOST = 1  # PV_STATE_LOST
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


def placement_document(result: AffinityResult) -> GuestDocument:
    """The answer to a generic agent: ``/run/pvagent/placement.json`` in the guest, the
    ``AffinityResult`` as JSON without its ``type`` — the keys and layout agents of protocol 2
    and 3 wrote from the results they were sent, plus (protocol 4) each pin's ``isolation``
    and ``isolation_reason``."""
    doc = result.model_dump(mode="json", exclude={"type"})
    return GuestDocument(name="placement", content=json.dumps(doc, indent=1))


@dataclass
class _Guest:
    """The host-side tracker of one VM whose agent forwards the affinity records."""

    tracker: AffinityTracker
    #: Serialises the table's changes: a resync's snapshot is applied before the records
    #: that came after it were read (they wait for the lock), never after them.
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    #: The ring-buffer overflows (``pv_state[PV_STATE_LOST]``) already resynchronised.
    lost_seen: int = 0
    check: asyncio.Task[None] | None = None
    resync: asyncio.Task[None] | None = None
    resyncs: int = 0
    #: The affinity program's id in this guest, once it loaded or sent records.
    program_id: str | None = None

    def cancel(self) -> None:
        for task in (self.check, self.resync):
            if task is not None:
                task.cancel()
        self.tracker.close()


class AffinityService(ServicePlugin):
    name = "affinity"
    summary = "guest thread CPU affinity → exclusive, isolated host pCPUs for the wanted vCPUs"

    def __init__(self, context: ServiceContext, config: None = None) -> None:
        super().__init__(context, config)
        if context.host is None:
            raise RuntimeError("the affinity service runs inside pvhost's Service")
        self.host = context.host
        settings = self.host.config.service
        self._program = SignedAffinityProgram(settings.affinity_program, settings.signing_key)
        #: For agents of protocol 2 and 3: the same object, its task iterator made inert.
        self._compat = SignedAffinityProgram(
            settings.affinity_program, settings.signing_key, compat=True
        )
        #: Why the program cannot be injected now (not built), shown in status.
        self.missing = ""
        #: Per VM whose agent is generic (protocol 4): its tracker.
        self._guests: dict[str, _Guest] = {}
        self._log = context.log

    def programs(self) -> Sequence[SignedProgram]:
        return self._signed(self._program)

    def programs_for(self, vm: VmHandle) -> Sequence[SignedProgram]:
        version = vm.protocol_version
        generic = version is None or version >= GENERIC_PROTOCOL
        return self._signed(self._program if generic else self._compat)

    def _signed(self, source: SignedAffinityProgram) -> Sequence[SignedProgram]:
        try:
            program = source()
        except ChannelError as err:  # not built: an operator's fix, not the plugin's failure
            self.missing = str(err)
            return []
        self.missing = ""
        return [program]

    def decode(self, program_id: str, record: bytes) -> object:
        return decode(record)  # EventError (a ValueError): counted as "layout", dropped

    # -- the tracker of a generic agent -------------------------------------------------------
    def _guest(self, vm: VmHandle) -> _Guest | None:
        """The VM's tracker if its agent is generic (made, or renewed for a new online set)."""
        version = vm.protocol_version
        if version is None or version < GENERIC_PROTOCOL or vm.topology is None:
            return None
        online = frozenset(vm.topology.online_vcpus)
        guest = self._guests.get(vm.name)
        if guest is not None and guest.tracker.online == online:
            return guest
        name = vm.name
        tracker = AffinityTracker(online, lambda update: self._publish(name, update))
        new = _Guest(tracker)
        if guest is not None:  # the guest's CPUs changed (TopologyUpdate, or a new Hello)
            tracker.replace_all(guest.tracker.threads)
            new.program_id, new.lost_seen, new.resyncs = (
                guest.program_id, guest.lost_seen, guest.resyncs
            )  # fmt: skip
            guest.cancel()
        self._guests[name] = new
        return new

    def _publish(self, vm: str, update: AffinityUpdate) -> None:
        record = self.host.vms.get(vm)
        if record is not None:
            record.session.submit_update(update)

    async def on_ready(self, vm: VmHandle) -> None:
        if self._guest(vm) is None:
            self._forget(vm.name)  # an older agent: it tracks, and says so itself

    async def on_topology(self, vm: VmHandle) -> None:
        """The guest's online CPUs changed (a hot-plugged vCPU came online): a mask is a
        request relative to them, so the tracker is renewed (``_guest``) and its table rebuilt
        from the kernel's ``pv_tracked`` (the threads' masks themselves, not the old requests:
        a mask that covered every online CPU may not cover the new set)."""
        guest = self._guest(vm)
        if guest is not None and guest.program_id is not None:
            self._resync_soon(vm, guest, guest.program_id, "the guest's online CPUs changed")

    async def on_loaded(self, vm: VmHandle, program_id: str) -> None:
        guest = self._guest(vm)
        if guest is not None:
            guest.program_id = program_id
            await self._resync(vm, guest, program_id, reason="program loaded")

    async def on_events(self, vm: VmHandle, program_id: str, events: Sequence[object]) -> None:
        guest = self._guest(vm)
        if guest is None:
            return  # an older agent does not forward these; a guest that does is ignored
        guest.program_id = program_id
        async with guest.lock:
            for event in events:
                guest.tracker.handle(event)  # type: ignore[arg-type]  # decode() made them
        if guest.check is None:
            guest.check = asyncio.get_running_loop().create_task(
                self._check_lost(vm, guest, program_id), name=f"affinity-lost-{vm.name}"
            )

    def on_records_lost(self, vm: VmHandle, program_id: str, count: int) -> None:
        guest = self._guests.get(vm.name)
        if guest is not None:
            self._resync_soon(vm, guest, program_id, f"{count} record(s) lost on the way")

    def _resync_soon(self, vm: VmHandle, guest: _Guest, program_id: str, reason: str) -> None:
        if guest.resync is None:  # one at a time: losses meanwhile are covered by it
            guest.resync = asyncio.get_running_loop().create_task(
                self._resync_task(vm, guest, program_id, reason), name=f"affinity-resync-{vm.name}"
            )

    async def _resync_task(self, vm: VmHandle, guest: _Guest, program_id: str, reason: str) -> None:
        try:
            await asyncio.sleep(LOST_CHECK_S)  # let the loss end (a storm) before reading
            await self._resync(vm, guest, program_id, reason=reason)
        finally:
            guest.resync = None

    async def _check_lost(self, vm: VmHandle, guest: _Guest, program_id: str) -> None:
        """Did the kernel's ring buffer overflow since the last look? Then resynchronise."""
        try:
            await asyncio.sleep(LOST_CHECK_S)
            lost = await self._lost_count(vm, program_id)
            if lost is not None and lost != guest.lost_seen:
                self._log.warning(
                    "%s: %d affinity record(s) lost in the guest (ring buffer full): "
                    "resynchronising", vm.name, lost - guest.lost_seen,
                )  # fmt: skip
                guest.lost_seen = lost
                self._resync_soon(vm, guest, program_id, "ring buffer overflow")
        finally:
            guest.check = None

    async def _lost_count(self, vm: VmHandle, program_id: str) -> int | None:
        try:
            contents = await vm.read_map(program_id, _STATE_MAP, max_entries=8)
        except ChannelError as err:
            self._log.debug("%s: cannot read %s: %s", vm.name, _STATE_MAP, err)
            return None
        for entry in contents.entries:
            if entry.key == _U32.pack(_STATE_LOST) and len(entry.value) == _U64.size:
                return int(_U64.unpack(entry.value)[0])
        return None

    async def _resync(self, vm: VmHandle, guest: _Guest, program_id: str, *, reason: str) -> None:
        """Replace the tracker's table by the program's ``pv_tracked`` map (tid → last mask).

        Under the VM's lock: records read by the agent after its snapshot wait, and are
        applied after it. Records from before it that are applied after it change nothing
        the newer ones do not change back: the last event of a thread is its state."""
        async with guest.lock:
            lost = await self._lost_count(vm, program_id)
            try:
                contents = await vm.read_map(program_id, _TRACKED_MAP, max_entries=MAX_MAP_ENTRIES)
            except ChannelError as err:
                # Not connected (any more): the next Hello loads, and resyncs, again.
                self._log.info("%s: cannot resynchronise (%s): %s", vm.name, reason, err)
                return
            if lost is not None:
                guest.lost_seen = lost
            masks: dict[int, frozenset[int]] = {}
            bad = 0
            for entry in contents.entries:
                try:
                    tid, cpus = decode_tracked(entry.key, entry.value)
                except EventError:
                    bad += 1
                    continue
                masks[tid] = cpus
            guest.resyncs += 1
            if contents.truncated:
                # More threads than one read carries: take these, keep what we knew of others.
                self._log.warning(
                    "%s: %s holds more than %d threads; resynchronised those",
                    vm.name, _TRACKED_MAP, MAX_MAP_ENTRIES,
                )  # fmt: skip
                merged = guest.tracker.threads
                merged.update(masks)
                masks = merged
            guest.tracker.replace_all(masks)
            self._log.info(
                "%s: resynchronised from the guest's %s (%s): %d thread(s)%s",
                vm.name, _TRACKED_MAP, reason, len(masks),
                f", {bad} malformed entries skipped" if bad else "",
            )  # fmt: skip

    def _forget(self, vm: str) -> None:
        guest = self._guests.pop(vm, None)
        if guest is not None:
            guest.cancel()

    # -- undo ----------------------------------------------------------------------------------
    async def on_vm_gone(self, vm: str) -> None:
        self._forget(vm)
        await self.host.undo_placements(vm)

    async def on_disable(self, vm: str) -> None:
        self._forget(vm)
        await self.host.undo_placements(vm, forget_wish=True)

    async def close(self) -> None:
        for vm in list(self._guests):
            self._forget(vm)

    # -- what the operator sees ----------------------------------------------------------------
    def threads(self, vm: str) -> dict[int, frozenset[int]] | None:
        """The host-side tracker's table of ``vm`` (None: its agent tracks in the guest)."""
        guest = self._guests.get(vm)
        return guest.tracker.threads if guest is not None else None

    def status(self, vm: str) -> Mapping[str, Any]:
        record = self.host.vms.get(vm)
        pins = self.host.backend.pins().get(vm, {})
        out: dict[str, Any] = {
            "wanted": list(record.wanted) if record is not None else [],
            "pinned": {str(v): p for v, p in sorted(pins.items())},
        }
        guest = self._guests.get(vm)
        if guest is not None:
            out["tracker"] = {
                "where": "host",
                "threads": len(guest.tracker.threads),
                "resyncs": guest.resyncs,
                "overflowed": guest.tracker.overflowed,
            }
        elif record is not None and record.session.protocol_version is not None:
            out["tracker"] = {"where": "guest"}
        if self.missing:
            out["program"] = f"not injected: {self.missing}"
        return out

    def metrics(self) -> Mapping[str, float]:
        return {
            "pinned_vcpus": float(sum(len(p) for p in self.host.backend.pins().values())),
            "tracked_threads": float(sum(len(g.tracker.threads) for g in self._guests.values())),
        }
