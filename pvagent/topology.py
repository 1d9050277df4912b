"""The guest's CPU topology as its kernel reports it in sysfs."""

from __future__ import annotations

from pathlib import Path

from pvagent.errors import AgentError
from pvproto import CpuListError, GuestTopology, parse_cpulist

__all__ = ["read_topology"]

SYSFS_CPU = Path("/sys/devices/system/cpu")


def read_topology(root: Path = SYSFS_CPU) -> GuestTopology:
    """Online vCPUs and their SMT sibling groups (``topology/thread_siblings_list``)."""
    try:
        online = parse_cpulist((root / "online").read_text())
    except (OSError, CpuListError) as err:
        raise AgentError(f"cannot read the online CPUs from {root}/online: {err}") from err
    groups: set[tuple[int, ...]] = set()
    for cpu in online:
        try:
            siblings = parse_cpulist(
                (root / f"cpu{cpu}" / "topology" / "thread_siblings_list").read_text()
            )
        except (OSError, CpuListError):
            continue  # no SMT information for this CPU: it stands alone
        group = tuple(sorted(siblings & online))
        if len(group) > 1:
            groups.add(group)
    # A vCPU belongs to at most one group; sysfs agrees with itself, but be strict.
    seen: set[int] = set()
    clean = []
    for group in sorted(groups):
        if seen.isdisjoint(group):
            clean.append(list(group))
            seen.update(group)
    return GuestTopology(online_vcpus=sorted(online), sibling_groups=clean)
