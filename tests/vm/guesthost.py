"""What the in-guest probes share (guest_cgroup2_probe.py, guest_isolation_probe.py): they run
INSIDE a test guest acting as a host, import this checkout over the 9p share, read the guest's
cgroupfs and /proc, and record every step's outcome (an error too) in one JSON object."""

from __future__ import annotations

import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["ROOT", "allowed", "cgroup_of", "read", "stepper"]

#: The guest's unified hierarchy (cpuset enabled).
ROOT = Path("/sys/fs/cgroup")


def read(path: Path) -> str | None:
    """A cgroupfs or /proc file's contents, stripped; None when it cannot be read."""
    try:
        return path.read_text().strip()
    except OSError:
        return None


def allowed(tid: int) -> str | None:
    """The CPUs ``tid`` may run on (Cpus_allowed_list), None once it is gone."""
    for line in (read(Path(f"/proc/{tid}/status")) or "").splitlines():
        if line.startswith("Cpus_allowed_list:"):
            return line.split(":", 1)[1].strip()
    return None


def cgroup_of(tid: int) -> str | None:
    """The unified-hierarchy cgroup of ``tid`` (the ``0::`` line)."""
    for line in (read(Path(f"/proc/{tid}/cgroup")) or "").splitlines():
        if line.startswith("0::"):
            return line[3:]
    return None


def stepper(obs: dict[str, Any]) -> Callable[[str, Callable[[], Any]], Any]:
    """``step(name, fn)``: ``fn()``'s value, or None with the error (and the end of its
    traceback) recorded under ``obs["errors"][name]``, so that the later steps still run and
    the host-side test shows everything that was seen."""
    errors: dict[str, str] = obs.setdefault("errors", {})

    def step(name: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception as err:
            errors[name] = f"{type(err).__name__}: {err}\n{traceback.format_exc()[-1500:]}"
            return None

    return step
