"""pvhost's priority against host load: ``[service] nice`` on every thread and, where the
scheduler's autogroup is on, on its session group, which is what weighs it against other
sessions' load (extpv.autogroup; bench/results/vm-stages.md measured the difference). Set only
when pvhost leads its session (a service, a container): started from a shell it leaves the
shell's group alone and says so."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from extpv.autogroup import autogroup_nice
from vmlab.daemon import PvhostDaemon
from vmlab.priority import thread_nices

pytestmark = [pytest.mark.root]

AUTOGROUP_ON = Path("/proc/sys/kernel/sched_autogroup_enabled").read_text().strip() == "1"


def _daemon(tmp_path: Path, nice: int | None) -> PvhostDaemon:
    runtime = tmp_path / "vms"
    runtime.mkdir()
    workdir = tmp_path / "pvhost"
    workdir.mkdir()
    return PvhostDaemon(workdir, runtime, tmp_path / "no-key", nice=nice)


def test_a_session_leader_pvhost_sets_its_threads_and_its_autogroup(tmp_path: Path) -> None:
    daemon = _daemon(tmp_path, -7)
    try:
        daemon.start()
        assert daemon.proc is not None
        pid = daemon.proc.pid
        assert os.getsid(pid) == pid, "started as a service is: leading its session"
        assert set(thread_nices(pid).values()) == {-7}
        assert autogroup_nice(pid) == (-7 if AUTOGROUP_ON else None)
    finally:
        daemon.close()


def test_pvhost_in_a_shells_session_leaves_the_group_alone_and_says_so(tmp_path: Path) -> None:
    ours = autogroup_nice(os.getpid())
    daemon = _daemon(tmp_path, None)
    try:
        daemon.start()
        assert daemon.proc is not None
        assert set(thread_nices(daemon.proc.pid).values()) == {-10}, "the default [service] nice"
        assert autogroup_nice(os.getpid()) == ours, "the session's group is not pvhost's to set"
        # A runner in the kernel's default group (PID 1's session, as on a container's init)
        # has no group value: pvhost's thread values weigh directly and there is nothing to say.
        warned = "weighs only inside its session's scheduler autogroup" in daemon.tail()
        assert warned == (ours is not None)
    finally:
        daemon.close()
