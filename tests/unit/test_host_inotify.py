"""The one debounced inotify watch both the runtime directory and libvirt's vCPU cgroups use."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from pvhost.inotify import IN_CREATE, IN_ISDIR, InotifyWatch
from pvhost.registry import DirWatcher


async def _count(events: asyncio.Queue[None], within: float) -> int:
    await asyncio.sleep(within)
    n = 0
    while not events.empty():
        events.get_nowait()
        n += 1
    return n


def test_a_burst_is_one_change_and_each_event_is_seen(tmp_path: Path) -> None:
    async def scenario() -> None:
        changes: asyncio.Queue[None] = asyncio.Queue()
        seen: list[tuple[int, str]] = []
        watch = InotifyWatch(
            lambda: changes.put_nowait(None), on_event=lambda m, n: seen.append((m, n))
        )
        try:
            watch.add(tmp_path, IN_CREATE)
            assert await _count(changes, 0.2) == 0
            for name in ("a", "b", "c"):
                (tmp_path / name).mkdir()  # a VM directory and its sockets appear together
            assert await _count(changes, 0.3) == 1, "one rescan for the burst"
            assert [n for _, n in seen] == ["a", "b", "c"]
            assert all(m & IN_CREATE and m & IN_ISDIR for m, _ in seen)
            (tmp_path / "d").mkdir()
            assert await _count(changes, 0.3) == 1, "a later change is a new burst"
        finally:
            watch.close()

    asyncio.run(scenario())


def test_a_path_that_cannot_be_watched_is_a_clear_error(tmp_path: Path) -> None:
    async def scenario() -> None:
        with pytest.raises(OSError, match=r"cannot watch .*nowhere"):
            DirWatcher(tmp_path / "nowhere", lambda: None)

    asyncio.run(scenario())


def test_the_runtime_directory_watch_sees_vms_come_and_go(tmp_path: Path) -> None:
    async def scenario() -> None:
        changes: asyncio.Queue[None] = asyncio.Queue()
        watch = DirWatcher(tmp_path, lambda: changes.put_nowait(None))
        try:
            (tmp_path / "vm1").mkdir()
            assert await _count(changes, 0.3) == 1
            (tmp_path / "vm1").rmdir()
            assert await _count(changes, 0.3) == 1
        finally:
            watch.close()

    asyncio.run(scenario())
