"""bench/sched_trace.py reads ftrace's scheduler events and says, for a window, how long each
watched thread waited on a run queue: a wrong sum would blame the wrong thread for a slow pin."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from sched_trace import parse_sched, window_waits

# The text format of this kernel's trace (sched_switch, sched_wakeup), two CPUs.
TRACE = """\
# tracer: nop
             yes-100     [000] d..2.  10.000000: sched_wakeup: comm=CPU 1/TCG pid=7 prio=120 target_cpu=000
             yes-100     [000] d..2.  10.004000: sched_switch: prev_comm=yes prev_pid=100 prev_prio=120 prev_state=R ==> next_comm=CPU 1/TCG next_pid=7 next_prio=120
       CPU 1/TCG-7       [000] d..2.  10.005000: sched_switch: prev_comm=CPU 1/TCG prev_pid=7 prev_prio=120 prev_state=R ==> next_comm=yes next_pid=101 next_prio=120
             yes-101     [000] d..2.  10.008000: sched_switch: prev_comm=yes prev_pid=101 prev_prio=120 prev_state=R+ ==> next_comm=CPU 1/TCG next_pid=7 next_prio=120
       CPU 1/TCG-7       [000] d..2.  10.009000: sched_switch: prev_comm=CPU 1/TCG prev_pid=7 prev_prio=120 prev_state=S ==> next_comm=yes next_pid=100 next_prio=120
"""  # noqa: E501


def test_waits_count_wakeup_and_preemption_until_switched_in() -> None:
    events = parse_sched(TRACE)
    assert [e.event for e in events] == ["sched_wakeup", *["sched_switch"] * 4]
    assert events[1].cpu == 0 and events[1].fields["next_comm"] == "CPU"  # comm has a space
    w = window_waits(events, 10.0, 10.010, {7: "vcpu1"}, load={100, 101})
    # Woken at 10.000, ran 10.004-10.005, preempted until 10.008, ran until 10.009.
    assert round(w.waited_ms["vcpu1"], 3) == 7.0
    assert round(w.ran_ms["vcpu1"], 3) == 2.0
    assert w.load_on_cpu == {0: 2}


def test_a_window_counts_only_its_own_part_of_a_wait() -> None:
    events = parse_sched(TRACE)
    w = window_waits(events, 10.002, 10.0045, {7: "vcpu1"}, load=set())
    assert round(w.waited_ms["vcpu1"], 3) == 2.0  # 10.002-10.004 of the 4 ms wait
    assert round(w.ran_ms["vcpu1"], 3) == 0.5
