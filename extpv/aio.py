"""asyncio pieces every daemon needs and that are easy to get subtly wrong.

``task.cancel(); with suppress(CancelledError): await task`` swallows *two* cancellations: the
child's, which is meant, and one delivered to the caller while it waits, which is not — the
caller then carries on as if nothing happened (seen: a VM session that went on reconnecting for
ever after its VM was gone, and a pvhost that then never finished its SIGTERM). Python 3.11's
``Task.cancelling()`` tells the two apart.
"""

from __future__ import annotations

import asyncio
from typing import Any

__all__ = ["being_cancelled", "cancel_and_wait"]


def being_cancelled() -> bool:
    """Whether the running task has a cancellation request pending (``Task.cancelling()``)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


async def cancel_and_wait(task: asyncio.Future[Any]) -> None:
    """Cancel ``task`` and wait until it has ended; its cancellation is absorbed, a
    cancellation of the caller is not, and any other error it ended with is raised."""
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        if being_cancelled():
            raise
