"""The memory service's decisions, as a pure function (no I/O, no clock: unit-tested).

Vocabulary: QEMU's balloon *target* is the memory the guest may use (MiB here). Raising it
*deflates* the balloon (memory goes back to the guest, and the host must have it); lowering it
*inflates* the balloon (the host takes memory back).

Each window the service asks :func:`decide` with what the guest reported in it:

* **pressure** (direct-reclaim stall time in the window at least ``stall_ms``, or an OOM
  kill): raise the target by ``step_mib`` (two steps after an OOM kill), never past the VM's
  maximum and never so far that the host's MemAvailable would fall below ``host_floor_mib``;
* **low** (the guest's own ``stat-available-memory``, taken after the last change settled,
  is below ``guest_reserve_mib``): the same step, before any reclaim. Reclaim is a late
  signal: a guest whose page cache is already gone goes from its first direct reclaim to an
  OOM kill in milliseconds (51 reclaims and a kill in 33 ms in the VM test), while its
  MemAvailable fell below the reserve seconds earlier;
* **quiet** for ``quiet_s`` since the last pressure: lower it by ``step_mib``, never below
  the VM's minimum, and only when the guest's own statistics (virtio-balloon's
  ``stat-available-memory``, taken after the last change settled) say it keeps at least
  ``guest_reserve_mib`` available after the step. No pressure is not the same as memory to
  spare: a guest that was just given memory stops stalling *because* it is using it, and
  taking it back then drove the VM test's allocation into the OOM killer;
* at most ``max_changes_per_s`` changes per second per VM, whatever the guest sends.

Every call returns a :class:`Decision` with its reason, also when nothing changes.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "Bounds",
    "Decision",
    "Policy",
    "VmMemoryState",
    "WindowStats",
    "decide",
    "guest_is_low",
]


@dataclass(frozen=True)
class Policy:
    step_mib: int = 128
    quiet_s: float = 30.0
    host_floor_mib: int = 1024
    max_changes_per_s: float = 1.0
    #: Reclaim stall per window that counts as pressure (0: any reclaim).
    stall_ms: float = 0.0
    #: What the guest keeps available (its MemAvailable): no inflation leaves it less, and a
    #: guest that reports less gets a step (``low-available``).
    guest_reserve_mib: int = 128
    #: Inflate after quiet without the guest's statistics (for guests whose balloon driver
    #: does not report them; an operator's explicit choice, never a fallback).
    inflate_without_guest_stats: bool = False


@dataclass(frozen=True)
class Bounds:
    min_mib: int
    max_mib: int


@dataclass(frozen=True)
class WindowStats:
    reclaims: int = 0
    stall_ns: int = 0
    ooms: int = 0


@dataclass
class VmMemoryState:
    target_mib: int
    #: time.monotonic() of the last balloon change / of the last pressure window.
    last_change: float = float("-inf")
    last_pressure: float = float("-inf")


@dataclass(frozen=True)
class Decision:
    #: The new target (None: no change).
    target_mib: int | None
    #: deflate | inflate | hold
    action: str
    #: Why, in words (logged, shown in status); ``code`` is its short name for metrics.
    reason: str
    code: str


def guest_is_low(guest_available_mib: int | None, policy: Policy) -> bool:
    """Whether the guest's fresh MemAvailable is below its reserve (an early pressure)."""
    return guest_available_mib is not None and guest_available_mib < policy.guest_reserve_mib


def _hold(code: str, reason: str) -> Decision:
    return Decision(None, "hold", reason, code)


def decide(
    now: float,
    state: VmMemoryState,
    stats: WindowStats,
    bounds: Bounds,
    *,
    host_available_mib: int,
    guest_available_mib: int | None,
    policy: Policy,
) -> Decision:
    """What to do with one VM's balloon after a window (``state`` is not changed).

    ``guest_available_mib`` is the guest's MemAvailable as its balloon driver last reported
    it, and only if that report was taken after the last change settled (None otherwise).
    """
    pressure = stats.ooms > 0 or (
        stats.reclaims > 0 and stats.stall_ns >= policy.stall_ms * 1_000_000
    )
    low = guest_is_low(guest_available_mib, policy)
    rate_ok = now - state.last_change >= 1.0 / policy.max_changes_per_s
    current = state.target_mib
    if pressure or low:
        if pressure:
            what = f"{stats.reclaims} reclaims, {stats.stall_ns / 1e6:.1f} ms stalled"
            if stats.ooms:
                what += f", {stats.ooms} OOM kills"
        else:
            what = (
                f"the guest has {guest_available_mib} MiB available, below its reserve of "
                f"{policy.guest_reserve_mib} MiB"
            )
        code = "pressure" if pressure else "low-available"
        if current >= bounds.max_mib:
            return _hold("at-max", f"{code} ({what}) but at the VM's maximum {bounds.max_mib} MiB")
        headroom = host_available_mib - policy.host_floor_mib
        if headroom <= 0:
            return _hold(
                "host-floor",
                f"{code} ({what}) but the host has {host_available_mib} MiB available, "
                f"floor {policy.host_floor_mib} MiB",
            )
        if not rate_ok:
            return _hold("rate", f"{code} ({what}); rate limit {policy.max_changes_per_s:g}/s")
        want = policy.step_mib * (2 if stats.ooms else 1)
        grow = min(want, bounds.max_mib - current, headroom)
        limit = " (capped by the host floor)" if grow < want and grow == headroom else ""
        return Decision(current + grow, "deflate", f"{code} ({what}): +{grow} MiB{limit}", code)
    if current > bounds.max_mib:  # the bounds shrank (config): obey them at once
        if not rate_ok:
            return _hold("rate", "above the VM's maximum; rate limited")
        return Decision(bounds.max_mib, "inflate", "above the VM's maximum", "over-max")
    if now - state.last_pressure < policy.quiet_s:
        return _hold("recent-pressure", "pressure less than quiet_s ago")
    if current <= bounds.min_mib:
        return _hold("at-min", f"quiet, at the VM's minimum {bounds.min_mib} MiB")
    if not rate_ok:
        return _hold("rate", "quiet; rate limited")
    shrink = min(policy.step_mib, current - bounds.min_mib)
    if not policy.inflate_without_guest_stats:
        if guest_available_mib is None:
            return _hold(
                "guest-stats", "quiet, but no guest memory statistics since the last change"
            )
        if guest_available_mib - shrink < policy.guest_reserve_mib:
            return _hold(
                "guest-in-use",
                f"quiet, but the guest has {guest_available_mib} MiB available: -{shrink} MiB "
                f"would leave less than its reserve of {policy.guest_reserve_mib} MiB",
            )
    return Decision(
        current - shrink, "inflate", f"quiet for {policy.quiet_s:g} s: -{shrink} MiB", "quiet"
    )
