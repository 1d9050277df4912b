"""The memory service's parts that need no VM (issue #12): its record layout against
``bpf/memory.h``, its config, and its decisions (a pure function of state and window)."""

from __future__ import annotations

import itertools
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from pydantic import ValidationError

from pvhost.config import ServicesConfig
from pvhost.services import EventError, discover
from pvhost.services.memory import MemoryConfig, MemoryService, host_available_mib
from pvhost.services.memory_event import (
    EVENT_FORMAT,
    EVENT_SIZE,
    STATE_SLOTS,
    MemoryCounters,
    MemoryKind,
    StateSlot,
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
)
from pvhost.services.memory_resync import MAX_DELTA, CounterSync

pytestmark = pytest.mark.memory

ROOT = Path(__file__).resolve().parents[2]
PRESSURE = WindowStats(reclaims=3, stall_ns=5_000_000)
QUIET = WindowStats()
BOUNDS = Bounds(512, 2048)
POLICY = Policy(step_mib=128, quiet_s=10, host_floor_mib=1000, max_changes_per_s=2)


def _decide(  # noqa: PLR0917 - decide()'s order, positional for brevity
    now: float, state: VmMemoryState, stats: WindowStats, bounds: Bounds, host: int,
    policy: Policy = POLICY, guest: int | None = 4096,
) -> Decision:  # fmt: skip
    return decide(
        now, state, stats, bounds, host_available_mib=host, guest_available_mib=guest,
        policy=policy,
    )  # fmt: skip


def test_the_python_layout_mirrors_the_header(tmp_path: Path) -> None:
    """memory.h is the one definition: compile it and compare sizes, offsets and kinds."""
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    assert cc is not None, "a C compiler is needed (the eBPF build needs one anyway)"
    source = tmp_path / "layout.c"
    source.write_text(
        "#include <stdio.h>\n#include <stddef.h>\n#include <linux/types.h>\n"
        '#include "memory.h"\n'
        "#define O(f) (int)offsetof(struct pv_memory_event, f)\n"
        'int main(void) { printf("%d %d %d %d %d %d %d %d %d %d %d %d %d\\n", (int)sizeof(struct '
        "pv_memory_event), O(kind), O(pid), O(ktime_ns), O(duration_ns), O(nr_reclaimed), "
        "PV_MEMORY_RECLAIM, PV_MEMORY_OOM, PV_MEM_STATE_LOST, PV_MEM_STATE_RECLAIMS, "
        "PV_MEM_STATE_STALL_NS, PV_MEM_STATE_OOMS, PV_MEM_STATE_SLOTS); return 0; }\n"
    )
    binary = tmp_path / "layout"
    subprocess.run([cc, "-I", str(ROOT / "bpf"), "-o", str(binary), str(source)], check=True)
    numbers = [int(n) for n in subprocess.run([str(binary)], capture_output=True,
                                              check=True, text=True).stdout.split()]  # fmt: skip
    size, *offsets, reclaim, oom = numbers[:8]
    assert size == EVENT_SIZE == struct.calcsize(EVENT_FORMAT)
    expected = [0, 4, 8, 16, 24]
    assert offsets == expected
    assert (reclaim, oom) == (MemoryKind.RECLAIM, MemoryKind.OOM)
    *slots, count = numbers[8:]
    assert slots == [StateSlot.LOST, StateSlot.RECLAIMS, StateSlot.STALL_NS, StateSlot.OOMS]
    assert count == STATE_SLOTS == len(slots)


def test_records_are_decoded_and_bad_ones_refused() -> None:
    event = decode_event(struct.pack(EVENT_FORMAT, 1, 42, 7, 3_000_000, 12))
    assert (event.kind, event.pid, event.duration_ns, event.nr_reclaimed) == (
        MemoryKind.RECLAIM, 42, 3_000_000, 12)  # fmt: skip
    with pytest.raises(EventError, match="32 bytes, not 31"):
        decode_event(bytes(31))
    with pytest.raises(EventError, match="unknown memory event kind 9"):
        decode_event(struct.pack(EVENT_FORMAT, 9, 0, 0, 0, 0))


def test_pressure_deflates_by_a_step_within_the_maximum() -> None:
    d = _decide(100.0, VmMemoryState(1024), PRESSURE, BOUNDS, 8000, POLICY)
    assert (d.target_mib, d.action, d.code) == (1152, "deflate", "pressure")
    assert "3 reclaims" in d.reason and "+128 MiB" in d.reason
    d = _decide(100.0, VmMemoryState(2000), PRESSURE, BOUNDS, 8000, POLICY)
    assert d.target_mib == 2048
    d = _decide(100.0, VmMemoryState(2048), PRESSURE, BOUNDS, 8000, POLICY)
    assert (d.target_mib, d.code) == (None, "at-max")


def test_an_oom_kill_is_pressure_worth_two_steps() -> None:
    d = _decide(100.0, VmMemoryState(1024), WindowStats(ooms=1), BOUNDS, 8000, POLICY)
    assert d.target_mib == 1024 + 256 and "1 OOM kills" in d.reason


def test_the_host_floor_caps_and_refuses_a_deflation() -> None:
    d = _decide(100.0, VmMemoryState(1024), PRESSURE, BOUNDS, 1050, POLICY)
    assert d.target_mib == 1074 and "capped by the host floor" in d.reason
    d = _decide(100.0, VmMemoryState(1024), PRESSURE, BOUNDS, 1000, POLICY)
    assert (d.target_mib, d.code) == (None, "host-floor")
    assert "1000 MiB available, floor 1000 MiB" in d.reason


def test_changes_are_rate_limited() -> None:
    state = VmMemoryState(1024, last_change=99.8)
    assert _decide(100.0, state, PRESSURE, BOUNDS, 8000, POLICY).code == "rate"
    assert _decide(100.3, state, PRESSURE, BOUNDS, 8000, POLICY).code == "pressure"


def test_a_stall_below_the_threshold_is_not_pressure() -> None:
    policy = Policy(step_mib=128, quiet_s=10, host_floor_mib=0, stall_ms=10)
    state = VmMemoryState(1024)
    assert _decide(100.0, state, PRESSURE, BOUNDS, 8000, policy).action != "deflate"
    heavy = WindowStats(reclaims=1, stall_ns=10_000_000)
    assert _decide(100.0, state, heavy, BOUNDS, 8000, policy).action == "deflate"


def test_quiet_inflates_step_by_step_to_the_minimum() -> None:
    state = VmMemoryState(700, last_pressure=95.0)
    assert _decide(100.0, state, QUIET, BOUNDS, 8000, POLICY).code == "recent-pressure"
    d = _decide(105.0, state, QUIET, BOUNDS, 8000, POLICY)
    assert (d.target_mib, d.action) == (572, "inflate")
    state.target_mib = 572
    assert _decide(105.0, state, QUIET, BOUNDS, 8000, POLICY).target_mib == 512
    state.target_mib = 512
    assert _decide(105.0, state, QUIET, BOUNDS, 8000, POLICY).code == "at-min"


def test_quiet_inflates_only_what_the_guest_can_spare() -> None:
    """No pressure is not memory to spare: a guest just given memory stops stalling because it
    uses it. Inflation needs the guest's MemAvailable (reported after the last change settled)
    to stay at or above the reserve after the step."""
    state = VmMemoryState(1024, last_pressure=0.0)
    d = _decide(100.0, state, QUIET, BOUNDS, 8000, guest=None)
    assert (d.target_mib, d.code) == (None, "guest-stats")
    d = _decide(100.0, state, QUIET, BOUNDS, 8000, guest=128 + 127)
    assert (d.target_mib, d.code) == (None, "guest-in-use")
    assert "255 MiB available" in d.reason and "reserve of 128 MiB" in d.reason
    d = _decide(100.0, state, QUIET, BOUNDS, 8000, guest=128 + 128)
    assert (d.target_mib, d.action) == (896, "inflate")
    # The last, partial step to the minimum needs only what it takes.
    state.target_mib = 560
    assert _decide(100.0, state, QUIET, BOUNDS, 8000, guest=128 + 48).target_mib == 512
    # Pressure never waits for the guest's statistics.
    assert _decide(100.0, state, PRESSURE, BOUNDS, 8000, guest=None).action == "deflate"
    # An operator's explicit choice for guests that report none.
    blind = Policy(step_mib=128, quiet_s=10, inflate_without_guest_stats=True)
    assert _decide(100.0, state, QUIET, BOUNDS, 8000, blind, guest=None).target_mib == 512


def test_a_guest_below_its_reserve_is_given_a_step_before_it_reclaims() -> None:
    """Reclaim comes late (a guest without page cache goes from its first direct reclaim to an
    OOM kill in milliseconds): MemAvailable below the reserve, reported after the last change
    settled, deflates by a step with no reclaim at all, within the same bounds as pressure."""
    state = VmMemoryState(512)
    d = _decide(100.0, state, QUIET, BOUNDS, 8000, guest=127)
    assert (d.target_mib, d.action, d.code) == (640, "deflate", "low-available")
    assert "127 MiB available, below its reserve of 128 MiB" in d.reason
    assert _decide(100.0, state, QUIET, BOUNDS, 8000, guest=128).action != "deflate"
    # No report since the last change settled: nothing to go on, no step.
    assert _decide(100.0, state, QUIET, BOUNDS, 8000, guest=None).action != "deflate"
    # The bounds of pressure hold: the VM's maximum, the host's floor, the rate.
    assert _decide(100.0, VmMemoryState(2048), QUIET, BOUNDS, 8000, guest=0).code == "at-max"
    assert _decide(100.0, state, QUIET, BOUNDS, 1000, guest=0).code == "host-floor"
    recent = VmMemoryState(512, last_change=99.9)
    assert _decide(100.0, recent, QUIET, BOUNDS, 8000, guest=0).code == "rate"


def test_a_storm_never_passes_the_maximum_the_floor_or_the_rate() -> None:
    """A hostile guest reports pressure every millisecond for a minute: the host gives at
    most max_changes_per_s steps a second, never past the VM's maximum, never below its
    floor (host memory modelled: every MiB given is a MiB less available)."""
    state = VmMemoryState(512)
    host = 1900  # MiB available: the floor (1000) allows 900 more
    changes = []
    for ms in range(60_000):
        now = ms / 1000
        d = _decide(now, state, PRESSURE, Bounds(512, 4096), host, POLICY)
        state.last_pressure = now
        if d.target_mib is not None:
            host -= d.target_mib - state.target_mib
            state.target_mib, state.last_change = d.target_mib, now
            changes.append(now)
        assert host >= POLICY.host_floor_mib and state.target_mib <= 4096
    assert state.target_mib == 512 + 900
    gaps = [b - a for a, b in itertools.pairwise(changes)]
    assert min(gaps) >= 1 / POLICY.max_changes_per_s


def test_config_bounds_are_checked() -> None:
    with pytest.raises(ValidationError, match="max_mib 256 is below min_mib 512"):
        MemoryConfig(max_mib=256)
    with pytest.raises(ValidationError, match=r"vms\.db: max_mib 300 is below min_mib 400"):
        MemoryConfig.model_validate({"vms": {"db": {"min_mib": 400, "max_mib": 300}}})
    with pytest.raises(ValidationError):
        MemoryConfig.model_validate({"stepmib": 1})


def test_host_available_is_read_from_meminfo(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:  8000000 kB\nMemAvailable:    2048000 kB\n")
    assert host_available_mib(meminfo) == 2000
    assert host_available_mib(tmp_path / "absent") == 0  # unknown: nothing is given
    assert host_available_mib(Path("/proc/meminfo")) > 0


def test_the_memory_service_is_found_and_off_by_default() -> None:
    assert discover()["memory"].plugin is MemoryService
    assert "memory" not in ServicesConfig().enabled


def test_pyproject_declares_memory_as_an_entry_point() -> None:
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    target = project["entry-points"]["extpv.services"]["memory"]
    assert target == f"{MemoryService.__module__}:{MemoryService.__name__}"


# -- resynchronisation from pv_mem_state (records lost on their way) --------------------------
def _state(**values: int) -> list[tuple[bytes, bytes]]:
    slots = {"lost": StateSlot.LOST, "reclaims": StateSlot.RECLAIMS,
             "stall_ns": StateSlot.STALL_NS, "ooms": StateSlot.OOMS}  # fmt: skip
    return [
        (struct.pack("<I", slot), struct.pack("<Q", values.get(name, 0)))
        for name, slot in slots.items()
    ]


def test_the_counters_map_is_decoded_and_hostile_answers_refused() -> None:
    counters = decode_counters(_state(reclaims=3, stall_ns=7, ooms=1, lost=2), truncated=False)
    assert counters == MemoryCounters(reclaims=3, stall_ns=7, ooms=1, lost=2)
    good = _state()
    with pytest.raises(EventError, match="3, not 4 entries"):
        decode_counters(good[:3], truncated=False)
    with pytest.raises(EventError, match="more than 4 entries"):
        decode_counters(good, truncated=True)
    with pytest.raises(EventError, match="repeated slot 0"):
        decode_counters([good[0], *good[:3]], truncated=False)
    with pytest.raises(EventError, match="unexpected or repeated slot 9"):
        decode_counters([(struct.pack("<I", 9), bytes(8)), *good[1:]], truncated=False)
    with pytest.raises(EventError, match="4-byte key and 4-byte value"):
        decode_counters([(good[0][0], bytes(4)), *good[1:]], truncated=False)


def test_lost_records_are_found_in_the_counters_once_confirmed() -> None:
    """The first read is a baseline; events counted but never received, still missing a
    confirm interval later, come back as pressure once (the old agent's lost OOM record)."""
    sync = CounterSync(confirm_s=2.0)
    sync.received(5, 1_000, 0)  # before any read: the baseline covers them
    first = sync.observe(10.0, MemoryCounters(reclaims=5, stall_ns=1_000))
    assert first.baseline and not first.pressure
    # Records received as they happen: nothing missing.
    sync.received(2, 500, 0)
    assert not sync.observe(12.0, MemoryCounters(reclaims=7, stall_ns=1_500)).pressure
    # The agent lost its connection: 3 reclaims and an OOM kill never reached the host.
    assert not sync.observe(20.0, MemoryCounters(reclaims=10, stall_ns=9_500, ooms=1)).pressure
    found = sync.observe(22.5, MemoryCounters(reclaims=10, stall_ns=9_500, ooms=1))
    assert found.pressure and not found.baseline
    assert found.missing == MemoryCounters(reclaims=3, stall_ns=8_000, ooms=1)
    # Found once: the next reads find nothing more.
    assert not sync.observe(25.0, MemoryCounters(reclaims=10, stall_ns=9_500, ooms=1)).pressure
    assert not sync.observe(28.0, MemoryCounters(reclaims=10, stall_ns=9_500, ooms=1)).pressure


def test_records_on_their_way_at_a_read_are_not_counted_twice() -> None:
    """A read is compared only a confirm interval later: records of events just before it,
    still on their way then, are received meanwhile and are not missing."""
    sync = CounterSync(confirm_s=2.0)
    sync.observe(0.0, MemoryCounters())
    assert not sync.observe(3.0, MemoryCounters(reclaims=4, stall_ns=400)).pressure
    sync.received(4, 400, 0)  # the four records arrive after the read
    # A read too soon after the pending one does not confirm it.
    assert not sync.observe(4.0, MemoryCounters(reclaims=4, stall_ns=400)).pressure
    assert not sync.observe(5.5, MemoryCounters(reclaims=6, stall_ns=600)).pressure
    sync.received(2, 200, 0)
    assert not sync.observe(8.0, MemoryCounters(reclaims=6, stall_ns=600)).pressure


def test_a_counter_going_backwards_is_a_reload_and_a_new_baseline() -> None:
    sync = CounterSync(confirm_s=1.0)
    sync.observe(0.0, MemoryCounters(reclaims=100, stall_ns=10**9, ooms=2))
    # The agent restarted: its program counts from 0 (only the OOM count fell: enough).
    found = sync.observe(5.0, MemoryCounters(reclaims=120, stall_ns=2 * 10**9, ooms=0))
    assert found.baseline and not found.pressure
    assert sync.baselines == 2
    # No negative delta, ever: from the new baseline on, what is missing is counted.
    assert not sync.observe(7.0, MemoryCounters(reclaims=121, stall_ns=2 * 10**9)).pressure
    found = sync.observe(9.0, MemoryCounters(reclaims=121, stall_ns=2 * 10**9))
    assert found.missing.reclaims == 1 and found.missing.stall_ns == 0
    # The service disabled (program unloaded): the next read is a baseline whatever it says.
    sync.reset()
    assert sync.observe(20.0, MemoryCounters(reclaims=10**6, ooms=7)).baseline


def test_hostile_counters_are_clamped_and_never_negative() -> None:
    """A guest's counters jump by 2**64 - 1, fall, jump again: each resync is clamped to
    MAX_DELTA, a fall is a new baseline, and no delta is ever negative."""
    top = (1 << 64) - 1
    sync = CounterSync(confirm_s=1.0)
    sync.observe(0.0, MemoryCounters())
    sync.observe(1.0, MemoryCounters(reclaims=top, stall_ns=top, ooms=top, lost=top))
    found = sync.observe(2.0, MemoryCounters(reclaims=top, stall_ns=top, ooms=top, lost=top))
    assert found.missing == MemoryCounters(
        reclaims=MAX_DELTA.reclaims, stall_ns=MAX_DELTA.stall_ns, ooms=MAX_DELTA.ooms, lost=0
    )
    for now in range(3, 40):
        value = top if now % 3 else now
        got = sync.observe(float(now), MemoryCounters(reclaims=value, stall_ns=value, ooms=value))
        for name in ("reclaims", "stall_ns", "ooms", "lost"):
            assert 0 <= getattr(got.missing, name) <= getattr(MAX_DELTA, name)


def test_a_resynced_oom_kill_deflates_like_a_received_one() -> None:
    """What the counters found goes to the same policy: the per-change bound holds however
    many the guest claims (two steps for an OOM kill)."""
    d = _decide(100.0, VmMemoryState(1024), WindowStats(reclaims=MAX_DELTA.reclaims,
                stall_ns=MAX_DELTA.stall_ns, ooms=MAX_DELTA.ooms), BOUNDS, 8000)  # fmt: skip
    assert (d.action, d.target_mib) == ("deflate", 1024 + 2 * POLICY.step_mib)
