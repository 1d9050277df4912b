"""Who waited for a CPU, and where, during a window: host scheduler events for chosen threads.

An ftrace instance on this host records ``sched_switch``, ``sched_wakeup`` and
``sched_migrate_task`` for the threads named (``set_event_pid``, followed into threads they
create later), on the monotonic clock. For a window (a guest call to its placement, say)
:func:`window_waits` then says, per thread, how long it was *runnable but not running* (woken
or preempted, waiting on a run queue), how long it ran, and which load tasks ran on each CPU
meanwhile. Used by ``bench/vm_stages.py --sched-trace`` (issue #9: where a loaded pin's time
goes on the host's side of the guest).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from ftrace import FtraceInstance

__all__ = ["SchedEvent", "SchedTrace", "WindowWaits", "parse_sched", "window_waits"]

_LINE = re.compile(
    r"^\s*.+?-\d+\s+\[(?P<cpu>\d+)\].*?\s(?P<ts>\d+\.\d+):\s+(?P<ev>sched_\w+):\s+(?P<rest>.*)$"
)
_FIELD = re.compile(r"(\w+)=(\S*)")


@dataclass(frozen=True)
class SchedEvent:
    ts: float
    cpu: int
    event: str
    fields: dict[str, str]


class SchedTrace(FtraceInstance):
    """Scheduler events of ``tids`` (and the threads they create) on this host."""

    def __init__(self, tids: Iterable[int], *, buffer_kb: int = 32768) -> None:
        super().__init__(f"extpv-sched-{os.getpid()}", buffer_kb=buffer_kb)
        (self.dir / "options" / "event-fork").write_text("1")
        (self.dir / "set_event_pid").write_text(" ".join(str(t) for t in tids))
        for event in ("sched_switch", "sched_wakeup", "sched_migrate_task"):
            self.enable(f"sched/{event}")
        self.start()


def parse_sched(text: str) -> list[SchedEvent]:
    out = []
    for line in text.splitlines():
        m = _LINE.match(line)
        if m:
            rest = m["rest"].replace(" ==> ", " ")
            out.append(
                SchedEvent(float(m["ts"]), int(m["cpu"]), m["ev"], dict(_FIELD.findall(rest)))
            )
    return out


@dataclass
class WindowWaits:
    """One window: ms runnable-but-waiting and ms running per watched thread (by name), and
    the load tasks seen running on each CPU."""

    waited_ms: dict[str, float] = field(default_factory=dict)
    ran_ms: dict[str, float] = field(default_factory=dict)
    load_on_cpu: dict[int, int] = field(default_factory=dict)


def window_waits(
    events: list[SchedEvent],
    start: float,
    end: float,
    names: Mapping[int, str],
    load: set[int],
) -> WindowWaits:
    """Walk ``events`` (time order) from a little before ``start`` (so a thread already
    waiting at ``start`` counts) to ``end``; ``names``: watched tid -> name, ``load``: tids of
    load tasks (counted per CPU, not timed)."""
    out = WindowWaits()
    waiting: dict[int, float] = {}
    running: dict[int, float] = {}
    load_seen: dict[int, set[int]] = {}

    def add(into: dict[str, float], tid: int, t0: float, t1: float) -> None:
        span = min(t1, end) - max(t0, start)
        if span > 0:
            into[names[tid]] = into.get(names[tid], 0.0) + span * 1000.0

    for ev in events:
        if ev.ts < start - 1.0:
            continue
        if ev.ts > end:
            break
        f = ev.fields
        if ev.event == "sched_wakeup":
            tid = int(f.get("pid", "0"))
            if tid in names:
                waiting.setdefault(tid, ev.ts)
        elif ev.event == "sched_switch":
            prev, nxt = int(f.get("prev_pid", "0")), int(f.get("next_pid", "0"))
            if prev in names:
                if prev in running:
                    add(out.ran_ms, prev, running.pop(prev), ev.ts)
                if f.get("prev_state", "").startswith("R"):
                    waiting[prev] = ev.ts  # preempted: back on the run queue
            if nxt in names:
                if nxt in waiting:
                    add(out.waited_ms, nxt, waiting.pop(nxt), ev.ts)
                running[nxt] = ev.ts
            if nxt in load and ev.ts >= start:
                load_seen.setdefault(ev.cpu, set()).add(nxt)
    for tid, t0 in waiting.items():
        add(out.waited_ms, tid, t0, end)
    for tid, t0 in running.items():
        add(out.ran_ms, tid, t0, end)
    out.load_on_cpu = {cpu: len(tids) for cpu, tids in sorted(load_seen.items())}
    return out
