"""The appliance's base image knows its recipe: an image built before a package was added to
``containers/base/build-base`` (python3-libvirt, for libvirt domains) is found outdated, so the
pvhost role builds it again instead of keeping an image without the binding.

Real podman; the images are tiny ones imported here (one file, not a Debian tree) under tags of
the test's own, with or without the label the build script writes, and removed after.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = [pytest.mark.root]

SCRIPT = Path(__file__).resolve().parents[2] / "containers" / "base" / "build-base"
TAG = f"localhost/extpv-test-base-{os.getpid()}"


@pytest.fixture
def podman(tmp_path: Path) -> Iterator[Path]:
    if shutil.which("podman") is None:
        pytest.fail("podman is not installed (.ci/install-system installs it)")
    tar = tmp_path / "rootfs.tar"
    (tmp_path / "hello").write_text("base\n")
    with tarfile.open(tar, "w") as out:
        out.add(tmp_path / "hello", arcname="hello")
    yield tar
    subprocess.run(["podman", "rmi", "-f", TAG], capture_output=True, check=False)


def _import(tar: Path, *changes: str) -> None:
    argv = ["podman", "import", "--quiet"]
    for change in changes:
        argv += ["--change", change]
    subprocess.run([*argv, str(tar), TAG], capture_output=True, check=True)


def _check(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SCRIPT), "--check", *args, TAG], capture_output=True, text=True, check=False
    )


def test_a_base_image_is_current_only_with_the_scripts_recipe(podman: Path) -> None:
    missing = _check()
    assert missing.returncode == 1 and "missing" in missing.stdout, missing

    _import(podman)  # built before images carried their recipe
    old = _check()
    assert old.returncode == 1 and "not 'debian bookworm minbase + " in old.stdout, old

    current = "debian bookworm minbase + python3,python3-venv,python3-libvirt"
    _import(podman, f'LABEL org.extpv.base.recipe="{current}"')
    ok = _check()
    assert ok.returncode == 0, ok
    # Another suite (pvhost_base_suite) is another recipe: built again.
    other = _check("--suite", "trixie")
    assert other.returncode == 1 and "not 'debian trixie minbase" in other.stdout, other
