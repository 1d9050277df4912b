"""Fault points for crash-safety tests: a kill -9 at one exact cgroupfs write.

A crash between two writes of pvhost's placement code cannot be timed from outside, so the
operation runs in a forked child whose cgroupfs writer ends the process (``os._exit``: no
cleanup, no ``finally``, as under SIGKILL) just before it writes the named file. What the
parent then finds on disk is what a restarted pvhost finds after a real crash there.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

__all__ = ["KILLED", "killed_before_write"]

#: The child's exit code when it was killed at the write (128 + SIGKILL, as a shell shows it).
KILLED = 137


def killed_before_write(
    module: ModuleType, path: Path, operation: Callable[[], object], nth: int = 1
) -> int:
    """Run ``operation`` in a forked child in which ``module.write_text`` (a placement
    backend's writer) kills the child just before its ``nth`` write of ``path``; return the
    child's exit code: :data:`KILLED` when it got there, 0 when it never did."""
    child = os.fork()
    if child == 0:
        real = module.write_text
        seen = 0

        def write_or_die(target: Path, value: str) -> None:
            nonlocal seen
            if target == path:
                seen += 1
                if seen == nth:
                    os._exit(KILLED)
            real(target, value)

        module.write_text = write_or_die  # type: ignore[attr-defined]  # a backend module
        try:
            operation()
        finally:
            os._exit(0)
    _, status = os.waitpid(child, 0)
    return os.waitstatus_to_exitcode(status)
