"""Both loaders load the real affinity program into the running kernel and report
what os.sched_setaffinity did: right target tid, whole CPU list, only successful calls,
and thread exits."""

from __future__ import annotations

import os
import select
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

from pvagent import bpfobj
from pvagent.affinity_event import AffinityEvent, EventFlag, EventKind, decode
from pvagent.loaders import load
from pvagent.program import LoadedProgram

pytestmark = [pytest.mark.root, pytest.mark.ebpf]

PAYLOADS = {"bpf-object": "affinity.bpf.o", "bcc-source": "affinity.bcc.c"}


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
    )
    assert program.ringbufs == ("pv_affinity",)
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
