"""An ftrace instance of this host's own (``/sys/kernel/tracing/instances/<name>``), on the
monotonic clock, for the benches' timelines; removed by :meth:`FtraceInstance.close`."""

from __future__ import annotations

from contextlib import suppress
from pathlib import Path

__all__ = ["TRACING", "FtraceInstance"]

TRACING = Path("/sys/kernel/tracing")


class FtraceInstance:
    def __init__(self, name: str, *, buffer_kb: int) -> None:
        self.dir = TRACING / "instances" / name
        self.dir.mkdir()
        (self.dir / "trace_clock").write_text("mono")
        (self.dir / "buffer_size_kb").write_text(str(buffer_kb))

    def enable(self, event: str, filter_expr: str | None = None) -> None:
        """``event``: ``group/name``, e.g. ``sched/sched_switch``."""
        ev = self.dir / "events" / event
        if filter_expr is not None:
            (ev / "filter").write_text(filter_expr)
        (ev / "enable").write_text("1")

    def start(self) -> None:
        (self.dir / "tracing_on").write_text("1")

    def stop(self) -> str:
        """Stop recording; the trace's text."""
        (self.dir / "tracing_on").write_text("0")
        return (self.dir / "trace").read_text()

    def close(self) -> None:
        with suppress(OSError):
            (self.dir / "tracing_on").write_text("0")
            self.dir.rmdir()
