"""Fault points for crash-safety tests: a kill -9 at one exact cgroupfs write.

A crash between two writes of pvhost's placement code cannot be timed from outside, so the
operation runs in a forked child whose cgroupfs writer ends the process (``os._exit``: no
cleanup, no ``finally``, as under SIGKILL) just before it writes the named file. What the
parent then finds on disk is what a restarted pvhost finds after a real crash there.

``modules``: the placement module whose ``write_text`` the operation writes through, or several
(the cgroup v2 backend writes through ``cgroup2`` and, in local mode, ``chain``): one count of
writes over all of them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

__all__ = ["KILLED", "killed_before_write", "recorded_writes"]

#: The child's exit code when it was killed at the write (128 + SIGKILL, as a shell shows it).
KILLED = 137

Writers = ModuleType | Sequence[ModuleType]


@contextmanager
def _writes_through(modules: Writers, before: Callable[[Path], None]) -> Iterator[None]:
    """Every module's ``write_text`` calls ``before(path)`` first; restored after."""
    mods = [modules] if isinstance(modules, ModuleType) else list(modules)
    real = {m: m.write_text for m in mods}

    def wrap(m: ModuleType) -> Callable[[Path, str], None]:
        def write(target: Path, value: str) -> None:
            before(target)
            real[m](target, value)

        return write

    for m in mods:
        m.write_text = wrap(m)  # type: ignore[attr-defined]  # a backend module
    try:
        yield
    finally:
        for m in mods:
            m.write_text = real[m]  # type: ignore[attr-defined]


def recorded_writes(modules: Writers, operation: Callable[[], object]) -> list[Path]:
    """The cgroupfs files ``operation`` writes through ``modules``, in order."""
    seen: list[Path] = []
    with _writes_through(modules, seen.append):
        operation()
    return seen


def killed_before_write(
    modules: Writers, path: Path, operation: Callable[[], object], nth: int = 1
) -> int:
    """Run ``operation`` in a forked child in which the writer of ``modules`` kills the child
    just before its ``nth`` write of ``path``; return the child's exit code: :data:`KILLED`
    when it got there, 0 when it never did."""
    child = os.fork()
    if child == 0:
        seen = 0

        def die_at(target: Path) -> None:
            nonlocal seen
            if target == path:
                seen += 1
                if seen == nth:
                    os._exit(KILLED)

        try:
            with _writes_through(modules, die_at):
                operation()
        finally:
            os._exit(0)
    _, status = os.waitpid(child, 0)
    return os.waitstatus_to_exitcode(status)
