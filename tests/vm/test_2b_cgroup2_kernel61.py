"""(d') The cgroup v2 backend on Debian 12's own 6.1 kernel: local partitions only.

The test image's root file system booting Debian 12's 6.1 kernel (vmlab.images.
ensure_test_image_kernel61: images/add-kernel) acts as a host, like test (d) on trixie's 6.12,
and runs the same in-guest probe (guest_cgroup2_probe.py) against its /sys/fs/cgroup. 6.1 has
the ``isolated`` partition type but no ``cpuset.cpus.exclusive``: the backend must find that
out in its scratch cgroup (mode ``local``) and say truthfully what a pin achieves there.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import vmlab
from vmlab import ImageError, VMSpec, start
from vmlab.images import ensure_test_image_kernel61

pytestmark = [pytest.mark.vm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def vm61(runtime_dir: Path) -> Iterator[vmlab.VirtualMachine]:
    try:
        image = ensure_test_image_kernel61(REPO)
    except ImageError as err:
        pytest.fail(str(err), pytrace=False)
    spec = VMSpec(
        name="k61",
        image=image.path,
        smp=4,
        memory_mib=1536,
        runtime_dir=runtime_dir,
        virtfs=((REPO, "extpv"),),
        test_hook=True,
    )
    t0 = time.monotonic()
    vm = start(spec, deadline_s=300, retries=2)
    try:
        print(f"\n[vm] booted {vm} (6.1) in {time.monotonic() - t0:.1f} s", file=sys.stderr)
        vm.mount_virtfs("extpv", "/mnt/extpv")
        yield vm
    finally:
        vm.stop()


@pytest.fixture(scope="module")
def observed(vm61: vmlab.VirtualMachine) -> dict:
    kernel = vm61.guest(["uname", "-r"], timeout_s=30).stdout.strip()
    r = vm61.guest(
        [
            "env",
            "PYTHONDONTWRITEBYTECODE=1",
            "python3",
            "/mnt/extpv/tests/vm/guest_cgroup2_probe.py",
        ],
        timeout_s=300,
    )
    assert r.returncode == 0, f"the in-guest probe failed:\n{r.stderr[-3000:]}"
    return {"kernel": kernel, **json.loads(r.stdout)}


def test_the_guest_runs_debian_12s_kernel(observed: dict) -> None:
    assert observed["kernel"].startswith("6.1."), observed["kernel"]


def test_the_backend_finds_local_partitions_only(observed: dict) -> None:
    assert observed["errors"].get("setup") is None, observed["errors"]["setup"]
    assert observed["remote_partitions"] is False
    assert observed["mode"] == "local"
    assert observed["probe_left"] == [], "the scratch cgroup must be removed"


def test_describe_and_summary_say_what_a_pin_achieves(observed: dict) -> None:
    assert "local cpuset partitions" in observed["summary"], observed["summary"]
    assert observed["describe"]["partition_mode"] == "local"
