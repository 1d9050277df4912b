"""Session fixtures for the end-to-end tests: one guest image, as few VMs as possible.

The image (``images/build-image --with-tests``, small variant, trusted test key) is built once
per checkout state: ``images/out/test/small/inputs.sha256`` records a digest of everything that
goes into it, so a rerun with nothing changed reuses it and CI (no caches) builds it once.
``EXTPV_TEST_IMAGE=DIR`` uses a prebuilt image directory instead (its key must be
``DIR/../keys/signing.key``).

One VM (``-smp 4``, so it can also act as a cgroup v2 host for test (d)) is booted per session
and shared by every test in this directory; the repository is shared into it over 9p
(mount tag ``extpv``) so the guest runs this checkout's host code for (d).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pvhost import launcher

REPO = Path(__file__).resolve().parents[2]
IMAGE_INPUTS = (
    "images",
    "bench/spscq.c",
    "bench/Makefile",
    "pvagent",
    "pvproto",
    "bpf",
    "pyproject.toml",
)
AFFINITY_OBJECT = REPO / "pvagent" / "bpfobj" / "affinity.bpf.o"
BUILD_DEADLINE_S = 1200
BOOT_DEADLINE_S = 300


def _inputs_digest(extra: bytes) -> str:
    """Digest of the tracked and untracked (not ignored) files the image is built from."""
    proc = subprocess.run(
        ["git", "-C", str(REPO), "ls-files", "-co", "--exclude-standard", "--", *IMAGE_INPUTS],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    if proc.returncode == 0:
        listed = proc.stdout.split()
    else:  # not a git checkout (e.g. an unpacked tarball): every file counts
        listed = [str(p.relative_to(REPO)) for i in IMAGE_INPUTS for p in (REPO / i).rglob("*")]
        listed += [i for i in IMAGE_INPUTS if (REPO / i).is_file()]
    h = hashlib.sha256(extra)
    for rel in sorted(listed):
        p = REPO / rel
        if p.is_file():
            h.update(rel.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def _make_keys(keydir: Path) -> tuple[Path, Path]:
    from cryptography.hazmat.primitives import serialization as ser
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key, pub = keydir / "signing.key", keydir / "signing.pub.pem"
    if not key.exists() or not pub.exists():
        keydir.mkdir(parents=True, exist_ok=True)
        k = Ed25519PrivateKey.generate()
        key.write_bytes(
            k.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8, ser.NoEncryption())
        )
        key.chmod(0o600)
        pub.write_bytes(
            k.public_key().public_bytes(ser.Encoding.PEM, ser.PublicFormat.SubjectPublicKeyInfo)
        )
    return key, pub


class GuestImage:
    def __init__(self, path: Path, signing_key: Path) -> None:
        self.path, self.signing_key = path, signing_key


def ensure_test_image() -> GuestImage:
    """The test image, built if missing or stale (build output shown on failure)."""
    if os.environ.get("EXTPV_TEST_IMAGE"):
        path = Path(os.environ["EXTPV_TEST_IMAGE"]).resolve()
        return GuestImage(path, path.parent / "keys" / "signing.key")
    out = REPO / "images" / "out" / "test"
    key, pub = _make_keys(out / "keys")
    digest = _inputs_digest(pub.read_bytes())
    stamp = out / "small" / "inputs.sha256"
    if not (stamp.exists() and stamp.read_text().strip() == digest):
        stamp.unlink(missing_ok=True)
        t0 = time.monotonic()
        proc = subprocess.run(
            [str(REPO / "images" / "build-image"), "--variant", "small", "--with-tests",
             "--trusted-key", str(pub), "--out", str(out)],
            capture_output=True, text=True, timeout=BUILD_DEADLINE_S, check=False,
        )  # fmt: skip
        if proc.returncode != 0:
            pytest.fail(
                f"images/build-image failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}",
                pytrace=False,
            )
        stamp.write_text(digest + "\n")
        print(f"\n[vm] built the test image in {time.monotonic() - t0:.0f} s", file=sys.stderr)
    return GuestImage(out / "small", key)


@pytest.fixture(scope="session")
def guest_image() -> GuestImage:
    return ensure_test_image()


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
def guest_vm(guest_image: GuestImage, runtime_dir: Path) -> Iterator[launcher.VirtualMachine]:
    """The shared VM: -smp 4, test hook on, this checkout at /mnt/extpv (9p) in the guest."""
    spec = launcher.VMSpec(
        name="e2e",
        image=guest_image.path,
        smp=4,
        memory_mib=1536,
        runtime_dir=runtime_dir,
        virtfs=((REPO, "extpv"),),
        test_hook=True,
    )
    t0 = time.monotonic()
    vm = launcher.start(spec, deadline_s=BOOT_DEADLINE_S, retries=2)
    try:
        print(f"\n[vm] booted {vm} in {time.monotonic() - t0:.1f} s", file=sys.stderr)
        vm.mount_virtfs("extpv", "/mnt/extpv")
        yield vm
    finally:  # also when the setup above fails: never leave a QEMU running
        vm.stop()


class PvhostDaemon:
    """``pvhost run`` on this host, watching the session's runtime directory (v1 cpusets here).

    A test may kill it (-9) and start it again: its state directory survives, as on a real
    host. Every wait names what it waits for and has a deadline.
    """

    def __init__(self, workdir: Path, runtime_dir: Path, signing_key: Path) -> None:
        self.workdir = workdir
        self.socket = workdir / "pvhost.sock"
        self.log = workdir / "pvhost.log"
        self.group = f"extpv-e2e-{os.getpid()}"
        self.config = workdir / "pvhost.toml"
        self.config.write_text(
            f'[service]\nruntime_dir = "{runtime_dir}"\nstate_dir = "{workdir / "state"}"\n'
            f'control_socket = "{self.socket}"\nmetrics = ""\nsigning_key = "{signing_key}"\n'
            "max_backoff = 0.5\n"
            # The object this checkout's guest agent was built with (named explicitly: the
            # image carries the same wheel).
            + (f'affinity_program = "{AFFINITY_OBJECT}"\n' if AFFINITY_OBJECT.exists() else "")
            + "\n"
            f'[placement]\nbackend = "auto"\ngroup = "{self.group}"\nhousekeeping = ""\n'
            'policy = "identity"\nquota = 4\nrate = 1000.0\nburst = 1000\n'
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, deadline_s: float = 30.0) -> None:
        self.socket.unlink(missing_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pvhost.cli", "run", "--config", str(self.config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                cwd=REPO,
            )
        end = time.monotonic() + deadline_s
        while not self.socket.exists():
            if self.proc.poll() is not None:
                pytest.fail(f"pvhost exited at start (rc {self.proc.returncode}):\n{self.tail()}")
            if time.monotonic() > end:
                pytest.fail(f"pvhost made no control socket within {deadline_s} s:\n{self.tail()}")
            time.sleep(0.05)

    def kill(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)
        self.proc.wait(timeout=30)

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""

    def status(self) -> dict[str, Any]:
        proc = subprocess.run(
            [sys.executable, "-m", "pvhost.ctl", "--socket", str(self.socket), "status", "--json"],
            capture_output=True,
            text=True,
            timeout=30,
            cwd=REPO,
            check=False,
        )
        if proc.returncode != 0:
            pytest.fail(f"pvctl status failed: {proc.stdout}{proc.stderr}\n{self.tail()}")
        result: dict[str, Any] = json.loads(proc.stdout)
        return result

    def wait_status(self, what: str, pred: Any, deadline_s: float = 120.0) -> dict[str, Any]:
        """Poll ``pvctl status --json`` until ``pred(status)``; fail naming ``what``."""
        end = time.monotonic() + deadline_s
        while True:
            st = self.status()
            try:
                if pred(st):
                    return st
            except (KeyError, TypeError, IndexError):
                pass
            if time.monotonic() > end:
                pytest.fail(
                    f"pvhost: no {what} within {deadline_s:.0f} s; status:\n"
                    f"{json.dumps(st, indent=1)[-3000:]}\npvhost log:\n{self.tail()}"
                )
            time.sleep(0.2)


@pytest.fixture(scope="session")
def pvhost_daemon(
    tmp_path_factory: pytest.TempPathFactory, runtime_dir: Path, guest_image: GuestImage
) -> Iterator[PvhostDaemon]:
    daemon = PvhostDaemon(tmp_path_factory.mktemp("pvhost"), runtime_dir, guest_image.signing_key)
    daemon.start()
    yield daemon
    if daemon.proc is not None and daemon.proc.poll() is None:
        daemon.kill(signal.SIGTERM)
    # Leave this machine as found even when pvhost did not (test_c_pvhost_exit_… reports it).
    leftover = Path("/sys/fs/cgroup/cpuset") / daemon.group
    if leftover.is_dir() and not any(p.is_dir() for p in leftover.iterdir()):
        leftover.rmdir()
