"""cancel_and_wait absorbs the child's cancellation, never the caller's."""

from __future__ import annotations

import asyncio

import pytest

from extpv.aio import cancel_and_wait


def test_the_childs_cancellation_is_absorbed() -> None:
    async def main() -> str:
        child = asyncio.create_task(asyncio.sleep(60))
        await asyncio.sleep(0)
        await cancel_and_wait(child)
        return "went on"

    assert asyncio.run(main()) == "went on"


def test_a_cancellation_of_the_caller_while_it_waits_is_not_swallowed() -> None:
    """The child takes a while to end; the caller is cancelled meanwhile (a VM's session
    stopped while it closes its monitor): the caller must end, not carry on."""

    async def slow_to_end() -> None:
        try:
            await asyncio.sleep(60)
        finally:
            await asyncio.sleep(0.2)  # cleanup that takes time, like a QMP disconnect

    async def caller(log: list[str]) -> None:
        child = asyncio.create_task(slow_to_end())
        await asyncio.sleep(0)
        await cancel_and_wait(child)
        log.append("carried on after being cancelled")

    async def main() -> list[str]:
        log: list[str] = []
        task = asyncio.create_task(caller(log))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return log

    assert asyncio.run(main()) == []


def test_another_error_of_the_child_is_raised() -> None:
    async def fails() -> None:
        try:
            await asyncio.sleep(60)
        finally:
            raise RuntimeError("cleanup failed")

    async def main() -> None:
        child = asyncio.create_task(fails())
        await asyncio.sleep(0)
        await cancel_and_wait(child)

    with pytest.raises(RuntimeError, match="cleanup failed"):
        asyncio.run(main())
