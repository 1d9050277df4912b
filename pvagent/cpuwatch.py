"""Follow the guest's online CPUs (vCPU hot-plug, CPUs taken offline) for the host.

The CPUs are guest facts, like the Hello's: the agent tells the host when they change
(:meth:`pvagent.agent.Agent.set_topology` → ``TopologyUpdate``, protocol 5) and knows nothing
of what a service does with them.

How a change is noticed: the kernel sends a uevent on the ``cpu`` subsystem for each CPU
added, removed, brought online or taken offline (``device_online()`` emits ``online`` after
the CPU is in ``cpu_online_mask``). :func:`watch_cpus` listens on the kernel's uevent netlink
socket (pyudev, source ``kernel``: no udevd needed, the event is only a trigger) and re-reads
sysfs ``SETTLE_S`` after an event, so a burst (64 CPUs plugged at once, or an ``add`` followed
by the image's udev rule onlining the CPU) costs one read. No polling while it can listen.

Fallback: sysfs files cannot be watched (inotify sees no change to attributes, and the
``online`` mask file gets no ``sysfs_notify``), so without pyudev or a uevent socket (a
network namespace other than the initial one gets no uevents) the agent re-reads
``/sys/devices/system/cpu/online`` every ``POLL_S`` seconds: one small read, and hot-plug is
an operator's action, for which a few seconds' delay is acceptable.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pvagent.agent import Agent
from pvagent.errors import AgentError
from pvagent.topology import SYSFS_CPU, read_topology

__all__ = ["POLL_S", "SETTLE_S", "watch_cpus"]

log = logging.getLogger(__name__)

#: Delay between a CPU uevent and the re-read (events within it coalesce).
SETTLE_S = 0.05
#: Period of the fallback poll, when no uevent socket can be had.
POLL_S = 5.0


def _reread(agent: Agent, root: Path) -> None:
    try:
        agent.set_topology(read_topology(root))
    except AgentError as err:  # sysfs unreadable for a moment: keep what we have
        log.warning("%s", err)


def _uevent_monitor() -> Any | None:
    """A started kernel-uevent monitor on the ``cpu`` subsystem, or None (fallback: poll)."""
    try:
        import pyudev  # noqa: PLC0415 - guest-only dependency; the fallback works without it
    except ImportError:
        log.warning("pyudev is not installed: the online CPUs are polled every %.0f s", POLL_S)
        return None
    try:
        monitor = pyudev.Monitor.from_netlink(pyudev.Context(), source="kernel")
        monitor.filter_by("cpu")
        monitor.start()
    except (OSError, ValueError) as err:
        log.warning("no uevent socket (%s): the online CPUs are polled every %.0f s", err, POLL_S)
        return None
    return monitor


async def watch_cpus(
    agent: Agent,
    *,
    root: Path = SYSFS_CPU,
    monitor_factory: Callable[[], Any | None] = _uevent_monitor,
) -> None:
    """Keep ``agent``'s topology current, forever (cancel to stop)."""
    monitor = monitor_factory()
    # Read once after the monitor is listening: a change between the agent's first read and
    # now is not missed.
    _reread(agent, root)
    if monitor is None:
        while True:
            await asyncio.sleep(POLL_S)
            _reread(agent, root)
    loop = asyncio.get_running_loop()
    pending: asyncio.TimerHandle | None = None

    def settled() -> None:
        nonlocal pending
        pending = None
        _reread(agent, root)

    def on_uevent() -> None:
        nonlocal pending
        seen = False
        try:
            while monitor.poll(timeout=0) is not None:
                seen = True  # the event is a trigger; what counts is sysfs after it
        except OSError:  # ENOBUFS: the socket overflowed, events were lost: read anyway
            seen = True
        if seen and pending is None:
            pending = loop.call_later(SETTLE_S, settled)

    loop.add_reader(monitor.fileno(), on_uevent)
    try:
        await asyncio.Event().wait()
    finally:
        loop.remove_reader(monitor.fileno())
        if pending is not None:
            pending.cancel()
