"""The memory service: guest memory pressure → host memory, through QEMU's virtio-balloon.

Its program is ``bpf/memory.bpf.c`` (layout ``bpf/memory.h``, decoded by
:mod:`pvhost.services.memory_event`): one record per direct reclaim the guest's tasks stalled
in (how long, pages freed) and one per OOM victim. Each window (``window_s``), and at once
when a batch carries pressure, :func:`pvhost.services.memory_policy.decide` turns what the
guest reported into a balloon target: under pressure the balloon deflates (the guest gets
memory, within the VM's maximum and never taking the host's MemAvailable below
``host_floor_mib``); after ``quiet_s`` without pressure it inflates step by step back to the
VM's minimum, each step only when the guest's balloon statistics, taken after the last change
settled, show it keeps ``guest_reserve_mib`` available after it; at most
``max_changes_per_s`` changes per second per VM, whatever the guest sends. Every decision
that changes something, and every refusal under pressure, is logged with its reason, kept in
``pvctl status`` (the last ones) and counted in ``/metrics``.

Records get lost (the ring buffer, an agent without a ready connection, pvhost's bounds), and
a lost OOM record is followed by no other. The program also counts its events in its
``pv_mem_state`` map; the service reads it (``read_map``) when the program is loaded, on a
lost-records notice and on its timer (at most one read in flight per VM, at most one every
:data:`MIN_READ_GAP_S` whatever the guest does), and what the received records did not account
for is pressure like theirs (:mod:`pvhost.services.memory_resync`).

When the service is disabled for a VM, or pvhost closes the VM's session (pvhost stops, the
VM's directory went away), the balloon goes back to the VM's configured size (QEMU's
``base-memory``): extpv leaves no guest short of memory behind it.

QMP goes through :meth:`VmHandle.qmp`, which lets a service send only the balloon commands
and read the balloon's guest statistics (``qom-get guest-stats``; QEMU asks the guest for them
every :data:`STATS_INTERVAL_S` while the service runs, and stops again when it ends, unless
someone else had asked first).
Off by default: ``[services] enabled = ["affinity", "memory"]`` or per VM.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from extpv import bpfobj
from extpv.bpfobj import ObjectMissing
from pvhost.errors import ChannelError, QmpError
from pvhost.programs import SignedProgram, file_stamp
from pvhost.services.base import EventError, ServiceContext, ServicePlugin, VmHandle
from pvhost.services.memory_event import (
    STATE_MAP,
    STATE_SLOTS,
    MemoryEvent,
    MemoryKind,
    decode_counters,
    decode_event,
)
from pvhost.services.memory_policy import (
    Bounds,
    Decision,
    Policy,
    VmMemoryState,
    WindowStats,
    decide,
    guest_is_low,
)
from pvhost.services.memory_resync import CounterSync, Resync

__all__ = ["MemoryConfig", "MemoryService", "host_available_mib"]

_log = logging.getLogger(__name__)
MIB = 1024 * 1024
PROGRAM_ID = "memory"
#: Decisions kept per VM for ``pvctl status``.
_HISTORY = 20
#: How often QEMU asks the guest's balloon driver for its statistics (s; QOM takes whole
#: seconds), when nobody had set it before.
STATS_INTERVAL_S = 1
#: Where the QOM tree keeps devices with and without an ``id``.
_PERIPHERALS = ("/machine/peripheral", "/machine/peripheral-anon")
#: A u64 statistic the guest's driver never reported reads as -1 (all bits set).
_STAT_UNSET = 1 << 63
#: The least time between two reads of the program's counters (s): on the timer every
#: ``window_s`` (or this, if longer); a load or a lost-records notice reads at once unless
#: one was started less than this ago (the timer's next read covers it).
MIN_READ_GAP_S = 0.5
#: How long after a read its counts are compared with the records received (s): records of
#: events just before it may still be on their way (the agent's batch, pvhost's queue).
CONFIRM_S = 2.0
#: How long a read of the counters may take (s; a guest that does not answer is retried at
#: the next window).
READ_TIMEOUT_S = 5.0


class VmBoundsConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    min_mib: Annotated[int, Field(ge=64)] | None = None
    max_mib: Annotated[int, Field(ge=64)] | None = None


class MemoryConfig(BaseModel):
    """``[services.memory]``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    #: The least a VM's balloon target goes to after quiet (MiB).
    min_mib: Annotated[int, Field(ge=64)] = 512
    #: The most it goes to under pressure (None: the VM's configured size, which QEMU caps).
    max_mib: Annotated[int, Field(ge=64)] | None = None
    #: The host's MemAvailable never goes below this because of a deflation.
    host_floor_mib: Annotated[int, Field(ge=0)] = 1024
    step_mib: Annotated[int, Field(ge=1, le=1 << 20)] = 128
    quiet_s: Annotated[float, Field(gt=0, le=86400)] = 30.0
    window_s: Annotated[float, Field(gt=0, le=3600)] = 1.0
    max_changes_per_s: Annotated[float, Field(gt=0, le=100)] = 1.0
    #: Direct-reclaim stall per window that counts as pressure (0: any reclaim).
    stall_ms: Annotated[float, Field(ge=0)] = 0.0
    #: What a guest keeps available (its MemAvailable, MiB): no inflation leaves it less,
    #: and a guest reporting less gets a step (early pressure, before any reclaim).
    guest_reserve_mib: Annotated[int, Field(ge=0)] = 128
    #: Inflate after quiet without the guest's balloon statistics (guests whose driver does
    #: not report them): the guest may then be short of memory it is using.
    inflate_without_guest_stats: bool = False
    #: Where MemAvailable is read (tests point it at a file of their own).
    meminfo: Path = Path("/proc/meminfo")
    #: Per-VM bounds: ``[services.memory.vms.NAME] min_mib/max_mib``.
    vms: dict[str, VmBoundsConfig] = {}

    @model_validator(mode="after")
    def _ordered(self) -> MemoryConfig:
        for name, vm in {"": VmBoundsConfig(), **self.vms}.items():
            low = vm.min_mib or self.min_mib
            high = vm.max_mib or self.max_mib
            if high is not None and high < low:
                where = f"vms.{name}" if name else "the defaults"
                raise ValueError(f"{where}: max_mib {high} is below min_mib {low}")
        return self

    def policy(self) -> Policy:
        return Policy(
            step_mib=self.step_mib,
            quiet_s=self.quiet_s,
            host_floor_mib=self.host_floor_mib,
            max_changes_per_s=self.max_changes_per_s,
            stall_ms=self.stall_ms,
            guest_reserve_mib=self.guest_reserve_mib,
            inflate_without_guest_stats=self.inflate_without_guest_stats,
        )


def host_available_mib(meminfo: Path) -> int:
    """The host's MemAvailable (MiB); 0 when it cannot be read (no deflation then)."""
    try:
        text = meminfo.read_text()
    except OSError as err:
        _log.warning("cannot read %s: %s", meminfo, err)
        return 0
    for line in text.splitlines():
        if line.startswith("MemAvailable:"):
            parts = line.split()
            with contextlib.suppress(IndexError, ValueError):
                return int(parts[1]) // 1024  # kB
    return 0


@dataclass
class _Vm:
    handle: VmHandle
    #: QEMU's base-memory (what the balloon goes back to); None before it was asked.
    configured_mib: int | None = None
    bounds: Bounds = field(default_factory=lambda: Bounds(0, 0))
    state: VmMemoryState = field(default_factory=lambda: VmMemoryState(0))
    window: WindowStats = field(default_factory=WindowStats)
    actual_mib: int | None = None
    #: The balloon device's QOM path (its guest statistics); None: not found (yet).
    balloon_path: str | None = None
    #: QEMU was asked to poll the guest's statistics (by the service or someone before it).
    stats_asked: bool = False
    #: The polling interval was 0 and the service set it (undone when the service ends).
    stats_polling_set: bool = False
    #: time.time() when the balloon was first seen at its target since the last change.
    settled_at: float | None = None
    #: The guest's last statistics: (QEMU's last-update, whole seconds; MemAvailable MiB).
    guest_stats: tuple[int, int] | None = None
    #: Why there are none (shown in status).
    guest_stats_note: str = "not asked yet"
    problem: str = ""
    reclaims: int = 0
    stall_ns: int = 0
    ooms: int = 0
    #: The guest pid the OOM killer last picked (what the guest said; shown, never acted on).
    last_oom_pid: int | None = None
    #: When the first pressure of the current episode arrived, and how long its first
    #: balloon change took from there (ms; the service's reaction time).
    first_pressure: float | None = None
    reaction_ms: float | None = None
    #: How long QEMU took to answer the last ``balloon`` command (ms).
    balloon_qmp_ms: float | None = None
    #: Deflated since the last inflation: later pressure is the same episode.
    deflated: bool = False
    history: collections.deque[dict[str, Any]] = field(
        default_factory=lambda: collections.deque(maxlen=_HISTORY)
    )
    last_hold: str = ""
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    ticker: asyncio.Task[None] | None = None
    #: The program's counters against the records received (memory_resync).
    sync: CounterSync = field(default_factory=lambda: CounterSync(CONFIRM_S))
    #: The program is loaded in the guest (its agent said so since its last Hello).
    loaded: bool = False
    #: The read of the counters in flight (one at a time), and when the last one started.
    reader: asyncio.Task[None] | None = None
    read_started: float = float("-inf")
    read_error: str = ""
    read_errors: int = 0
    #: Lost-records notices from the agent or pvhost's bounds (records, total).
    lost_notices: int = 0
    lost_records: int = 0
    #: Events the counters showed that no record had: pressure all the same.
    resynced_reclaims: int = 0
    resynced_stall_ns: int = 0
    resynced_ooms: int = 0


class MemoryService(ServicePlugin):
    name = "memory"
    summary = "guest reclaim stalls and OOM kills → virtio-balloon deflate; inflate after quiet"
    Config = MemoryConfig

    def __init__(self, context: ServiceContext, config: BaseModel | None = None) -> None:
        super().__init__(context, config)
        self.settings = config if isinstance(config, MemoryConfig) else MemoryConfig()
        self.policy = self.settings.policy()
        self._vms: dict[str, _Vm] = {}
        self._program: SignedProgram | None = None
        self._program_stamp: object = None
        self.missing = ""
        self.counts: collections.Counter[str] = collections.Counter()

    # -- program and records -------------------------------------------------------------------
    def programs(self) -> Sequence[SignedProgram]:
        try:
            path = bpfobj.path("memory.bpf.o")
        except ObjectMissing as err:  # not built: an operator's fix, shown in status
            self.missing = str(err)
            return []
        self.missing = ""
        stamp = (file_stamp(path), file_stamp(self.context.signing_key))
        if self._program is None or stamp != self._program_stamp:
            self._program = self.context.sign(PROGRAM_ID, "bpf-object", path.read_bytes())
            self._program_stamp = stamp
        return [self._program]

    def decode(self, program_id: str, record: bytes) -> MemoryEvent:
        return decode_event(record)

    # -- hooks ------------------------------------------------------------------------------------
    async def on_ready(self, vm: VmHandle) -> None:
        known = self._vms.get(vm.name)
        if known is None:
            known = self._vms[vm.name] = _Vm(vm)
        known.handle = vm
        known.loaded = False  # its Hello: the program's verdict (on_loaded) comes next
        if known.configured_mib is None:
            try:
                summary = await vm.qmp("query-memory-size-summary")
                balloon = await vm.qmp("query-balloon")
                configured = int(summary["base-memory"]) // MIB  # type: ignore[index]
                actual = int(balloon["actual"]) // MIB  # type: ignore[index]
            except (QmpError, ChannelError, KeyError, TypeError, ValueError) as err:
                known.problem = f"no balloon: {err}"
                self.context.log.warning("%s: memory service inactive: %s", vm.name, err)
                return
            known.problem = ""
            known.configured_mib = configured
            known.actual_mib = actual
            known.state = VmMemoryState(actual)
            known.bounds = self._bounds(vm.name, configured)
        if not self.settings.inflate_without_guest_stats and not known.stats_asked:
            try:
                await self._ask_guest_stats(known)
            except (QmpError, ChannelError, KeyError, TypeError, ValueError) as err:
                known.guest_stats_note = f"cannot ask the guest for statistics: {err}"[:300]
        if known.ticker is None or known.ticker.done():
            known.ticker = asyncio.get_running_loop().create_task(
                self._tick(known), name=f"memory-{vm.name}"
            )

    async def _ask_guest_stats(self, known: _Vm) -> None:
        """Find the balloon device and have QEMU poll the guest's statistics."""
        vm = known.handle
        if known.balloon_path is None:
            known.balloon_path = await _find_balloon(vm)
            if known.balloon_path is None:
                known.guest_stats_note = "no virtio-balloon device in QEMU's QOM tree"
                return
        where = {"path": known.balloon_path, "property": "guest-stats-polling-interval"}
        if int(await vm.qmp("qom-get", where)) == 0:  # type: ignore[call-overload]
            await vm.qmp("qom-set", {**where, "value": STATS_INTERVAL_S})
            known.stats_polling_set = True
        known.stats_asked = True
        known.guest_stats_note = "none yet"

    async def _refresh(self, known: _Vm) -> None:
        """The balloon's actual size, and the guest's statistics, as QEMU has them now."""
        reply: Any = await known.handle.qmp("query-balloon")
        actual = int(reply["actual"])
        known.actual_mib = actual // MIB
        if abs(actual - known.state.target_mib * MIB) <= MIB:
            if known.settled_at is None:
                known.settled_at = time.time()
        else:  # the driver is still at it (or gave memory back on its own)
            known.settled_at = None
        if known.balloon_path is None or self.settings.inflate_without_guest_stats:
            return
        try:
            stats: Any = await known.handle.qmp(
                "qom-get", {"path": known.balloon_path, "property": "guest-stats"}
            )
        except QmpError as err:
            known.guest_stats_note = str(err)[:200]
            return
        if int(stats["last-update"]) == 0:
            known.guest_stats_note = "the guest reported none yet (is its balloon driver loaded?)"
            return
        available = int(stats["stats"]["stat-available-memory"])
        if not 0 <= available < _STAT_UNSET:
            known.guest_stats_note = "the guest's driver does not report its MemAvailable"
            return
        known.guest_stats = (int(stats["last-update"]), available // MIB)
        known.guest_stats_note = ""

    def _stats_state(self, known: _Vm) -> str:
        if self.settings.inflate_without_guest_stats:
            return "not used (inflate_without_guest_stats)"
        if known.guest_stats_note:
            return known.guest_stats_note
        return "fresh" if self._guest_available(known) is not None else "older than the last change"

    @staticmethod
    def _guest_available(known: _Vm) -> int | None:
        """The guest's MemAvailable, if reported after the balloon last settled."""
        if known.settled_at is None or known.guest_stats is None:
            return None
        at, available = known.guest_stats
        return available if at >= int(known.settled_at) + 1 else None

    async def on_events(self, vm: VmHandle, program_id: str, events: Sequence[object]) -> None:
        known = self._vms.get(vm.name)
        if known is None:
            return
        reclaims = stall = ooms = 0
        for event in events:
            if not isinstance(event, MemoryEvent):
                continue
            if event.kind is MemoryKind.RECLAIM:
                reclaims += 1
                stall += event.duration_ns
            elif event.kind is MemoryKind.OOM:
                ooms += 1
                known.last_oom_pid = event.pid
        known.reclaims += reclaims
        known.stall_ns += stall
        known.ooms += ooms
        known.sync.received(reclaims, stall, ooms)
        self.counts["reclaim_events"] += reclaims
        self.counts["oom_kills"] += ooms
        await self._pressure(known, reclaims, stall, ooms)

    async def _pressure(self, known: _Vm, reclaims: int, stall: int, ooms: int) -> None:
        """Add to the window what records (or the counters) reported; evaluate if pressure."""
        w = known.window
        known.window = WindowStats(w.reclaims + reclaims, w.stall_ns + stall, w.ooms + ooms)
        if reclaims or ooms:
            if known.first_pressure is None and not known.deflated:
                known.first_pressure = time.monotonic()
            try:  # answer pressure now, not at the window's end
                await self._evaluate(known)
            except (QmpError, ChannelError) as err:  # QEMU's monitor: retried next window
                known.problem = str(err)[:300]

    # -- resynchronisation from the program's counters ---------------------------------------
    async def on_loaded(self, vm: VmHandle, program_id: str) -> None:
        known = self._vms.get(vm.name)
        if known is None or program_id != PROGRAM_ID:
            return
        known.loaded = True
        self._read_soon(known, "program loaded")

    def on_records_lost(self, vm: VmHandle, program_id: str, count: int) -> None:
        known = self._vms.get(vm.name)
        if known is None or program_id != PROGRAM_ID:
            return
        known.lost_notices += 1
        known.lost_records += max(0, count)
        self.counts["lost_records"] += max(0, count)
        self._read_soon(known, f"{count} record(s) lost")

    def _read_soon(self, known: _Vm, reason: str, *, timer: bool = False) -> None:
        """Read the counters now, unless a read is in flight or one started too recently (a
        guest's notices cannot raise the rate: the timer reads again within a window)."""
        if not known.loaded or (known.reader is not None and not known.reader.done()):
            return
        now = time.monotonic()
        gap = max(MIN_READ_GAP_S, self.settings.window_s) if timer else MIN_READ_GAP_S
        if now - known.read_started < gap:
            return
        known.read_started = now
        known.reader = asyncio.get_running_loop().create_task(
            self._read_counters(known, reason), name=f"memory-counters-{known.handle.name}"
        )

    async def _read_counters(self, known: _Vm, reason: str) -> None:
        vm = known.handle
        try:
            contents = await vm.read_map(
                PROGRAM_ID, STATE_MAP, max_entries=STATE_SLOTS, timeout=READ_TIMEOUT_S
            )
            counters = decode_counters(
                [(e.key, e.value) for e in contents.entries], truncated=contents.truncated
            )
        except (ChannelError, EventError) as err:
            # Not connected, an agent without ReadMap, a program without the counters (an
            # operator's older object), or a hostile answer: the next window tries again.
            known.read_errors += 1
            self.counts["counter_read_errors"] += 1
            why = str(err)[:300]
            if why != known.read_error:  # logged once per change of reason
                self.context.log.info(
                    "%s: cannot read %s (%s): %s", vm.name, STATE_MAP, reason, why
                )
            known.read_error = why
            return
        known.read_error = ""
        self.counts["counter_reads"] += 1
        await self._resynced(known, known.sync.observe(time.monotonic(), counters), reason)

    async def _resynced(self, known: _Vm, found: Resync, reason: str) -> None:
        missing = found.missing
        if not found.pressure:
            return
        known.resynced_reclaims += missing.reclaims
        known.resynced_stall_ns += missing.stall_ns
        known.resynced_ooms += missing.ooms
        self.counts["resynced_reclaims"] += missing.reclaims
        self.counts["resynced_ooms"] += missing.ooms
        self.context.log.warning(
            "%s: the guest's counters show %d reclaim(s) (%.1f ms stalled) and %d OOM kill(s) "
            "no record reported (%s): pressure",
            known.handle.name, missing.reclaims, missing.stall_ns / 1e6, missing.ooms, reason,
        )  # fmt: skip
        await self._pressure(known, missing.reclaims, missing.stall_ns, missing.ooms)

    async def on_closing(self, vm: VmHandle) -> None:
        await self._restore(vm.name)

    async def on_disable(self, vm: str) -> None:
        await self._restore(vm)

    async def on_vm_gone(self, vm: str) -> None:
        known = self._vms.pop(vm, None)  # QEMU went away: so did its balloon
        if known is not None:
            for task in (known.ticker, known.reader):
                if task is not None:
                    task.cancel()

    async def close(self) -> None:
        for name in list(self._vms):
            await self.on_vm_gone(name)

    # -- decisions ------------------------------------------------------------------------------
    def _bounds(self, vm: str, configured: int) -> Bounds:
        per_vm = self.settings.vms.get(vm, VmBoundsConfig())
        high = min(configured, per_vm.max_mib or self.settings.max_mib or configured)
        low = min(high, per_vm.min_mib or self.settings.min_mib)
        return Bounds(low, high)

    async def _tick(self, known: _Vm) -> None:
        while True:
            await asyncio.sleep(self.settings.window_s)
            self._read_soon(known, "window", timer=True)
            try:
                await self._refresh(known)
                await self._evaluate(known)
            except (QmpError, ChannelError, KeyError, TypeError, ValueError) as err:
                known.problem = str(err)[:300]

    async def _evaluate(self, known: _Vm) -> None:
        async with known.lock:
            if known.configured_mib is None:
                return
            now = time.monotonic()
            stats, known.window = known.window, WindowStats()
            available = await asyncio.to_thread(host_available_mib, self.settings.meminfo)
            guest = self._guest_available(known)
            decision = decide(
                now,
                known.state,
                stats,
                known.bounds,
                host_available_mib=available,
                guest_available_mib=guest,
                policy=self.policy,
            )
            if stats.ooms or stats.reclaims or guest_is_low(guest, self.policy):
                known.state.last_pressure = now
            self.counts[f"decisions_{decision.code}"] += 1
            if decision.target_mib is None:
                if decision.code in {"host-floor", "at-max"}:
                    known.first_pressure = None  # not answerable: no reaction to time
                self._hold(known, decision, stats)
                return
            sent = time.monotonic()
            await known.handle.qmp("balloon", {"value": decision.target_mib * MIB})
            known.balloon_qmp_ms = round((time.monotonic() - sent) * 1e3, 3)
            known.state.target_mib = decision.target_mib
            known.state.last_change = now
            known.settled_at = None
            known.problem = ""
            if decision.action == "deflate" and known.first_pressure is not None:
                known.reaction_ms = round((time.monotonic() - known.first_pressure) * 1e3, 3)
                known.first_pressure = None
            known.deflated = decision.action == "deflate"
            self.counts[decision.action] += 1
            self._record(known, decision, available, guest)

    def _hold(self, known: _Vm, decision: Decision, stats: WindowStats) -> None:
        # Quiet holds (nothing to do) are counted only; a refusal under pressure is logged
        # once per change of reason, so a storm cannot flood the log.
        if not (stats.reclaims or stats.ooms) or decision.code == known.last_hold:
            return
        known.last_hold = decision.code
        self._record(known, decision, None)

    def _record(
        self,
        known: _Vm,
        decision: Decision,
        available: int | None,
        guest: int | None = None,
    ) -> None:
        if decision.target_mib is not None:
            known.last_hold = ""
        entry = {
            "at": time.time(),
            "action": decision.action,
            "target_mib": decision.target_mib or known.state.target_mib,
            "reason": decision.reason,
        }
        if available is not None:
            entry["host_available_mib"] = available
        if guest is not None:
            entry["guest_available_mib"] = guest
        known.history.append(entry)
        self.context.log.info(
            "%s: %s → %d MiB: %s",
            known.handle.name,
            decision.action,
            entry["target_mib"],
            decision.reason,
        )

    async def _restore(self, vm: str) -> None:
        """Balloon back to the VM's configured size (disable, session closing)."""
        known = self._vms.get(vm)
        if known is None:
            return
        for task in (known.ticker, known.reader):
            if task is not None:
                task.cancel()
        known.ticker = known.reader = None
        known.loaded = False
        known.sync.reset()  # the program is unloaded: a new one counts from 0
        async with known.lock:
            await self._stop_guest_stats(known)
            configured = known.configured_mib
            if configured is None or known.state.target_mib == configured:
                return
            try:
                await known.handle.qmp("balloon", {"value": configured * MIB})
            except (QmpError, ChannelError) as err:  # QEMU gone: its balloon went with it
                self.context.log.info("%s: balloon not restored: %s", vm, err)
                return
            known.state.target_mib = configured
            self.counts["restore"] += 1
            self._record(
                known,
                Decision(configured, "restore", "service stopped for the VM", "restore"),
                None,
            )

    async def _stop_guest_stats(self, known: _Vm) -> None:
        """Undo :meth:`_ask_guest_stats`: QEMU stops polling if it did not before."""
        known.stats_asked = False
        known.guest_stats = None
        known.guest_stats_note = "not asked (the service is not running for the VM)"
        if not known.stats_polling_set or known.balloon_path is None:
            return
        known.stats_polling_set = False
        where = {"path": known.balloon_path, "property": "guest-stats-polling-interval"}
        try:
            await known.handle.qmp("qom-set", {**where, "value": 0})
        except (QmpError, ChannelError) as err:  # QEMU gone: so is its polling
            self.context.log.info(
                "%s: balloon statistics polling not stopped: %s", known.handle.name, err
            )

    # -- what the operator sees -------------------------------------------------------------
    def status(self, vm: str) -> Mapping[str, Any]:
        known = self._vms.get(vm)
        out: dict[str, Any] = {}
        if self.missing:
            out["program"] = f"not injected: {self.missing}"
        if known is None:
            return out
        if known.problem:
            out["problem"] = known.problem
        if known.configured_mib is not None:
            out.update(
                configured_mib=known.configured_mib,
                target_mib=known.state.target_mib,
                actual_mib=known.actual_mib,
                min_mib=known.bounds.min_mib,
                max_mib=known.bounds.max_mib,
            )
        out.update(
            reclaims=known.reclaims,
            stall_ms=round(known.stall_ns / 1e6, 3),
            oom_kills=known.ooms,
            resynced_reclaims=known.resynced_reclaims,
            resynced_stall_ms=round(known.resynced_stall_ns / 1e6, 3),
            resynced_ooms=known.resynced_ooms,
            counters=self._counters_state(known),
            last_oom_pid=known.last_oom_pid,
            guest_available_mib=None if known.guest_stats is None else known.guest_stats[1],
            guest_stats=self._stats_state(known),
            reaction_ms=known.reaction_ms,
            balloon_qmp_ms=known.balloon_qmp_ms,
            decisions=list(known.history),
        )
        return out

    @staticmethod
    def _counters_state(known: _Vm) -> dict[str, Any]:
        """The program's counters as last read, and how the reading goes."""
        sync = known.sync
        out: dict[str, Any] = {
            "reads": sync.reads,
            "baselines": sync.baselines,
            "read_errors": known.read_errors,
            "lost_notices": known.lost_notices,
            "lost_records": known.lost_records,
        }
        if sync.last is not None:
            out.update(
                guest_reclaims=sync.last.reclaims,
                guest_ooms=sync.last.ooms,
                guest_ringbuf_lost=sync.last.lost,
            )
        if known.read_error:
            out["last_error"] = known.read_error
        return out

    def metrics(self) -> Mapping[str, float]:
        out = {key: float(value) for key, value in self.counts.items()}
        out["balloon_target_mib"] = float(
            sum(v.state.target_mib for v in self._vms.values() if v.configured_mib is not None)
        )
        return out


async def _find_balloon(vm: VmHandle) -> str | None:
    """The QOM path of the VM's (first) virtio-balloon device; None: it has none."""
    for parent in _PERIPHERALS:
        children: Any = await vm.qmp("qom-list", {"path": parent})
        for child in children:
            if str(child["type"]).startswith("child<virtio-balloon"):
                return f"{parent}/{child['name']}"
    return None
