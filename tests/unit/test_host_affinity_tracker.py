"""The affinity service's layout and tracker (on the host since protocol 4): event decoding,
strict-subset requests, union, release on exit/widening, coalescing, the table's bound."""

from __future__ import annotations

import asyncio
import struct
import time
import tracemalloc

import pytest

from pvhost.services.affinity_event import (
    EVENT_SIZE,
    TRACKED,
    AffinityEvent,
    EventError,
    EventFlag,
    EventKind,
    decode,
    decode_tracked,
)
from pvhost.services.affinity_tracker import AffinityTracker
from pvproto import AffinityUpdate

ONLINE = range(4)


def set_event(tid: int, cpus: set[int], target: int = 0) -> AffinityEvent:
    return AffinityEvent(EventKind.SET, 1, tid, target, frozenset(cpus), EventFlag(0), 0)


def exit_event(tid: int) -> AffinityEvent:
    return AffinityEvent(EventKind.EXIT, 1, tid, 0, frozenset(), EventFlag(0), 0)


def run(coro_fn):  # type: ignore[no-untyped-def]
    return asyncio.run(coro_fn())


def test_strict_subset_requests_and_union() -> None:
    async def body() -> list[AffinityUpdate]:
        sent: list[AffinityUpdate] = []
        tracker = AffinityTracker(ONLINE, sent.append, window=0.01)
        tracker.handle(set_event(10, {0}))
        tracker.handle(set_event(11, {1, 2}))
        tracker.handle(set_event(12, {0, 1, 2, 3}))  # every online vCPU: no request
        tracker.handle(set_event(13, {0, 1, 2, 3, 7}))  # offline 7 ignored: still all online
        tracker.handle(set_event(1, {3}, target=14))  # explicit target tid
        await asyncio.sleep(0.05)
        return sent

    sent = run(body)
    assert sent[-1].wanted == [0, 1, 2, 3]
    assert {(t.tid, tuple(t.vcpus)) for t in sent[-1].threads} == {
        (10, (0,)),
        (11, (1, 2)),
        (14, (3,)),
    }


def test_widening_and_exit_release() -> None:
    async def body() -> list[AffinityUpdate]:
        sent: list[AffinityUpdate] = []
        tracker = AffinityTracker(ONLINE, sent.append, window=0.0)
        tracker.handle(set_event(10, {0}))
        tracker.handle(set_event(11, {0, 1}))
        await asyncio.sleep(0.01)
        assert sent[-1].wanted == [0, 1]
        tracker.handle(set_event(11, {0, 1, 2, 3}))  # widening releases vCPU 1
        await asyncio.sleep(0.01)
        assert sent[-1].wanted == [0]
        tracker.handle(exit_event(99))  # an untracked thread: no change, no update
        count = len(sent)
        await asyncio.sleep(0.01)
        assert len(sent) == count
        tracker.handle(exit_event(10))
        await asyncio.sleep(0.01)
        return sent

    sent = run(body)
    assert sent[-1].wanted == []
    assert [u.seq for u in sent] == sorted({u.seq for u in sent})  # monotonic


def test_process_exit_releases_every_thread() -> None:
    async def body() -> AffinityUpdate:
        sent: list[AffinityUpdate] = []
        tracker = AffinityTracker(ONLINE, sent.append, window=0.0)
        for tid in range(100, 110):
            tracker.handle(set_event(tid, {tid % 3}))
        for tid in range(100, 110):  # sched_process_exit fires once per thread
            tracker.handle(exit_event(tid))
        await asyncio.sleep(0.01)
        return sent[-1]

    assert run(body).wanted == []


def test_storm_is_coalesced_bounded_and_final_state_on_time() -> None:
    window = 0.02

    async def body() -> tuple[list[tuple[float, AffinityUpdate]], float, int]:
        sent: list[tuple[float, AffinityUpdate]] = []
        tracker = AffinityTracker(
            ONLINE, lambda u: sent.append((time.monotonic(), u)), window=window
        )
        tracemalloc.start()
        start = time.monotonic()
        calls = 0
        # ~0.3 s of storm: 64 threads flipping between masks, event-loop turns in between.
        while time.monotonic() - start < 0.3:
            for _ in range(2000):
                calls += 1
                tracker.handle(set_event(1000 + calls % 64, {calls % 3}))
            await asyncio.sleep(0)
        baseline = tracemalloc.get_traced_memory()[0]
        for _ in range(20000):
            calls += 1
            tracker.handle(set_event(1000 + calls % 64, {calls % 3}))
        grown = tracemalloc.get_traced_memory()[0] - baseline
        tracemalloc.stop()
        tracker.handle(set_event(5000, {3}))  # the final state includes this
        last_call = time.monotonic()
        await asyncio.sleep(window * 3)
        assert len(tracker.threads) == 65  # bounded by live tids, not by calls
        return sent, last_call, grown

    sent, last_call, grown = run(body)
    duration = sent[-1][0] - sent[0][0]
    assert len(sent) <= duration / window + 2  # at most one update per window
    final_time, final = sent[-1]
    assert 5000 in {t.tid for t in final.threads}
    assert final_time - last_call <= window + 0.015  # one window (+ scheduling slack)
    assert grown < 64 * 1024  # no growth with the number of calls


def test_replace_all_adopts_the_kernel_table() -> None:
    async def body() -> AffinityUpdate:
        sent: list[AffinityUpdate] = []
        tracker = AffinityTracker(ONLINE, sent.append, window=0.0)
        tracker.handle(set_event(10, {0}))
        tracker.replace_all({20: frozenset({2}), 21: frozenset({0, 1, 2, 3})})
        await asyncio.sleep(0.01)
        return sent[-1]

    update = run(body)
    assert update.wanted == [2]
    assert [t.tid for t in update.threads] == [20]


def test_update_lists_at_most_1024_threads() -> None:
    async def body() -> AffinityUpdate:
        tracker = AffinityTracker(ONLINE, lambda _u: None, window=1.0)
        for tid in range(1, 2001):
            tracker.handle(set_event(tid, {tid % 4}))
        tracker.close()
        return tracker.update()

    update = run(body)
    assert len(update.threads) == 1024 and update.threads_omitted == 976
    assert update.wanted == [0, 1, 2, 3]


def test_event_decoding() -> None:
    mask = (1 << 1 | 1 << 700).to_bytes(128, "little")
    record = struct.pack("<IIIIIIQ", 1, 10, 11, 0, 128, 0, 5) + mask
    event = decode(record)
    assert len(record) == EVENT_SIZE
    assert (event.kind, event.target_tid, event.cpus) == (EventKind.SET, 11, {1, 700})
    short = struct.pack("<IIIIIIQ", 1, 10, 11, 12, 8, 0, 5) + mask  # only 8 bytes valid
    assert decode(short).cpus == {1} and decode(short).target_tid == 12
    with pytest.raises(EventError, match="bytes"):
        decode(record[:-1])
    with pytest.raises(EventError, match="kind"):
        decode(struct.pack("<IIIIIIQ", 9, 0, 0, 0, 0, 0, 0) + mask)


def test_tracked_entry_decoding() -> None:
    value = TRACKED.pack(8, 0, (1 << 2 | 1 << 100).to_bytes(128, "little"))
    assert decode_tracked(struct.pack("<I", 42), value) == (42, frozenset({2}))  # 8 bytes valid
    with pytest.raises(EventError, match="pv_tracked"):
        decode_tracked(b"\0\0", value)


def test_table_is_bounded_whatever_the_guest_sends() -> None:
    async def body() -> tuple[AffinityTracker, list[AffinityUpdate]]:
        sent: list[AffinityUpdate] = []
        tracker = AffinityTracker(ONLINE, sent.append, window=0.0, max_threads=100)
        for tid in range(1, 1000):  # made-up tids: a hostile guest
            tracker.handle(set_event(tid, {tid % 4}))
        tracker.handle(set_event(5, {1}))  # a known tid still changes
        tracker.replace_all({t: frozenset({0}) for t in range(5000)})
        await asyncio.sleep(0.01)
        return tracker, sent

    tracker, sent = run(body)
    assert len(tracker.threads) == 100
    assert tracker.overflowed == 899
    assert sent[-1].wanted == [0]
