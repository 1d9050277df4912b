"""Both loaders load the real affinity program into the running kernel and report
what os.sched_setaffinity did: right target tid, whole CPU list, only successful calls,
and thread exits. The bcc twin (bpf/affinity.bcc.c) and the CO-RE program
(bpf/affinity.bpf.c), loaded side by side, report the same events field by field."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from pvagent import bpfobj
from pvagent.loaders import load
from pvagent.program import LoadedProgram
from pvagent.trust import TrustPolicy
from pvhost.services.affinity_event import AffinityEvent, EventFlag, EventKind, decode

pytestmark = [pytest.mark.root, pytest.mark.ebpf]

PAYLOADS = {"bpf-object": "affinity.bpf.o", "bcc-source": "affinity.bcc.c"}
VET = TrustPolicy(mode="any").vet  # the agent's default allow-lists
ATTACHED = [
    "tracepoint/syscalls/sys_enter_sched_setaffinity",
    "tracepoint/syscalls/sys_exit_sched_setaffinity",
    "tracepoint/sched/sched_process_fork",
    "tracepoint/sched/sched_process_exit",
]


@dataclass
class Traced:
    program: LoadedProgram
    events: list[AffinityEvent] = field(default_factory=list)

    def wait_for(
        self, predicate: Callable[[list[AffinityEvent]], bool], timeout: float = 3.0
    ) -> list[AffinityEvent]:
        """This process's events once ``predicate`` holds on them (waits on the epoll fd)."""
        deadline = time.monotonic() + timeout
        while True:
            self.program.consume()
            mine = [e for e in self.events if e.tgid == os.getpid()]
            if predicate(mine):
                return mine
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"condition not met within {timeout} s; events: {mine}")
            select.select([self.program.fileno()], [], [], left)


@pytest.fixture(scope="module", params=list(PAYLOADS), ids=["libbpf", "bcc"])
def traced(request: pytest.FixtureRequest) -> Iterator[Traced]:
    """The real program, loaded once per loader for the whole module (bcc compiles ~1 s)."""
    request.getfixturevalue("_ebpf_ready")
    events: list[AffinityEvent] = []
    program = load(
        "affinity",
        request.param,
        bpfobj.read(PAYLOADS[request.param]),
        lambda _n, r: events.append(decode(r)),
        vet=VET,
    )
    assert program.ringbufs == ("pv_affinity",)
    # Vetted, then attached; the object's task iterator was vetted too and has run once.
    scan = ["iter/task"] if request.param == "bpf-object" else []
    assert sorted(program.attach_points) == sorted(ATTACHED + scan)
    yield Traced(program, events)
    program.close()


def in_thread(work: Callable[[], object]) -> int:
    """Run ``work`` in a new thread (which then exits); return its tid."""
    tid: list[int] = []

    def run() -> None:
        tid.append(threading.get_native_id())
        work()

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    return tid[0]


def sets(events: list[AffinityEvent]) -> dict[int, frozenset[int]]:
    """target tid → last reported CPU set."""
    return {e.target_tid: e.cpus for e in events if e.kind is EventKind.SET}


def test_pid_zero_from_several_threads(traced: Traced) -> None:
    wanted = {}
    for index in range(4):
        cpus = {index % 2}
        wanted[in_thread(lambda cpus=cpus: os.sched_setaffinity(0, cpus))] = frozenset(cpus)
    events = traced.wait_for(lambda ev: wanted.items() <= sets(ev).items())
    for event in events:
        if event.target_tid in wanted and event.kind is EventKind.SET:
            assert event.target == 0 and event.tid == event.target_tid  # pid 0 = the caller


def test_explicit_tid_and_the_whole_mask(traced: Traced) -> None:
    parked = threading.Event()
    tid: list[int] = []

    def worker() -> None:
        tid.append(threading.get_native_id())
        parked.wait(10)

    thread = threading.Thread(target=worker)
    thread.start()
    try:
        while not tid:
            time.sleep(0.001)
        os.sched_setaffinity(tid[0], {1})
        traced.wait_for(lambda ev: sets(ev).get(tid[0]) == {1})
        # CPU 100 does not exist here, CPU 0 does: the call succeeds and the event carries
        # the whole user mask (more than 64 bits), not just its first word.
        os.sched_setaffinity(tid[0], {0, 100})
        events = traced.wait_for(lambda ev: sets(ev).get(tid[0]) == {0, 100})
        last = [e for e in events if e.target_tid == tid[0]][-1]
        assert (last.target, last.tid) == (tid[0], threading.get_native_id())
    finally:
        parked.set()
        thread.join()


def test_failed_calls_are_not_reported(traced: Traced) -> None:
    def work() -> None:
        with pytest.raises(OSError):
            os.sched_setaffinity(0, {500})  # no such CPU: EINVAL
        with pytest.raises(OSError):
            os.sched_setaffinity(999_999_999, {0})  # no such thread: ESRCH
        os.sched_setaffinity(0, {1})  # marker: succeeds

    tid = in_thread(work)
    events = traced.wait_for(lambda ev: sets(ev).get(tid) == {1})
    assert not [
        e for e in events if e.kind is EventKind.SET and (500 in e.cpus or e.target == 999_999_999)
    ]


def test_thread_exit_is_reported(traced: Traced) -> None:
    tid = in_thread(lambda: os.sched_setaffinity(0, {0}))
    traced.wait_for(lambda ev: any(e.kind is EventKind.EXIT and e.tid == tid for e in ev))


def test_repeated_identical_calls_are_reported_once(traced: Traced) -> None:
    def work() -> None:
        for _ in range(1000):
            os.sched_setaffinity(0, {1})
        os.sched_setaffinity(0, {0})

    tid = in_thread(work)
    events = traced.wait_for(lambda ev: any(e.kind is EventKind.EXIT and e.tid == tid for e in ev))
    assert [sorted(e.cpus) for e in events if e.kind is EventKind.SET and e.target_tid == tid] == [
        [1],
        [0],
    ]


def test_new_threads_inherit_a_tracked_mask(traced: Traced) -> None:
    """clone() copies affinity: a pinned thread's children are reported as pinned too."""
    child: list[int] = []

    def parent() -> None:
        os.sched_setaffinity(0, {1})
        child.append(in_thread(lambda: None))

    tid = in_thread(parent)
    events = traced.wait_for(lambda ev: bool(child) and sets(ev).get(child[0]) == {1})
    inherited = [e for e in events if e.kind is EventKind.SET and e.target == child[0]]
    assert inherited[0].tid == tid and EventFlag.INHERITED in inherited[0].flags
    # ... and the child's exit is reported, as for any tracked thread.
    traced.wait_for(lambda ev: any(e.kind is EventKind.EXIT and e.tid == child[0] for e in ev))


# -- the bcc twin ------------------------------------------------------------------------------
# affinity.bcc.c is a hand-kept twin of affinity.bpf.c: the test below loads both at once, makes
# one child process do every kind of call the programs tell apart, and requires both to report
# the same events, field by field and in the same order.

#: Run in a child process so that its events (filtered by tgid) are exactly the ones below.
#: Every step waits until the threads it started are gone (their exit tracepoint has fired), so
#: the order of the events is the order of the steps, in both programs alike.
TWIN_SCRIPT = r"""
import json, os, threading, time

def gone(tid):
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/self/task/{tid}"):
        if time.monotonic() > deadline:
            raise SystemExit(f"thread {tid} did not exit")
        time.sleep(0.001)

def in_thread(work):
    box = {}
    def run():
        box["tid"] = threading.get_native_id()
        try:
            box["result"] = work()
        except BaseException as err:
            box["error"] = err
    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    gone(box["tid"])
    if "error" in box:
        raise box["error"]
    return box["tid"], box["result"]

def accepted(pid, cpus):
    try:
        os.sched_setaffinity(pid, cpus)
    except OSError:
        return False
    return True

def tracked():
    out = {}
    os.sched_setaffinity(0, {1})
    os.sched_setaffinity(0, {1})  # the same mask again: not reported twice
    assert not accepted(0, {500}), "no CPU 500 here: EINVAL expected"
    assert not accepted(999_999_999, {0}), "no such thread: ESRCH expected"
    out["above_63"] = accepted(0, {0, 100})  # a 16-byte mask
    out["thread"], _ = in_thread(lambda: None)  # a new thread inherits the tracked mask
    pid = os.fork()  # ... and so does a new process
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    out["process"] = pid
    return out

out = {"pid": os.getpid(), "main": threading.get_native_id()}
out["tracked"], out["tracked_result"] = in_thread(tracked)

ready, release, box = threading.Event(), threading.Event(), {}
def parked():
    box["tid"] = threading.get_native_id()
    ready.set()
    release.wait(10)
thread = threading.Thread(target=parked)
thread.start()
ready.wait(10)
os.sched_setaffinity(box["tid"], {1})  # another thread, by tid
os.sched_setaffinity(box["tid"], {1})
release.set()
thread.join()
gone(box["tid"])
out["target"] = box["tid"]

# 2001 CPUs: a 256-byte mask, longer than the 128 bytes an event carries.
out["long"], out["long_accepted"] = in_thread(lambda: accepted(0, {0, 2000}))
print(json.dumps(out))
"""


def _expected_twin_events(run: dict[str, Any]) -> list[tuple[Any, ...]]:
    """(kind, tgid, tid, target, cpus, flags) of every event the script causes, in order."""
    pid, main, target = run["pid"], run["main"], run["target"]
    tracked, result, long = run["tracked"], run["tracked_result"], run["long"]
    child, process = result["thread"], result["process"]
    mask = {0, 100} if result["above_63"] else {1}
    set_, exit_, none = EventKind.SET, EventKind.EXIT, EventFlag(0)
    events = [(set_, pid, tracked, 0, {1}, none)]
    if result["above_63"]:
        events.append((set_, pid, tracked, 0, {0, 100}, none))
    events += [
        (set_, pid, tracked, child, mask, EventFlag.INHERITED),
        (exit_, pid, child, 0, set(), none),
        (set_, pid, tracked, process, mask, EventFlag.INHERITED),
        (exit_, process, process, 0, set(), none),
        (exit_, pid, tracked, 0, set(), none),
        (set_, pid, main, target, {1}, none),
        (exit_, pid, target, 0, set(), none),
    ]
    if run["long_accepted"]:
        events.append((set_, pid, long, 0, {0}, EventFlag.TRUNCATED))
    events.append((exit_, pid, long, 0, set(), none))
    return events


def test_the_bcc_twin_reports_exactly_what_the_core_program_reports(_ebpf_ready: None) -> None:
    records: dict[str, list[bytes]] = {kind: [] for kind in PAYLOADS}
    programs = [
        load(
            "affinity",
            kind,
            bpfobj.read(name),
            lambda _n, record, kind=kind: records[kind].append(record),
            vet=VET,
        )
        for kind, name in PAYLOADS.items()
    ]
    try:
        child = subprocess.run(
            [sys.executable, "-c", TWIN_SCRIPT],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert child.returncode == 0, child.stderr
        for program in programs:
            program.consume()  # the child has exited: every event of it is in the ring buffers
    finally:
        for program in programs:
            program.close()
    run = json.loads(child.stdout)
    tgids = {run["pid"], run["tracked_result"]["process"]}
    mine = {kind: [r for r in recs if decode(r).tgid in tgids] for kind, recs in records.items()}
    core, bcc = mine["bpf-object"], mine["bcc-source"]

    # The CO-RE program saw every step (so the comparison below is not of two empty lists).
    assert [
        (e.kind, e.tgid, e.tid, e.target, e.cpus, e.flags) for e in map(decode, core)
    ] == _expected_twin_events(run)

    assert len(bcc) == len(core), [decode(r) for r in bcc]
    for index, (ours, twin) in enumerate(zip(core, bcc, strict=True)):
        a, b = decode(ours), decode(twin)
        fields = {**a._asdict(), "mask_bytes": _mask_bytes(ours)}
        twin_fields = {**b._asdict(), "mask_bytes": _mask_bytes(twin)}
        differ = [f for f in fields if f != "ktime_ns" and fields[f] != twin_fields[f]]
        assert not differ, f"event {index}: {differ} differ:\n core {a}\n bcc  {b}"
        # Everything but the timestamp, byte for byte (the mask's unused tail included).
        assert ours[:_KTIME] + ours[_KTIME + 8 :] == twin[:_KTIME] + twin[_KTIME + 8 :], index
        # One tracepoint hit runs both programs: their timestamps are close.
        assert a.ktime_ns and abs(a.ktime_ns - b.ktime_ns) < 1_000_000_000, (a, b)


#: bpf/affinity.h: kind, tgid, tid, target, mask_bytes, flags (u32 each), then ktime_ns (u64).
_MASK_BYTES_AT, _KTIME = 16, 24


def _mask_bytes(record: bytes) -> int:
    """The valid length of the mask, which the decoder uses but does not return."""
    return int.from_bytes(record[_MASK_BYTES_AT : _MASK_BYTES_AT + 4], "little")
