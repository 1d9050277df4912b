"""A VM session that is cancelled (pvhost stops, the VM's directory goes) closes its monitor.

QEMU serves one QMP client at a time: a connection the session leaves open locks out the next
one (a pvhost restarted in the same process, a new session for the same VM), which then waits
for a greeting that never comes. The session's cleanup once skipped ``monitor.close()`` when it
was itself being cancelled (``cancel_and_wait`` re-raises the caller's cancellation), found by
tests/integration/test_agent_live.py's pvhost restart.

The monitor here is a recording stand-in for the session's Monitor protocol (the QMP side is
not under test: what is, is that the session calls ``close()``); the agent socket does not exist,
so the channel loop keeps retrying, as it does while a guest has not opened its port.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from extpv.vcpus import VcpuThread
from tests.sessions import lone_session


class RecordingMonitor:
    """Connected at once; open until closed; records close()."""

    def __init__(self, *, port_open_blocks: bool = False) -> None:
        self.vcpus: dict[int, VcpuThread] = {}
        self.on_change: Any = None
        self.on_port: Any = None
        self.closed = asyncio.Event()
        self.asked = asyncio.Event()
        self.port_open_blocks = port_open_blocks

    async def connect(self, timeout: float = 5.0) -> None:
        pass

    async def refresh(self, timeout: float = 5.0) -> dict[int, VcpuThread]:
        return self.vcpus

    async def wait_closed(self) -> None:
        await self.closed.wait()

    async def close(self) -> None:
        self.closed.set()

    async def port_open(self, socket_path: Path, timeout: float = 5.0) -> bool | None:
        self.asked.set()
        if self.port_open_blocks:
            await asyncio.Event().wait()  # QEMU slow to answer query-chardev
        return False


@pytest.mark.parametrize("where", ["waiting", "asking-the-port"])
def test_a_cancelled_session_closes_its_monitor(where: str) -> None:
    async def body() -> None:
        monitor = RecordingMonitor(port_open_blocks=where == "asking-the-port")
        session = lone_session()
        task = asyncio.create_task(session.run(monitor))  # type: ignore[arg-type]
        await asyncio.wait_for(monitor.asked.wait(), 5)
        await asyncio.sleep(0.05)  # the channel loop running (retrying the missing socket)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 5)
        assert monitor.closed.is_set(), "the session left its QMP connection open"

    asyncio.run(body())
