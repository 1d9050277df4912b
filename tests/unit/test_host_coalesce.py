"""pvhost.coalesce.Coalescer: a burst at once, then the rate, the newest winning meanwhile.

The session's two users of it are tested where they live: the guest's ``TopologyUpdate``s in
tests/unit/test_host_guest_bounds.py and tests/integration/test_host_topology_update.py, its port
changes below and in the fault matrix (tests/vm/test_4_faults.py).
"""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from pvhost.coalesce import Coalescer
from pvhost.session import PORT_BURST, PORT_RATE
from tests.sessions import lone_session


def test_a_burst_is_delivered_at_once_then_the_newest_at_the_rate() -> None:
    async def body() -> None:
        got: list[tuple[float, int]] = []
        t0 = time.monotonic()
        pacer = Coalescer[int](2.0, 3, lambda item: got.append((time.monotonic() - t0, item)))
        for i in range(3):  # the burst: each delivered on its own, with no wait
            pacer.submit(i)
            await asyncio.sleep(0.005)
        assert [item for _, item in got] == [0, 1, 2]
        assert all(at < 0.3 for at, _ in got), got  # a token takes 0.5 s to refill
        for i in range(3, 1000):  # over the rate: one waits, each newer one replaces it
            pacer.submit(i)
        assert pacer.pending == 999
        assert len(got) == 3, "nothing is delivered inside submit"
        await asyncio.sleep(1.2)
        assert [item for _, item in got] == [0, 1, 2, 999], "only the newest, once"
        assert 0.45 <= got[3][0] <= 1.0, got  # when the next token came (1/rate s)
        assert pacer.pending is None

    asyncio.run(body())


def test_merge_folds_what_waited_into_the_newest() -> None:
    async def body() -> None:
        got: list[tuple[str, int]] = []
        pacer = Coalescer[tuple[str, int]](
            20.0, 1, got.append, merge=lambda old, new: (new[0], old[1] + new[1])
        )
        pacer.submit(("first", 1))
        await asyncio.sleep(0.005)
        for state in ("a", "b", "c"):
            pacer.submit((state, 1))
        await asyncio.sleep(0.15)
        assert got == [("first", 1), ("c", 3)]

    asyncio.run(body())


def test_a_dropped_item_is_never_delivered_and_the_next_one_is() -> None:
    async def body() -> None:
        got: list[int] = []
        pacer = Coalescer[int](20.0, 1, got.append)
        pacer.submit(1)
        await asyncio.sleep(0.005)
        pacer.submit(2)  # waits for the next token
        pacer.drop()
        assert pacer.pending is None
        await asyncio.sleep(0.15)
        assert got == [1]
        pacer.submit(3)
        await asyncio.sleep(0.1)
        assert got == [1, 3]

    asyncio.run(body())


def test_a_guest_opening_and_closing_its_port_in_a_loop_is_acted_on_at_the_port_rate(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """QEMU's port events (summarised per batch by the QMP monitor) reach the session faster
    than ``PORT_RATE``: it acts on ``PORT_BURST`` at once, then on the newest state, with every
    change that waited folded into its count."""

    async def body() -> None:
        session = lone_session()
        for i in range(PORT_BURST):  # open, closed, open, ...: each acted on
            await session._port_changed(i % 2 == 0, 1)
            await asyncio.sleep(0.005)
        assert session.status.port == "open"
        for i in range(PORT_BURST, 200):  # faster than the rate: the newest waits
            await session._port_changed(i % 2 == 0, 1)
        assert session.status.port == "open", "not acted on before a token is there"
        await asyncio.sleep(1.0 / PORT_RATE + 0.3)
        assert session.status.port == "closed", "the newest state (i = 199: closed)"

    with caplog.at_level(logging.INFO, "pvhost.session"):
        asyncio.run(body())
    lines = [r.getMessage() for r in caplog.records if "agent's port" in r.getMessage()]
    assert lines == [
        *(f"vm1: the guest {'opened' if i % 2 == 0 else 'closed'} the agent's port" for i in
          range(PORT_BURST)),
        f"vm1: the guest closed the agent's port ({200 - PORT_BURST} changes)",
    ]  # fmt: skip
