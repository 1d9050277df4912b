"""Prometheus metrics of the host service, exposed with ``prometheus_client``.

Each :class:`Metrics` has its own registry (a test may run several services in one process).
Besides extpv's own series the exposition carries the standard process and platform
collectors (CPU seconds, resident memory, open fds) and ``extpv_build_info``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable, Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from pvhost.errors import HostError
from pvhost.placement.isolation import Isolation
from pvhost.refusal import RefusalCode

__all__ = ["Metrics", "serve_metrics"]

#: Apply-latency histogram buckets, seconds.
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
VERSION = "0.1.0"


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        Info("extpv_build", "extpv version.", registry=self.registry).info({"version": VERSION})
        self.requests = Counter(
            "extpv_affinity_requests",
            "AffinityUpdates received, per VM.",
            ["vm"],
            registry=self.registry,
        )
        self.refusals = Counter(
            "extpv_refusals",
            "vCPU placements refused, by refusal code.",
            ["code"],
            registry=self.registry,
        )
        for code in RefusalCode:  # every code is exposed from the start, at 0
            self.refusals.labels(code=code.value)
        self.pinned = Gauge("extpv_pinned_vcpus", "vCPUs pinned now.", registry=self.registry)
        self.vms = Gauge("extpv_vms", "VMs with a live session.", registry=self.registry)
        self.isolation = Gauge(
            "extpv_vcpu_isolation",
            "1 per pinned vCPU, labelled with what its pin achieved: isolation isolated (no "
            "other task may run on the pCPU) or restricted, and why (a code; empty when isolated).",
            ["vm", "vcpu", "pcpu", "isolation", "why"],
            registry=self.registry,
        )
        self.apply_seconds = Histogram(
            "extpv_apply_seconds",
            "Time to apply one placement change.",
            buckets=BUCKETS,
            registry=self.registry,
        )

        self.service_records = Counter(
            "extpv_service_records",
            "Ring-buffer records from guest programs handed to their service, per VM.",
            ["vm", "service"],
            registry=self.registry,
        )
        self.service_dropped = Counter(
            "extpv_service_dropped",
            "Guest program records dropped, per VM and reason (layout: not the service's "
            "layout; rate: over max_records_per_s; backlog: the service is behind; unclaimed: "
            "no enabled service owns the program).",
            ["vm", "reason"],
            registry=self.registry,
        )
        self.service_failures = Counter(
            "extpv_service_failures",
            "Times a service raised, hung or returned nonsense and was disabled for a VM.",
            ["service"],
            registry=self.registry,
        )

    def add_service_collector(self, source: Callable[[], Iterable[tuple[str, str, float]]]) -> None:
        """Export ``(service, name, value)`` triples as ``extpv_service_value``."""
        self.registry.register(_ServiceValues(source))

    def set_isolation(self, pins: dict[str, dict[int, tuple[int, Isolation]]]) -> None:
        """Export every pin's isolation (VM → vCPU → (pCPU, isolation)); nothing else stays."""
        self.isolation.clear()
        for vm, vcpus in pins.items():
            for vcpu, (pcpu, isolation) in vcpus.items():
                self.isolation.labels(
                    vm=vm, vcpu=str(vcpu), pcpu=str(pcpu), isolation=isolation.mode,
                    why=isolation.why,
                ).set(1)  # fmt: skip

    def requests_of(self, vm: str) -> float:
        """AffinityUpdates received from ``vm`` so far."""
        return self.registry.get_sample_value("extpv_affinity_requests_total", {"vm": vm}) or 0.0

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _ServiceValues(Collector):
    def __init__(self, source: Callable[[], Iterable[tuple[str, str, float]]]) -> None:
        self._source = source

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "extpv_service_value", "A value a service exports.", labels=["service", "name"]
        )
        for service, name, value in self._source():
            family.add_metric([service, name], value)
        yield family

    def describe(self) -> Iterator[Metric]:
        return iter(())  # collected lazily: the services' names are not known in advance


async def serve_metrics(metrics: Metrics, host: str, port: int) -> asyncio.Server:
    """Serve ``GET /metrics``; anything else is a 404. Reads at most one small request.

    An asyncio server (not prometheus_client's thread) so a scrape never races the loop's
    updates and a taken port is a HostError at start, not in a background thread.
    """

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(5):
                request = await reader.readuntil(b"\r\n\r\n")
            path = request.split(b" ", 2)[1] if request.count(b" ") >= 2 else b""
            if path == b"/metrics":
                body = metrics.render()
                head = b"HTTP/1.0 200 OK\r\nContent-Type: " + CONTENT_TYPE_LATEST.encode() + b"\r\n"
            else:
                body, head = b"not found\n", b"HTTP/1.0 404 Not Found\r\n"
            writer.write(head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    try:
        return await asyncio.start_server(handle, host, port, limit=8192)
    except OSError as err:
        raise HostError(
            f"cannot serve /metrics on {host}:{port}: {err.strerror or err} (set [service] "
            'metrics to a free host:port, or to "" to turn /metrics off)'
        ) from err
