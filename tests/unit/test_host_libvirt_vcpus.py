"""Following libvirt's vcpuN cgroups: where they are, and the inotify watch on them.

The watch runs on a plain directory here (inotify reports a mkdir and a write the same way on
cgroupfs, which tests/libvirt checks against a real libvirtd); no root needed.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from pvhost.libvirt import VcpuCgroupWatch, domain_cgroup


def _proc(tmp_path: Path, cgroup: str) -> Path:
    (tmp_path / "proc" / "42").mkdir(parents=True)
    (tmp_path / "proc" / "42" / "cgroup").write_text(cgroup)
    return tmp_path / "proc"


@pytest.mark.parametrize(
    ("cgroup", "where"),
    [
        # cgroup v1 without systemd (this project's CI): the cpuset hierarchy is the one watched.
        (
            "12:cpu,cpuacct:/machine/qemu-1-x.libvirt-qemu/emulator\n"
            "5:cpuset:/machine/qemu-1-x.libvirt-qemu/emulator\n0::/\n",
            "cpuset/machine/qemu-1-x.libvirt-qemu",
        ),
        # cgroup v2 with systemd: vCPU cgroups live under the scope's libvirt/.
        (
            "0::/machine.slice/machine-qemu\\x2d1\\x2dx.scope/libvirt/emulator\n",
            "machine.slice/machine-qemu\\x2d1\\x2dx.scope/libvirt",
        ),
    ],
)
def test_domain_cgroup_is_the_parent_of_the_emulator_cgroup(
    tmp_path: Path, cgroup: str, where: str
) -> None:
    cgroups = tmp_path / "cg"
    (cgroups / where / "emulator").mkdir(parents=True)
    assert domain_cgroup(42, _proc(tmp_path, cgroup), cgroups) == cgroups / where


def test_no_domain_cgroup_without_an_emulator_cgroup(tmp_path: Path) -> None:
    proc = _proc(tmp_path, "5:cpuset:/\n0::/user.slice\n")
    assert domain_cgroup(42, proc, tmp_path / "cg") is None


async def _next(events: asyncio.Queue[None], timeout: float = 2.0) -> bool:
    try:
        await asyncio.wait_for(events.get(), timeout)
    except TimeoutError:
        return False
    return True


def test_watch_fires_on_a_new_vcpu_cgroup_and_on_its_thread_written_in(tmp_path: Path) -> None:
    asyncio.run(_watch_follows(tmp_path))


async def _watch_follows(tmp_path: Path) -> None:
    domain = tmp_path / "domain"
    domain.mkdir()
    (domain / "vcpu0").mkdir()
    (domain / "vcpu0" / "tasks").write_text("")
    events: asyncio.Queue[None] = asyncio.Queue()
    watch = VcpuCgroupWatch(domain, lambda: events.put_nowait(None))
    try:
        assert not await _next(events, 0.3), "nothing happened yet"
        # libvirt makes the hot-plugged vCPU's cgroup (cgroupfs gives it its tasks file at once:
        # made aside and renamed in here, as a cgroup v1 rename would)…
        (tmp_path / "aside").mkdir()
        (tmp_path / "aside" / "tasks").write_text("")
        (tmp_path / "aside").rename(domain / "vcpu1")
        assert await _next(events)
        with (domain / "vcpu1" / "tasks").open("a") as f:
            f.write("1234\n")  # …then writes the new thread into it
        assert await _next(events)
        with (domain / "vcpu0" / "tasks").open("a") as f:
            f.write("99\n")  # a vcpuN that was there before the watch is watched too
        assert await _next(events)
        (domain / "vcpu1" / "tasks").unlink()
        (domain / "vcpu1").rmdir()  # a hot-unplug
        assert await _next(events)
    finally:
        watch.close()
