"""Per-VM log rate limiting: what a guest can make the host log is bounded.

A guest decides how many bad frames and ``Error`` messages it sends; one WARNING line for
each would let it fill the host's disk (tens of MB a second) and, under journald's own rate
limit, mute every other VM's lines. Each VM's session logs through one :class:`LogThrottle`:
at most ``burst`` lines per ``interval`` seconds, and when the interval that suppressed some
ends, one line saying how many were suppressed.
"""

from __future__ import annotations

import asyncio
import logging
import time

__all__ = ["LogThrottle"]


class LogThrottle:
    """At most ``burst`` lines per ``interval`` s for one VM; then a "suppressed N" summary."""

    def __init__(
        self, logger: logging.Logger, vm: str, *, burst: int = 10, interval: float = 10.0
    ) -> None:
        self.logger = logger
        self.vm = vm
        self.burst = burst
        self.interval = interval
        #: Lines suppressed so far, in total (for tests and status).
        self.suppressed_total = 0
        self._window = -float("inf")
        self._logged = 0
        self._suppressed = 0
        self._summary: asyncio.TimerHandle | None = None

    def log(self, level: int, msg: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._window >= self.interval:
            self.flush()
            self._window, self._logged = now, 0
        if self._logged < self.burst:
            self._logged += 1
            self.logger.log(level, msg, *args)
            return
        self._suppressed += 1
        self.suppressed_total += 1
        if self._summary is None:
            # The summary comes when the window ends, even if the guest then falls silent.
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return
            delay = max(0.0, self._window + self.interval - now)
            self._summary = loop.call_later(delay, self.flush)

    def warning(self, msg: str, *args: object) -> None:
        self.log(logging.WARNING, msg, *args)

    def flush(self) -> None:
        """Log the summary of what was suppressed (if anything), now."""
        if self._summary is not None:
            self._summary.cancel()
            self._summary = None
        if self._suppressed:
            self.logger.warning(
                "%s: suppressed %d more guest-caused log line(s) in %g s",
                self.vm,
                self._suppressed,
                self.interval,
            )
            self._suppressed = 0
