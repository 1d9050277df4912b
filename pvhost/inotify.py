"""One debounced inotify watch on the running event loop (through ctypes: no dependency).

:class:`InotifyWatch` reads every event as it comes (``on_event`` sees each, e.g. to add a
watch on a new directory before its contents change) and calls ``on_change`` once per burst,
``delay`` seconds after the burst's first event: a rescan after it is cheap and idempotent.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import os
import struct
from collections.abc import Callable
from pathlib import Path

__all__ = [
    "IN_CREATE",
    "IN_DELETE",
    "IN_DELETE_SELF",
    "IN_ISDIR",
    "IN_MODIFY",
    "IN_MOVED_FROM",
    "IN_MOVED_TO",
    "IN_ONLYDIR",
    "InotifyWatch",
]

IN_MODIFY = 0x2
IN_MOVED_FROM = 0x40
IN_MOVED_TO = 0x80
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_ONLYDIR = 0x1000000
IN_ISDIR = 0x40000000

_EVENT = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len (then the name)


class InotifyWatch:
    """An inotify instance read on the running loop; :meth:`add` watches a path."""

    def __init__(
        self,
        on_change: Callable[[], None],
        *,
        on_event: Callable[[int, str], None] | None = None,
        delay: float = 0.05,
    ) -> None:
        self._on_change, self._on_event, self._delay = on_change, on_event, delay
        self._libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        self._fd = self._libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self._fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1 failed")
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._fd, self._readable)
        self._scheduled: asyncio.TimerHandle | None = None

    def add(self, path: Path, mask: int) -> None:
        """Watch ``path`` for ``mask``; OSError (with the path) where the kernel refuses."""
        if self._libc.inotify_add_watch(self._fd, os.fsencode(path), mask) < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"cannot watch {path}: {os.strerror(err)}")

    def _readable(self) -> None:
        try:
            while buf := os.read(self._fd, 65536):
                offset = 0
                while offset < len(buf):
                    _wd, mask, _cookie, size = _EVENT.unpack_from(buf, offset)
                    name = buf[offset + _EVENT.size : offset + _EVENT.size + size].rstrip(b"\0")
                    offset += _EVENT.size + size
                    if self._on_event is not None:
                        self._on_event(mask, os.fsdecode(name))
        except BlockingIOError:
            pass
        if self._scheduled is None:
            self._scheduled = self._loop.call_later(self._delay, self._fire)

    def _fire(self) -> None:
        self._scheduled = None
        self._on_change()

    def close(self) -> None:
        if self._scheduled is not None:
            self._scheduled.cancel()
        self._loop.remove_reader(self._fd)
        os.close(self._fd)
