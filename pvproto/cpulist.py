"""Linux CPU-list syntax (``0-3,8,10-11``), as in sysfs, cpusets and ``taskset -c``.

vCPU and pCPU sets cross the wire and the cgroup files in this form, so both sides
parse and print them here, the one place that does.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["MAX_CPUS", "CpuListError", "format_cpulist", "parse_cpulist"]

#: Highest CPU count accepted anywhere in extpv (Linux's NR_CPUS maximum is 8192).
MAX_CPUS = 8192


class CpuListError(ValueError):
    """A CPU list that is malformed: never silently read as an empty set."""


def parse_cpulist(text: str) -> frozenset[int]:
    """Parse ``"0-3,8"`` into ``{0, 1, 2, 3, 8}``. Whitespace around it is ignored.

    The empty string is the empty set (an empty ``cpuset.cpus`` is legal);
    anything else that is not a CPU list raises :class:`CpuListError`.
    """
    stripped = text.strip()
    if not stripped:
        return frozenset()
    cpus: set[int] = set()
    for part in stripped.split(","):
        lo_text, sep, hi_text = part.partition("-")
        try:
            lo = _cpu_number(lo_text)
            hi = _cpu_number(hi_text) if sep else lo
        except CpuListError as err:
            raise CpuListError(f"malformed CPU list {text!r}: {err}") from None
        if hi < lo:
            raise CpuListError(f"malformed CPU list {text!r}: range {part!r} runs backwards")
        cpus.update(range(lo, hi + 1))
    return frozenset(cpus)


def _cpu_number(text: str) -> int:
    if not text.isdigit() or not text.isascii():
        raise CpuListError(f"{text!r} is not a CPU number")
    value = int(text)
    if value >= MAX_CPUS:
        raise CpuListError(f"CPU {value} is beyond the supported maximum {MAX_CPUS - 1}")
    return value


def format_cpulist(cpus: Iterable[int]) -> str:
    """Print a set of CPUs as a compact list: ``{0, 1, 2, 5}`` → ``"0-2,5"``."""
    ordered = sorted(set(cpus))
    if ordered and ordered[0] < 0:
        raise CpuListError(f"negative CPU number {ordered[0]}")
    spans: list[list[int]] = []
    for cpu in ordered:
        if spans and cpu == spans[-1][1] + 1:
            spans[-1][1] = cpu
        else:
            spans.append([cpu, cpu])
    return ",".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in spans)
