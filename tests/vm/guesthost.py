"""What the in-guest probes share (guest_*_probe.py): they run INSIDE a test guest acting as a
host, import this checkout over the 9p share, read the guest's cgroupfs and /proc, and record
every step's outcome (an error too) in one JSON object.

The libvirt probes (guest_libvirt_cgroup2_probe.py, guest_libvirt_placement_probe.py) also share
the stand-in for libvirtd, which does not run in the test guest (too slow under TCG): a nested
QEMU laid out in the cgroups exactly as libvirt 11 lays out a domain on a systemd host, cgroup
v2 (:func:`libvirt_domain`), and the writes of libvirt's live vcpupin (:func:`libvirt_pin`).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pvhost.errors import PlacementError
from pvhost.placement.base import remove_cgroup
from pvproto import parse_cpulist

__all__ = [
    "LV",
    "LV_ANCESTORS",
    "LV_CGROUP",
    "ROOT",
    "SLICE",
    "allowed",
    "assert_as_libvirt_had",
    "cgroup_of",
    "enable_cpuset",
    "leaf",
    "libvirt_domain",
    "libvirt_pin",
    "read",
    "rel",
    "stepper",
    "view",
]

#: The guest's unified hierarchy (cpuset enabled).
ROOT = Path("/sys/fs/cgroup")


def read(path: Path) -> str | None:
    """A cgroupfs or /proc file's contents, stripped; None when it cannot be read."""
    try:
        return path.read_text().strip()
    except OSError:
        return None


def allowed(tid: int) -> str | None:
    """The CPUs ``tid`` may run on (Cpus_allowed_list), None once it is gone."""
    for line in (read(Path(f"/proc/{tid}/status")) or "").splitlines():
        if line.startswith("Cpus_allowed_list:"):
            return line.split(":", 1)[1].strip()
    return None


def cgroup_of(tid: int) -> str | None:
    """The unified-hierarchy cgroup of ``tid`` (the ``0::`` line)."""
    for line in (read(Path(f"/proc/{tid}/cgroup")) or "").splitlines():
        if line.startswith("0::"):
            return line[3:]
    return None


def stepper(obs: dict[str, Any]) -> Callable[[str, Callable[[], Any]], Any]:
    """``step(name, fn)``: ``fn()``'s value, or None with the error (and the end of its
    traceback) recorded under ``obs["errors"][name]``, so that the later steps still run and
    the host-side test shows everything that was seen."""
    errors: dict[str, str] = obs.setdefault("errors", {})

    def step(name: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception as err:
            errors[name] = f"{type(err).__name__}: {err}\n{traceback.format_exc()[-1500:]}"
            return None

    return step


# -- libvirt's layout of domain 1 ("inner"), stood in for ---------------------------------------

SLICE = ROOT / "machine.slice"
SCOPE = SLICE / "machine-qemu\\x2d1\\x2dinner.scope"
LV = SCOPE / "libvirt"


def rel(path: Path) -> str:
    """``path`` as a cgroup (``/…`` below the root), as /proc shows it."""
    return "/" + str(path.relative_to(ROOT))


#: The domain's libvirt cgroup, and every cgroup above a vcpuN below the root (top first).
LV_CGROUP = rel(LV)
LV_ANCESTORS = (rel(SLICE), rel(SCOPE), LV_CGROUP)


def leaf(vcpu: int) -> str:
    """libvirt's vcpuN cgroup of the domain."""
    return rel(LV / f"vcpu{vcpu}")


def enable_cpuset(path: Path) -> None:
    if "cpuset" not in (read(path / "cgroup.subtree_control") or "").split():
        (path / "cgroup.subtree_control").write_text("+cpuset")


def _lay_out(pid: int, tids: dict[int, int]) -> list[Path]:
    """libvirt's layout with QEMU's threads in it; the cgroups this made (to remove after)."""
    made = [p for p in (SLICE, SCOPE, LV) if not p.exists()]
    for path in (SLICE, SCOPE, LV):
        path.mkdir(exist_ok=True)
    enable_cpuset(ROOT)
    enable_cpuset(SLICE)
    enable_cpuset(SCOPE)
    enable_cpuset(LV)
    for name in ["emulator", *(f"vcpu{v}" for v in tids)]:
        (LV / name).mkdir()
        (LV / name / "cgroup.type").write_text("threaded")
        made.append(LV / name)
    # The process into libvirt/ (a threaded domain now), then each thread to its place.
    (LV / "cgroup.procs").write_text(str(pid))
    vcpus = set(tids.values())
    for task in Path(f"/proc/{pid}/task").iterdir():
        if int(task.name) not in vcpus:
            with contextlib.suppress(OSError):  # gone meanwhile
                (LV / "emulator" / "cgroup.threads").write_text(task.name)
    for vcpu, tid in tids.items():
        (LV / f"vcpu{vcpu}" / "cgroup.threads").write_text(str(tid))
        os.sched_setaffinity(tid, range(4))  # libvirt: every host CPU, no cpuset.cpus
    return made


@contextlib.contextmanager
def libvirt_domain(
    obs: dict[str, Any],
    start_qemu: Callable[[], tuple[subprocess.Popen[bytes], dict[int, int]]],
) -> Iterator[dict[int, int]]:
    """The domain: a nested QEMU (``start_qemu``: the process and its vCPU threads) laid out
    as libvirt does; its vCPU → tid. Afterwards QEMU is killed and the cgroups made for it
    removed (one that will not go is recorded under ``obs["errors"]["cleanup"]``)."""
    proc, tids = start_qemu()
    made: list[Path] = []
    try:
        made = _lay_out(proc.pid, tids)
        yield tids
    finally:
        proc.kill()
        proc.wait(timeout=30)
        for path in reversed(made):
            try:
                remove_cgroup(path)
            except PlacementError as err:
                obs["errors"].setdefault("cleanup", "")
                obs["errors"]["cleanup"] += f"{path}: {err}; "


def libvirt_pin(vcpu: int, tid: int, cpus: str) -> None:
    """What libvirt's live vcpupin writes (qemuDomainPinVcpuLive): the vcpuN cpuset, then the
    thread's affinity."""
    (LV / f"vcpu{vcpu}" / "cpuset.cpus").write_text(cpus)
    os.sched_setaffinity(tid, parse_cpulist(cpus))


def view(tids: dict[int, int]) -> dict[str, Any]:
    """The domain's cgroups, extpv.slice's exclusive CPUs and each vCPU thread's place."""
    out: dict[str, Any] = {
        "root_isolated": read(ROOT / "cpuset.cpus.isolated"),
        "root_effective": read(ROOT / "cpuset.cpus.effective"),
        "exclusive": {rel(p): read(p / "cpuset.cpus.exclusive") for p in (SLICE, SCOPE, LV)},
        "extpv_slice_exclusive": read(ROOT / "extpv.slice" / "cpuset.cpus.exclusive"),
    }
    for name in ["emulator", *(f"vcpu{v}" for v in tids)]:
        d = LV / name
        out[name] = {
            "partition": read(d / "cpuset.cpus.partition"),
            "exclusive": read(d / "cpuset.cpus.exclusive"),
            "cpus": read(d / "cpuset.cpus"),
            "effective": read(d / "cpuset.cpus.effective"),
        }
    for vcpu, tid in tids.items():
        out[f"vcpu{vcpu}"]["allowed"] = allowed(tid)
        out[f"vcpu{vcpu}"]["cgroup"] = cgroup_of(tid)
    return out


def assert_as_libvirt_had(before: dict[str, Any], after: dict[str, Any]) -> None:
    """Two views (:func:`view`), before extpv's first pin and after its last undo: the domain's
    cgroups are back exactly as libvirt had them, libvirt's own writes aside (its pinning
    from before, every CPU, written back by its undo, stands). Asserted on the host."""
    assert after["exclusive"] == before["exclusive"] == dict.fromkeys(LV_ANCESTORS, "")
    assert after["root_isolated"] == ""
    assert after["emulator"] == before["emulator"]
    for vcpu in range(4):
        a = after[f"vcpu{vcpu}"]
        assert a["partition"] == "member" and a["exclusive"] == "", a
        assert a["cgroup"] == f"{LV_CGROUP}/vcpu{vcpu}"
        assert a["allowed"] == "0-3"
        assert a["cpus"] in ("", "0-3"), a
