"""Placement backends (cgroup v2, cgroup v1) and the automatic choice between them."""

from pvhost.placement.base import Finding, PlacementBackend, thread_allowed_cpus
from pvhost.placement.cgroup1 import Cgroup1Backend
from pvhost.placement.cgroup2 import Cgroup2Backend, partition_reason
from pvhost.placement.detect import detect_backend

__all__ = [
    "Cgroup1Backend",
    "Cgroup2Backend",
    "Finding",
    "PlacementBackend",
    "detect_backend",
    "partition_reason",
    "thread_allowed_cpus",
]
