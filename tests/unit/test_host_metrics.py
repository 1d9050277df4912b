"""Metrics exposition and refusal codes; the token bucket's pacing."""

from __future__ import annotations

import asyncio
import time

from pvhost.metrics import Metrics
from pvhost.refusal import Refusal, RefusalCode
from pvproto.ratelimit import TokenBucket


def test_refusals_are_counted_by_code_never_by_message() -> None:
    """Rewording a message never moves a metric; every code is exposed from the start."""
    m = Metrics()
    for message in ("quota of 2 pinned vCPUs reached", "quota: reworded entirely"):
        refusal = Refusal(RefusalCode.QUOTA, message)
        m.refusals.labels(code=refusal.code.value).inc()
    text = m.render().decode()
    assert 'extpv_refusals_total{code="quota"} 2.0' in text
    for code in RefusalCode:
        assert f'extpv_refusals_total{{code="{code.value}"}}' in text
    assert "reworded" not in text


def test_exposition_is_prometheus_text_with_process_metrics() -> None:
    m = Metrics()
    for _ in range(3):
        m.requests.labels(vm="vm1").inc()
    m.pinned.set(2)
    m.apply_seconds.observe(0.002)
    m.apply_seconds.observe(3.0)
    text = m.render().decode()
    assert m.requests_of("vm1") == 3
    assert 'extpv_affinity_requests_total{vm="vm1"} 3.0' in text
    assert "extpv_pinned_vcpus 2.0" in text
    assert 'extpv_apply_seconds_bucket{le="0.0025"} 1.0' in text
    assert 'extpv_apply_seconds_bucket{le="+Inf"} 2.0' in text
    assert "extpv_apply_seconds_count 2.0" in text
    assert 'extpv_build_info{version="' in text
    assert "process_resident_memory_bytes" in text


def test_token_bucket_paces_to_rate_after_burst() -> None:
    async def take(n: int) -> float:
        bucket = TokenBucket(rate=50, burst=2)
        start = time.monotonic()
        for _ in range(n):
            await bucket.take()
        return time.monotonic() - start

    elapsed = asyncio.run(take(7))  # 2 free, then 5 at 50/s
    assert 0.08 <= elapsed < 1.0


def test_each_pin_is_exported_with_what_it_achieved_and_a_gone_pin_disappears() -> None:
    from pvhost.placement.isolation import ISOLATED, cgroup1_isolation

    m = Metrics()
    root = cgroup1_isolation(["/machine.slice"], {"/": 5})
    m.set_isolation({"db1": {0: (1, ISOLATED), 1: (2, root)}})
    text = m.render().decode()
    assert (
        'extpv_vcpu_isolation{isolation="isolated",pcpu="1",vcpu="0",vm="db1",why=""} 1.0' in text
    )
    assert (
        'extpv_vcpu_isolation{isolation="restricted",pcpu="2",vcpu="1",vm="db1",'
        'why="root-cpuset-tasks"} 1.0'
    ) in text
    assert "task(s)" not in text  # the sentence stays out of the labels
    m.set_isolation({"db1": {0: (1, ISOLATED)}})
    assert 'vcpu="1"' not in m.render().decode()
