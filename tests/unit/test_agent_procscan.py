"""Threads pinned before the agent started are found in /proc; kernel threads are not."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from pvagent.procscan import pinned_threads


def test_a_thread_pinned_before_the_agent_is_found_and_kthreads_are_skipped() -> None:
    cpu = sorted(os.sched_getaffinity(0))[-1]
    child = subprocess.Popen(
        [sys.executable, "-c", f"import os, time; os.sched_setaffinity(0, {{{cpu}}}); "
         "print('pinned', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == b"pinned"
        found = pinned_threads()
        assert found[child.pid] == frozenset({cpu})
        assert found[os.getpid()] == frozenset(os.sched_getaffinity(0))
        assert 2 not in found  # kthreadd: kernel threads (per-CPU ones sit on one CPU)
    finally:
        child.kill()
        child.wait()


def test_a_fake_proc_tree_with_a_kthread_and_a_vanished_thread(tmp_path: Path) -> None:
    def task(pid: int, tid: int, flags: int, cpus: str) -> None:
        d = tmp_path / str(pid) / "task" / str(tid)
        d.mkdir(parents=True)
        (d / "stat").write_text(f"{tid} (a (b) c) S 1 1 1 0 -1 {flags} 0 0\n")
        (d / "status").write_text(f"Name:\tx\nCpus_allowed_list:\t{cpus}\n")

    task(10, 10, 0x400000, "1")  # a user thread pinned to CPU 1
    task(10, 11, 0x400000, "0-3")
    task(20, 20, 0x00208040, "2")  # a per-CPU kthread (PF_KTHREAD)
    (tmp_path / "30" / "task" / "30").mkdir(parents=True)  # exited: no files
    assert pinned_threads(tmp_path) == {10: frozenset({1}), 11: frozenset({0, 1, 2, 3})}
