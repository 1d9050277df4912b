"""The host's CPU topology, read from sysfs in this one place.

A malformed CPU list anywhere is a :class:`TopologyError`, never an empty set:
an empty set would silently make every policy refuse (or worse, allow) everything.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pvhost.errors import TopologyError
from pvproto import CpuListError, parse_cpulist

__all__ = ["HostTopology", "read_host_topology"]


@dataclass(frozen=True)
class HostTopology:
    """Online CPUs and their SMT sibling groups (one per core)."""

    online: frozenset[int]
    #: One entry per physical core: the online CPUs sharing it (SMT siblings), sorted by first CPU.
    cores: tuple[frozenset[int], ...]

    def siblings(self, cpu: int) -> frozenset[int]:
        """The CPUs sharing ``cpu``'s core (``cpu`` included)."""
        for core in self.cores:
            if cpu in core:
                return core
        return frozenset({cpu})

    @classmethod
    def flat(cls, online: frozenset[int] | set[int], smt: int = 1) -> HostTopology:
        """A synthetic topology: ``smt`` consecutive CPUs per core (simulations)."""
        cpus = sorted(online)
        cores = tuple(frozenset(cpus[i : i + smt]) for i in range(0, len(cpus), smt))
        return cls(online=frozenset(cpus), cores=cores)


def _read_list(path: Path) -> frozenset[int]:
    try:
        text = path.read_text()
    except OSError as err:
        raise TopologyError(f"cannot read {path}: {err.strerror}") from err
    try:
        return parse_cpulist(text)
    except CpuListError as err:
        raise TopologyError(f"{path}: {err}") from err


def read_host_topology(sysfs: Path = Path("/sys")) -> HostTopology:
    """Read online CPUs and SMT siblings from ``sysfs``."""
    cpu_dir = sysfs / "devices/system/cpu"
    online = _read_list(cpu_dir / "online")
    if not online:
        raise TopologyError(f"{cpu_dir / 'online'} lists no online CPU")
    cores: dict[frozenset[int], None] = {}
    for cpu in sorted(online):
        siblings_file = cpu_dir / f"cpu{cpu}/topology/thread_siblings_list"
        siblings = _read_list(siblings_file) & online if siblings_file.exists() else frozenset()
        if cpu not in siblings:
            # No topology directory (some VMs, containers): the CPU is its own core.
            siblings = frozenset({cpu})
        cores.setdefault(siblings, None)
    return HostTopology(online=online, cores=tuple(sorted(cores, key=min)))
