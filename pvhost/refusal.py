"""Why a wanted vCPU was not placed: a code for machines, a message for people.

The code is what metrics count (``extpv_refusals_total{code}``) and what a program may test;
the message is what the guest's log and ``pvctl status`` show. Rewording a message never
moves a metric, and a guest can never make up a label.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from pvproto import VcpuPlacement

__all__ = ["Refusal", "RefusalCode"]

#: Longest refusal text a VcpuPlacement carries.
_MAX_MESSAGE = 1024


class RefusalCode(enum.StrEnum):
    UNKNOWN_VCPU = "unknown-vcpu"
    QUOTA = "quota"
    POOL_EXHAUSTED = "pool-exhausted"
    IDENTITY_UNAVAILABLE = "identity-unavailable"
    PARTITION_INVALID = "partition-invalid"
    PLACEMENT_FAILED = "placement-failed"
    NO_MONITOR = "no-monitor"
    RELEASED = "released"
    #: A libvirt domain pins its vCPUs itself (<cputune><vcpupin>): extpv leaves it alone.
    STATIC_PINNING = "static-pinning"
    INTERNAL = "internal"


@dataclass(frozen=True)
class Refusal:
    code: RefusalCode
    message: str

    def placement(self, vcpu: int) -> VcpuPlacement:
        return VcpuPlacement(vcpu=vcpu, refused=self.message[:_MAX_MESSAGE])
