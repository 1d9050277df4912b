"""Token bucket: how many frames, peer restarts, AffinityUpdates or service records per second
one peer may make the other side handle."""

from __future__ import annotations

import asyncio
import time

__all__ = ["TokenBucket"]


class TokenBucket:
    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = float(burst)
        self._stamp = time.monotonic()

    def _refill(self) -> None:
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now

    def delay(self) -> float:
        """Seconds until a token is available (0 when one is there now)."""
        self._refill()
        return 0.0 if self._tokens >= 1 else (1 - self._tokens) / self.rate

    async def take(self) -> None:
        """Wait (at most 1/rate seconds) for a token and consume it."""
        while (wait := self.delay()) > 0:
            await asyncio.sleep(wait)
        self._tokens -= 1

    def try_take(self, count: int = 1) -> bool:
        """Consume ``count`` tokens if they are there now; never waits."""
        self._refill()
        if self._tokens < count:
            return False
        self._tokens -= count
        return True
