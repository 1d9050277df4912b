"""Metrics exposition and refusal labels; the token bucket's pacing."""

from __future__ import annotations

import asyncio
import time

from pvhost.metrics import Metrics, reason_code
from pvhost.ratelimit import TokenBucket


def test_refusal_labels_are_bounded_codes() -> None:
    assert reason_code("quota of 2 pinned vCPUs reached") == "quota"
    assert reason_code("pool exhausted: no free pCPU among 1-3") == "pool-exhausted"
    assert reason_code("unknown vCPU 9: the VM has vCPUs 0-2") == "unknown-vcpu"
    assert reason_code("identity: pCPU 0 is a housekeeping CPU") == "identity-unavailable"
    assert reason_code("partition invalid (cpuset.cpus is empty); undone") == "partition-invalid"
    assert reason_code("anything a guest could make up \n{}") == "placement-failed"


def test_render_is_prometheus_text() -> None:
    m = Metrics()
    m.requests["vm1"] += 3
    m.refusals["quota"] += 1
    m.pinned = 2
    m.observe_apply(0.002)
    m.observe_apply(3.0)
    text = m.render()
    assert 'extpv_affinity_requests_total{vm="vm1"} 3' in text
    assert 'extpv_refusals_total{reason="quota"} 1' in text
    assert "extpv_pinned_vcpus 2" in text
    assert 'extpv_apply_seconds_bucket{le="0.0025"} 1' in text
    assert 'extpv_apply_seconds_bucket{le="+Inf"} 2' in text
    assert "extpv_apply_seconds_count 2" in text


def test_token_bucket_paces_to_rate_after_burst() -> None:
    async def take(n: int) -> float:
        bucket = TokenBucket(rate=50, burst=2)
        start = time.monotonic()
        for _ in range(n):
            await bucket.take()
        return time.monotonic() - start

    elapsed = asyncio.run(take(7))  # 2 free, then 5 at 50/s
    assert 0.08 <= elapsed < 1.0
