"""The latency benches pair each guest pin/unpin with the host change it caused
(bench/vm_latency.py ``match_events``): a pairing error would record a cycle's length as a
latency."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from vm_latency import isolated_changes, match_events


def test_a_placement_seen_before_the_guest_read_its_clock_pairs_with_its_own_call() -> None:
    # Guest (offset 0): unpin made at 10.000, its thread preempted until 10.030 after the call;
    # the host widened the vCPU thread at 10.012 and again (the next unpin) at 10.812.
    events = [("unpin", 10.030, 10.000), ("unpin", 10.801, 10.800)]
    changes = [(9.5, "1"), (10.012, "0-1"), (10.4, "1"), (10.812, "0-1")]
    lat, missed = match_events(events, changes, offset=0.0, error=0.0005)
    assert missed == 0
    assert [round(x, 3) for x in lat["unpin"]] == [0.0, 11.0]


def test_latency_counts_from_the_calls_return_and_a_missing_change_is_a_miss() -> None:
    events = [("pin", 5.002, 5.000), ("unpin", 5.402, 5.400)]
    changes = [(4.0, "0-1"), (5.010, "1")]
    lat, missed = match_events(events, changes, offset=-1.0, error=0.0005)
    # guest 5.002 is host 6.002: the change at host 5.010 came before the call: not its own.
    assert lat == {"pin": [], "unpin": []} and missed == 2
    lat, missed = match_events(events, changes, offset=0.0, error=0.0005)
    assert [round(x, 3) for x in lat["pin"]] == [8.0] and missed == 1


def test_a_pin_is_isolated_only_once_the_loads_cpuset_gave_its_pcpu_up() -> None:
    # The thread is confined at 5.004 (placed: 4 ms); the load's cpuset loses CPU 1 at 5.007.
    samples = [(4.0, "0-1", "0-1"), (5.004, "1", "0-1"), (5.007, "1", "0"), (5.4, "0-1", "0-1")]
    events = [("pin", 5.000, 4.999)]
    placed = match_events(events, [(t, a) for t, a, _ in samples], offset=0.0, error=0.0005)
    isolated = match_events(events, isolated_changes(samples), offset=0.0, error=0.0005)
    assert [round(x, 3) for x in placed[0]["pin"]] == [4.0]
    assert [round(x, 3) for x in isolated[0]["pin"]] == [7.0]
