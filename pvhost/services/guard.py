"""One hook call into a plugin, guarded; one VM's calls into one service, in order.

A plugin is third-party code in the daemon: :func:`guarded` gives a call a deadline and checks
what it returns; an exception, a deadline missed or a value where None was due is turned into
a reason (the caller disables the service for that VM). :class:`Runner` runs one VM's calls
into one service in order, in a task of their own, with a bounded queue: a slow service delays
neither the VM's channel nor another service.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from extpv.aio import being_cancelled

__all__ = ["MAX_REASON", "Call", "Runner", "guarded"]

_log = logging.getLogger("pvhost.services.manager")

#: Longest failure reason kept (a plugin's exception text is its own).
MAX_REASON = 300

Call = Callable[[], Awaitable[object]]


async def guarded(service: str, hook: str, call: Call, timeout: float | None) -> str | None:
    """Run one hook call; None when it went well, else why it failed.

    ``timeout`` None: no deadline (built-in services). On a deadline the call is cancelled
    and not awaited: a hook that ignores cancellation stays its own problem.
    """
    task = asyncio.ensure_future(call())
    try:
        done, _ = await asyncio.wait({task}, timeout=timeout)
    except asyncio.CancelledError:
        task.cancel()
        raise
    if not done:
        task.cancel()
        return f"{hook} did not finish within {timeout:g} s"
    try:
        result = task.result()
    except asyncio.CancelledError:
        if being_cancelled():
            raise
        return f"{hook} was cancelled"
    except Exception as err:
        _log.debug("service %s: %s raised", service, hook, exc_info=True)
        return f"{hook} raised {type(err).__name__}: {err}"
    if result is not None:
        return f"{hook} returned {type(result).__name__}, not None"
    return None


class Runner:
    """One VM's calls into one service, in order, each through ``guard``; the first failure
    goes to ``on_failure`` and ends the runner."""

    def __init__(
        self,
        name: str,
        max_queued: int,
        guard: Callable[[str, Call], Awaitable[str | None]],
        on_failure: Callable[[str], None],
    ) -> None:
        self._guard, self._on_failure = guard, on_failure
        self.queue: asyncio.Queue[tuple[str, Call]] = asyncio.Queue(max_queued)
        self.task = asyncio.get_running_loop().create_task(self._run(), name=name)

    def submit(self, hook: str, call: Call) -> bool:
        """Queue a call; False when the queue is full (the caller counts the drop)."""
        try:
            self.queue.put_nowait((hook, call))
        except asyncio.QueueFull:
            return False
        return True

    async def _run(self) -> None:
        while True:
            hook, call = await self.queue.get()
            reason = await self._guard(hook, call)
            if reason is not None:
                self._on_failure(reason)
                return
