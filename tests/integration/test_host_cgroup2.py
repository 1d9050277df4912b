"""cgroup v2 backend against a real kernel: per-vCPU threaded cgroups as isolated partitions.

This host's cpuset is a v1 hierarchy, so these tests run where the unified hierarchy has the
cpuset controller: inside the trixie guest of the VM harness (kernel 6.12), as root, with
``EXTPV_CGROUP2_ROOT`` naming the cgroup2 mount if it is not ``/sys/fs/cgroup``. A child
process with real threads stands in for QEMU and its vCPU threads.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from pvhost.errors import PlacementError
from pvhost.placement import Cgroup2Backend, thread_allowed_cpus
from pvhost.placement.cgroup2 import thread_cgroup2
from pvproto import parse_cpulist

pytestmark = pytest.mark.root

ROOT = Path(os.environ.get("EXTPV_CGROUP2_ROOT", "/sys/fs/cgroup"))


def _cpuset_v2() -> str | None:
    controllers = ROOT / "cgroup.controllers"
    if not controllers.exists() or "cpuset" not in controllers.read_text().split():
        return (
            f"{ROOT} has no cgroup v2 cpuset controller (hybrid host: cpuset is v1 here); "
            "these tests run inside the VM harness"
        )
    if len(os.sched_getaffinity(0)) < 3:
        return "needs at least 3 CPUs (one stays with the root partition)"
    return None


@pytest.fixture(autouse=True)
def _needs_cpuset_v2() -> None:
    reason = _cpuset_v2()
    if reason:
        pytest.skip(reason)


@pytest.fixture
def backend(tmp_path: Path) -> Iterator[Cgroup2Backend]:
    group = f"extpv-test-{os.getpid()}.slice"
    b = Cgroup2Backend(ROOT, tmp_path / "cgroup2.json", group=group)
    cpus = sorted(os.sched_getaffinity(0))
    b.setup(frozenset(cpus[1:]))
    try:
        yield b
    finally:
        for vm in list(b.state.vms()):
            b.detach(vm)
        b.teardown()
        assert not b.base.exists(), f"leaked {b.base}"


def test_attach_pin_unpin_detach_is_exact(
    backend: Cgroup2Backend, process: tuple[int, list[int]]
) -> None:
    pid, tids = process
    before_cgroup = thread_cgroup2(pid)
    before = {t: thread_allowed_cpus(t) for t in tids}
    pcpu = max(os.sched_getaffinity(0))
    backend.attach("a", pid, {0: tids[0], 1: tids[1]})
    vm_dir = backend.base / "vm-a"
    assert thread_cgroup2(tids[1]) == "/" + str((vm_dir / "vcpu1").relative_to(ROOT))
    assert thread_cgroup2(tids[2]) == "/" + str((vm_dir / "emulator").relative_to(ROOT))
    assert (vm_dir / "vcpu1" / "cgroup.type").read_text().strip() == "threaded"

    backend.pin("a", 1, tids[1], pcpu)
    assert thread_allowed_cpus(tids[1]) == {pcpu}
    if backend.remote:
        assert (vm_dir / "vcpu1" / "cpuset.cpus.partition").read_text().strip() == "isolated"
        # Isolated while pinned: the pCPU left the other threads' CPUs.
        assert pcpu not in thread_allowed_cpus(tids[2])
        assert pcpu in {int(c) for c in _cpus(ROOT / "cpuset.cpus.isolated")}
    status = backend.describe()["vms"]["a"]["1"]
    assert status["pcpu"] == pcpu and status["tid"] == tids[1]

    backend.unpin("a", 1)
    assert {t: thread_allowed_cpus(t) for t in tids} == before
    assert (vm_dir / "vcpu1" / "cpuset.cpus.partition").read_text().strip() == "member"
    assert thread_cgroup2(tids[1]).endswith("/vcpu1")  # no migration on the unpin path

    backend.detach("a")
    assert thread_cgroup2(pid) == before_cgroup
    assert all(thread_cgroup2(t) == before_cgroup for t in tids)
    assert not vm_dir.exists()


def test_conflicting_pin_is_undone_and_reported(
    backend: Cgroup2Backend, process: tuple[int, list[int]]
) -> None:
    pid, tids = process
    pcpu = max(os.sched_getaffinity(0))
    backend.attach("a", pid, {0: tids[0], 1: tids[1]})
    backend.pin("a", 0, tids[0], pcpu)
    before = thread_allowed_cpus(tids[1])
    # A second exclusive claim on the same pCPU: the kernel refuses it (write error or
    # "isolated invalid (...)"); the backend undoes it and raises with the reason.
    with pytest.raises(PlacementError):
        backend.pin("a", 1, tids[1], pcpu)
    assert backend.pins() == {"a": {0: pcpu}}
    vcpu1 = backend.base / "vm-a" / "vcpu1"
    assert (vcpu1 / "cpuset.cpus.partition").read_text().strip() == "member"
    assert thread_allowed_cpus(tids[1]) == before
    assert thread_allowed_cpus(tids[0]) == {pcpu}


def test_undo_is_exact_after_overlapping_pins(
    backend: Cgroup2Backend, process: tuple[int, list[int]]
) -> None:
    """Two vCPUs pinned, so each was pinned while the other's pCPU was isolated; one of them
    had chosen its own affinity. After unpin of both (and detach) every thread's affinity is
    what it was, both while the VM lives on and after. Regression: unpin called
    sched_setaffinity with the affinity of the moment, which the kernel (≥ 6.2) keeps as the
    thread's own mask, so the threads stayed narrowed (0-1, 0,2 … instead of 0-3)."""
    pid, tids = process
    cpus = sorted(os.sched_getaffinity(0))
    first, second = cpus[-2], cpus[-1]
    os.sched_setaffinity(tids[1], {cpus[0], first, second})  # its own choice, narrower
    before = {t: thread_allowed_cpus(t) for t in tids}
    backend.attach("a", pid, {0: tids[0], 1: tids[1]})
    backend.pin("a", 0, tids[0], first)
    backend.pin("a", 1, tids[1], second)
    assert (thread_allowed_cpus(tids[0]), thread_allowed_cpus(tids[1])) == ({first}, {second})
    backend.unpin("a", 0)
    backend.unpin("a", 1)
    assert {t: thread_allowed_cpus(t) for t in tids} == before, "after unpin"
    backend.detach("a")
    assert {t: thread_allowed_cpus(t) for t in tids} == before, "after detach"


def _cpus(path: Path) -> list[str]:
    return [str(c) for c in parse_cpulist(path.read_text())] if path.exists() else []
