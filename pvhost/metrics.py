"""Prometheus text exposition of the service's counters, over a tiny asyncio HTTP server."""

from __future__ import annotations

import asyncio
import bisect
import contextlib
from collections import Counter

__all__ = ["Metrics", "reason_code", "serve_metrics"]

#: Apply-latency histogram buckets, seconds.
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


def reason_code(reason: str) -> str:
    """A short, bounded label for a refusal reason (labels must not be guest-controlled)."""
    for prefix, code in (
        ("unknown vCPU", "unknown-vcpu"),
        ("quota", "quota"),
        ("pool exhausted", "pool-exhausted"),
        ("identity:", "identity-unavailable"),
        ("partition", "partition-invalid"),
        ("released", "released"),
    ):
        if reason.startswith(prefix):
            return code
    return "placement-failed"


class Metrics:
    def __init__(self) -> None:
        self.requests: Counter[str] = Counter()
        self.refusals: Counter[str] = Counter()
        self.pinned = 0
        self.vms = 0
        self._buckets = [0] * (len(BUCKETS) + 1)
        self._sum = 0.0
        self._count = 0

    def observe_apply(self, seconds: float) -> None:
        self._buckets[bisect.bisect_left(BUCKETS, seconds)] += 1
        self._sum += seconds
        self._count += 1

    def render(self) -> str:
        out = [
            "# HELP extpv_affinity_requests_total AffinityUpdates received, per VM.",
            "# TYPE extpv_affinity_requests_total counter",
        ]
        out += [
            f'extpv_affinity_requests_total{{vm="{vm}"}} {n}'
            for vm, n in sorted(self.requests.items())
        ]
        out += [
            "# HELP extpv_refusals_total vCPU placements refused, by reason.",
            "# TYPE extpv_refusals_total counter",
        ]
        out += [
            f'extpv_refusals_total{{reason="{r}"}} {n}' for r, n in sorted(self.refusals.items())
        ]
        out += [
            "# HELP extpv_pinned_vcpus vCPUs pinned now.",
            "# TYPE extpv_pinned_vcpus gauge",
            f"extpv_pinned_vcpus {self.pinned}",
            "# HELP extpv_vms VMs with a live session.",
            "# TYPE extpv_vms gauge",
            f"extpv_vms {self.vms}",
            "# HELP extpv_apply_seconds Time to apply one placement change.",
            "# TYPE extpv_apply_seconds histogram",
        ]
        total = 0
        for bound, n in zip((*BUCKETS, float("inf")), self._buckets, strict=True):
            total += n
            le = "+Inf" if bound == float("inf") else repr(bound)
            out.append(f'extpv_apply_seconds_bucket{{le="{le}"}} {total}')
        out += [f"extpv_apply_seconds_sum {self._sum}", f"extpv_apply_seconds_count {self._count}"]
        return "\n".join(out) + "\n"


async def serve_metrics(metrics: Metrics, host: str, port: int) -> asyncio.Server:
    """Serve ``GET /metrics``; anything else is a 404. Reads at most one small request."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(5):
                request = await reader.readuntil(b"\r\n\r\n")
            path = request.split(b" ", 2)[1] if request.count(b" ") >= 2 else b""
            if path == b"/metrics":
                body = metrics.render().encode()
                head = b"HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n"
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

    return await asyncio.start_server(handle, host, port, limit=8192)
