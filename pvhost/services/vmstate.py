"""Per-VM bookkeeping of the services: what runs, who owns which program, what was dropped."""

from __future__ import annotations

from dataclasses import dataclass, field

from pvhost.metrics import Metrics
from pvhost.services.base import VmHandle
from pvhost.services.guard import Runner
from pvproto.ratelimit import TokenBucket

__all__ = ["VmState"]


@dataclass
class VmState:
    handle: VmHandle
    #: service → "enabled" | "disabled" | "failed: REASON"
    states: dict[str, str]
    runners: dict[str, Runner] = field(default_factory=dict)
    #: program id → the service whose program it is (in this VM).
    owners: dict[str, str] = field(default_factory=dict)
    #: Records per second the guest may send its services (``max_records_per_s``).
    bucket: TokenBucket = field(default_factory=lambda: TokenBucket(1.0, 1))
    records: int = 0
    #: reason → records (or calls) dropped (``_dropped`` in ``pvctl status``).
    dropped: dict[str, int] = field(default_factory=dict)

    def enabled(self, service: str) -> bool:
        return self.states.get(service) == "enabled"

    def drop(self, metrics: Metrics, reason: str, count: int = 1) -> None:
        """Count ``count`` records (or calls) dropped for ``reason``, here and in /metrics."""
        self.dropped[reason] = self.dropped.get(reason, 0) + count
        metrics.service_dropped.labels(vm=self.handle.name, reason=reason).inc(count)
