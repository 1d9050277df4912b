"""Where the time of one placement change goes on the host, stage by stage.

A :class:`StageClock` adds up the seconds spent in each named stage of one change (the policy,
the state record, the cgroup writes, the verify, the isolation read-back); the service resets
it before a change and reports it after (``extpv_apply_stage_seconds{stage}`` in /metrics,
and one debug line per change with its host ``CLOCK_MONOTONIC`` start, which
``bench/vm_stages.py`` lines up with the guest's side). Timing only: nothing here changes
what a placement does.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["STAGES", "StageClock"]

#: The stages a change is split into, in the order they run.
STAGES = (
    "queue",  # the guest's update waited (token bucket, the placement lock)
    "policy",  # planning the change
    "thread",  # handing the change to the worker thread
    "record",  # state file saved before a kernel change and after an undo
    "isolate",  # isolate_from cpusets shrunk or grown (cgroup v1)
    "cgroup",  # the cpuset/partition writes of pins and undos
    "verify",  # each pin read back (thread, affinity, cgroup setting)
    "readback",  # what the VM's pins achieved (isolated | restricted), read back
)


class StageClock:
    """Seconds per stage of the change under way (see the module docstring)."""

    def __init__(self) -> None:
        self.spent: dict[str, float] = {}

    def reset(self) -> None:
        self.spent = {}

    def add(self, stage: str, seconds: float) -> None:
        self.spent[stage] = self.spent.get(stage, 0.0) + seconds

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - start)

    def summary(self) -> str:
        """``stage=ms`` pairs in stage order, for a log line."""
        return " ".join(f"{s}={self.spent[s] * 1000:.3f}" for s in STAGES if s in self.spent)
