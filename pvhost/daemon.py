"""``pvhost run``: wire the service, control socket and metrics; stop cleanly on a signal."""

from __future__ import annotations

import asyncio
import logging
import os
import signal

from extpv.autogroup import autogroup_nice, leads_its_session, set_autogroup_nice
from pvhost.config import Config
from pvhost.control import ControlServer
from pvhost.metrics import Metrics, serve_metrics
from pvhost.service import Service

__all__ = ["run_daemon", "set_priority"]

_log = logging.getLogger(__name__)


def set_priority(nice: int) -> None:
    """Give this process ``[service] nice`` before it starts a thread: Linux keeps a nice
    value per thread and a new thread takes its creator's, so every thread of the daemon
    (the event loop, the placement worker) gets it. Where the scheduler's autogroup is on, the
    value that weighs pvhost against other sessions' load is its session group's
    (:mod:`extpv.autogroup`): pvhost sets it when it leads its session (a service, a
    container), and says so when it does not (started from a shell: the group is the shell's).
    Not allowed (not root): logged, and the daemon runs at the priority it has."""
    try:
        os.setpriority(os.PRIO_PROCESS, 0, nice)
    except OSError as err:
        _log.warning("cannot set pvhost's nice value to %d: %s", nice, err.strerror)
        return
    if autogroup_nice(os.getpid()) is None:
        return
    if not leads_its_session(os.getpid()):
        _log.warning(
            "pvhost's nice value %d weighs only inside its session's scheduler autogroup, "
            "which it shares with the session that started it: against other sessions' load "
            "it runs at that group's priority (run it as a service, or under `setsid`)",
            nice,
        )
        return
    try:
        set_autogroup_nice(os.getpid(), nice)
    except OSError as err:
        _log.warning("cannot set pvhost's autogroup nice value to %d: %s", nice, err.strerror)


async def run_daemon(config: Config) -> None:
    """Run until SIGTERM/SIGINT; on the way out undo every placement (guests resend).

    The metrics port is taken first: a port in use is an error before anything exists on
    this host, and whatever did start is undone when a later step fails.
    """
    metrics_server = None
    metrics: Metrics | None = None
    service: Service | None = None
    if config.service.metrics:
        host, _, port = config.service.metrics.rpartition(":")
        metrics = Metrics()
        metrics_server = await serve_metrics(metrics, host, int(port))
    try:
        service = Service(config, metrics=metrics)
        await service.start()
        control = ControlServer(service, config.service.control_socket)
        await control.start()
        try:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
            _log.info(
                "pvhost ready: control %s, metrics %s",
                config.service.control_socket,
                config.service.metrics or "off",
            )
            await stop.wait()
        finally:
            await control.stop()
    finally:
        if metrics_server is not None:
            metrics_server.close()
        if service is not None:
            await service.stop()
