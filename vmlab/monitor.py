"""One QMP command on the lab's own monitor (``launcher-qmp.sock``), from synchronous code.

Spoken with qemu.qmp's ``QMPClient``: connect, negotiate, execute, disconnect. The lab is
synchronous, and its callers include coroutines (integration tests run their scenario in an
event loop): a call made while a loop runs in this thread is served by a private loop in a
worker thread, so the caller's loop is never re-entered. It blocks that loop for the call,
which is short; pvhost's own monitor is a different socket and is not affected.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
from collections.abc import Mapping
from pathlib import Path

from qemu.qmp import ExecInterruptedError, QMPClient, QMPError

from vmlab.errors import MonitorError

__all__ = ["qmp_command"]


async def _execute(
    path: Path, command: str, arguments: Mapping[str, object] | None, timeout_s: float
) -> object:
    client = QMPClient("vmlab")
    try:
        async with asyncio.timeout(timeout_s):
            await client.connect(str(path))
            try:
                return await client.execute(command, arguments)
            except ExecInterruptedError:
                if command == "quit":
                    return {}  # QEMU hung up before its answer was read: it is quitting
                raise
    finally:
        # The hang-up of a quitting QEMU surfaces here; nothing is left to close.
        with contextlib.suppress(QMPError, EOFError, OSError):
            await client.disconnect()


def qmp_command(
    path: Path,
    command: str,
    arguments: Mapping[str, object] | None = None,
    *,
    timeout_s: float = 10.0,
) -> object:
    """Run ``command`` on the QMP monitor at ``path`` and return QEMU's ``return`` value.

    Raises MonitorError when the monitor cannot be reached in time or QEMU refuses.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        running = False
    else:
        running = True
    try:
        if not running:
            return asyncio.run(_execute(path, command, arguments, timeout_s))
        with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="vmlab-qmp") as pool:
            return pool.submit(asyncio.run, _execute(path, command, arguments, timeout_s)).result()
    except TimeoutError as err:
        raise MonitorError(f"QMP {command} on {path}: no answer within {timeout_s:.0f} s") from err
    except (QMPError, EOFError, OSError) as err:
        raise MonitorError(f"QMP {command} on {path} failed: {err}") from err
