"""Rate-limited coalescing: a stream of items acted on at a bounded rate, the newest winning.

What a guest can make the host act on as often as it likes (its port opening and closing, its
CPUs changing) goes through a :class:`Coalescer`: acted on at once up to a burst, then at most
``rate`` per second; what comes meanwhile replaces the item that waits, so a guest sending in a
loop costs the host one stored item, one timer and ``rate`` actions per second.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Generic, TypeVar

from pvproto.ratelimit import TokenBucket

__all__ = ["Coalescer"]

T = TypeVar("T")


class Coalescer(Generic[T]):
    """Delivers the items :meth:`submit` is given, at most ``rate`` per second after a burst of
    ``burst``; while over the rate only the newest waits, delivered once a token is there.

    ``merge(waiting, newer)`` makes the item that replaces a waiting one (default: ``newer``),
    e.g. to count how many were folded into it. ``deliver`` runs in the event loop (a timer
    callback), never inside :meth:`submit`. Needs a running event loop.
    """

    def __init__(
        self,
        rate: float,
        burst: int,
        deliver: Callable[[T], None],
        *,
        merge: Callable[[T, T], T] | None = None,
    ) -> None:
        self._bucket = TokenBucket(rate, burst)
        self._deliver = deliver
        self._merge = merge
        #: The waiting item, boxed (an item may itself be None).
        self._pending: tuple[T] | None = None
        self._timer: asyncio.TimerHandle | None = None

    @property
    def pending(self) -> T | None:
        """The item waiting for a token (None when none waits)."""
        return None if self._pending is None else self._pending[0]

    def submit(self, item: T) -> None:
        """Deliver ``item`` when a token is there (at once, if the burst allows), unless a
        newer one comes first."""
        if self._pending is not None and self._merge is not None:
            item = self._merge(self._pending[0], item)
        self._pending = (item,)
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._bucket.delay(), self._fire)

    def drop(self) -> None:
        """Forget the waiting item, if any (what it said no longer holds)."""
        self._pending = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _fire(self) -> None:
        self._timer = None
        if self._pending is None:
            return
        if not self._bucket.try_take():  # the timer fired a hair early
            self._timer = asyncio.get_running_loop().call_later(self._bucket.delay(), self._fire)
            return
        (item,), self._pending = self._pending, None
        self._deliver(item)
