"""Session fixtures for the end-to-end tests: one guest image, as few VMs as possible.

The image is the lab's test image (vmlab.images: ``images/build-image --with-tests``, small
variant, trusted test key), built once per checkout state and reused while its inputs are
unchanged. ``EXTPV_TEST_IMAGE=DIR`` uses a prebuilt image directory instead.

One VM (``-smp 4``, so it can also act as a cgroup v2 host for test (d)) is booted per session
and shared by every test in this directory; the repository is shared into it over 9p
(mount tag ``extpv``) so the guest runs this checkout's host code for (d).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmlab import ImageError, VirtualMachine, VMSpec, start
from vmlab.daemon import PvhostDaemon
from vmlab.images import GuestImage, ensure_test_image

REPO = Path(__file__).resolve().parents[2]
BOOT_DEADLINE_S = 300


@pytest.fixture(scope="session")
def guest_image() -> GuestImage:
    try:
        return ensure_test_image(REPO)
    except ImageError as err:
        pytest.fail(str(err), pytrace=False)


@pytest.fixture(scope="session")
def runtime_dir() -> Iterator[Path]:
    """A private VM runtime directory: our pvhost watches it, nobody else's does."""
    d = Path("/run/extpv-test") / f"{os.getpid()}" / "vms"
    d.mkdir(parents=True, exist_ok=True)
    yield d
    for p in (d, d.parent):
        with contextlib.suppress(OSError):
            p.rmdir()


@pytest.fixture(scope="session")
def guest_vm(guest_image: GuestImage, runtime_dir: Path) -> Iterator[VirtualMachine]:
    """The shared VM: -smp 4, test hook on, this checkout at /mnt/extpv (9p) in the guest."""
    spec = VMSpec(
        name="e2e",
        image=guest_image.path,
        smp=4,
        memory_mib=1536,
        runtime_dir=runtime_dir,
        virtfs=((REPO, "extpv"),),
        test_hook=True,
    )
    t0 = time.monotonic()
    vm = start(spec, deadline_s=BOOT_DEADLINE_S, retries=2)
    try:
        print(f"\n[vm] booted {vm} in {time.monotonic() - t0:.1f} s", file=sys.stderr)
        vm.mount_virtfs("extpv", "/mnt/extpv")
        yield vm
    finally:  # also when the setup above fails: never leave a QEMU running
        vm.stop()


@pytest.fixture(scope="session")
def pvhost_daemon(
    tmp_path_factory: pytest.TempPathFactory, runtime_dir: Path, guest_image: GuestImage
) -> Iterator[PvhostDaemon]:
    """This checkout's ``pvhost run`` on this host (v1 cpusets here), watching ``runtime_dir``."""
    daemon = PvhostDaemon(tmp_path_factory.mktemp("pvhost"), runtime_dir, guest_image.signing_key)
    daemon.start()
    yield daemon
    # Leave this machine as found even when pvhost did not (test_c_pvhost_exit_… reports it).
    daemon.close()
