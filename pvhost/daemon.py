"""``pvhost run``: wire the service, control socket and metrics; stop cleanly on a signal."""

from __future__ import annotations

import asyncio
import logging
import signal

from pvhost.config import Config
from pvhost.control import ControlServer
from pvhost.metrics import serve_metrics
from pvhost.service import Service

__all__ = ["run_daemon"]

_log = logging.getLogger(__name__)


async def run_daemon(config: Config) -> None:
    """Run until SIGTERM/SIGINT; on the way out undo every placement (guests resend)."""
    service = Service(config)
    await service.start()
    control = ControlServer(service, config.service.control_socket)
    await control.start()
    metrics_server = None
    if config.service.metrics:
        host, _, port = config.service.metrics.rpartition(":")
        metrics_server = await serve_metrics(service.metrics, host, int(port))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    _log.info(
        "pvhost ready: control %s, metrics %s",
        config.service.control_socket,
        config.service.metrics or "off",
    )
    try:
        await stop.wait()
    finally:
        if metrics_server is not None:
            metrics_server.close()
        await control.stop()
        await service.stop()
