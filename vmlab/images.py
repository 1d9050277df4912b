"""The test image: built from this checkout once per state of its inputs, then reused.

``images/build-image --with-tests`` (small variant, a trusted signing key of the lab's own)
goes to ``images/out/test/small``; ``inputs.sha256`` there records a digest of everything that
goes into it, so a rerun with nothing changed reuses it and CI (no caches) builds it once.
``EXTPV_TEST_IMAGE=DIR`` uses a prebuilt image directory instead (its key must be
``DIR/../keys/signing.key``). Needs a checkout: an installed wheel has no ``images/``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import subprocess
import time
from pathlib import Path

from cryptography.hazmat.primitives import serialization as ser
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from vmlab.errors import ImageError

__all__ = [
    "CHECKOUT",
    "GuestImage",
    "StockImage",
    "ensure_stock_image",
    "ensure_test_image",
    "ensure_test_image_kernel61",
]

log = logging.getLogger(__name__)

#: The checkout this package runs from (an editable install, as the tests and benches use).
CHECKOUT = Path(__file__).resolve().parents[1]
#: What the image is built from (the agent's wheel carries pvagent, pvproto, extpv and bpf/).
IMAGE_INPUTS = (
    "images",
    "packaging/build-wheel",
    "setup.py",
    "bench/spscq.c",
    "bench/Makefile",
    "pvagent",
    "pvproto",
    "extpv",
    "bpf",
    "pyproject.toml",
)
BUILD_DEADLINE_S = 1200


@dataclasses.dataclass(frozen=True)
class GuestImage:
    """An image directory and the private key whose public half its guests trust."""

    path: Path
    signing_key: Path


def _inputs_digest(repo: Path, extra: bytes) -> str:
    """Digest of the tracked and untracked (not ignored) files the image is built from."""
    proc = subprocess.run(
        ["git", "-C", str(repo), "ls-files", "-co", "--exclude-standard", "--", *IMAGE_INPUTS],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    if proc.returncode == 0:
        listed = proc.stdout.split()
    else:  # not a git checkout (e.g. an unpacked tarball): every file counts
        listed = [str(p.relative_to(repo)) for i in IMAGE_INPUTS for p in (repo / i).rglob("*")]
        listed += [i for i in IMAGE_INPUTS if (repo / i).is_file()]
    h = hashlib.sha256(extra)
    for rel in sorted(listed):
        p = repo / rel
        if p.is_file():
            h.update(rel.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


@dataclasses.dataclass(frozen=True)
class StockImage:
    """A stock Debian image (no extpv in it) and the SSH key its root account accepts."""

    path: Path
    ssh_key: Path


def _make_ssh_key(keydir: Path) -> Path:
    """The lab's SSH key pair in ``keydir`` (made once); returns the private key."""
    key = keydir / "id_ed25519"
    if not key.exists() or not key.with_suffix(".pub").exists():
        keydir.mkdir(parents=True, exist_ok=True)
        for stale in (key, key.with_suffix(".pub")):
            stale.unlink(missing_ok=True)
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "extpv-lab", "-f", str(key)],
            check=True, capture_output=True, timeout=30,
        )  # fmt: skip
    return key


def ensure_stock_image(repo: Path = CHECKOUT, suite: str = "bookworm") -> StockImage:
    """A stock Debian ``suite`` image with SSH (images/build-stock-image), built if missing or
    stale; ImageError (with the build's output) if it cannot be built."""
    build = repo / "images" / "build-stock-image"
    if not build.is_file():
        raise ImageError(f"{build} is missing: the stock image is built from an extpv checkout")
    out = repo / "images" / "out" / "stock"
    key = _make_ssh_key(out / "keys")
    pub = key.with_suffix(".pub")
    h = hashlib.sha256(suite.encode() + b"\0" + pub.read_bytes() + b"\0")
    for rel in ("images/build-stock-image", "images/rootfs/initramfs.conf",
                "images/rootfs/initramfs.modules", "images/rootfs/journald.conf"):  # fmt: skip
        h.update(rel.encode() + b"\0" + (repo / rel).read_bytes() + b"\0")
    image = out / suite
    stamp = image / "inputs.sha256"
    if not (stamp.exists() and stamp.read_text().strip() == h.hexdigest()):
        stamp.unlink(missing_ok=True)
        t0 = time.monotonic()
        proc = subprocess.run(
            [str(build), "--suite", suite, "--ssh-key", str(pub), "--out", str(image)],
            capture_output=True, text=True, timeout=BUILD_DEADLINE_S, check=False,
        )  # fmt: skip
        if proc.returncode != 0:
            raise ImageError(
                f"images/build-stock-image failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}"
            )
        stamp.write_text(h.hexdigest() + "\n")
        log.warning("built the stock %s image in %.0f s", suite, time.monotonic() - t0)
    return StockImage(image, key)


def _make_keys(keydir: Path) -> tuple[Path, Path]:
    """The lab's signing key pair in ``keydir`` (made once; the image trusts its public half)."""
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


def ensure_test_image(repo: Path = CHECKOUT) -> GuestImage:
    """The test image, built if missing or stale; ImageError (with the build's output) if not."""
    if os.environ.get("EXTPV_TEST_IMAGE"):
        path = Path(os.environ["EXTPV_TEST_IMAGE"]).resolve()
        return GuestImage(path, path.parent / "keys" / "signing.key")
    build = repo / "images" / "build-image"
    if not build.is_file():
        raise ImageError(
            f"{build} is missing: the test image is built from an extpv checkout; "
            "or set EXTPV_TEST_IMAGE to a prebuilt image directory"
        )
    out = repo / "images" / "out" / "test"
    key, pub = _make_keys(out / "keys")
    digest = _inputs_digest(repo, pub.read_bytes())
    stamp = out / "small" / "inputs.sha256"
    if not (stamp.exists() and stamp.read_text().strip() == digest):
        stamp.unlink(missing_ok=True)
        t0 = time.monotonic()
        proc = subprocess.run(
            [str(build), "--variant", "small", "--with-tests", "--trusted-key", str(pub),
             "--out", str(out)],
            capture_output=True, text=True, timeout=BUILD_DEADLINE_S, check=False,
        )  # fmt: skip
        if proc.returncode != 0:
            raise ImageError(
                f"images/build-image failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}"
            )
        stamp.write_text(digest + "\n")
        log.warning("built the test image in %.0f s", time.monotonic() - t0)
    return GuestImage(out / "small", key)


def ensure_test_image_kernel61(repo: Path = CHECKOUT) -> GuestImage:
    """The test image booting Debian 12's 6.1 kernel instead of trixie's (images/add-kernel:
    the same root file system plus that kernel's package), for the cgroup v2 tests of kernels
    without remote partitions; rebuilt when the test image or add-kernel changes."""
    base = ensure_test_image(repo)
    out = repo / "images" / "out" / "test" / f"{base.path.name}-6.1"  # also for EXTPV_TEST_IMAGE
    add = repo / "images" / "add-kernel"
    h = hashlib.sha256((base.path / "inputs.sha256").read_bytes() + add.read_bytes())
    stamp = out / "inputs.sha256"
    if not (stamp.exists() and stamp.read_text().strip() == h.hexdigest()):
        stamp.unlink(missing_ok=True)
        t0 = time.monotonic()
        proc = subprocess.run(
            [str(add), "--from", str(base.path), "--out", str(out)],
            capture_output=True, text=True, timeout=BUILD_DEADLINE_S, check=False,
        )  # fmt: skip
        if proc.returncode != 0:
            raise ImageError(
                f"images/add-kernel failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}"
            )
        stamp.write_text(h.hexdigest() + "\n")
        log.warning("added the 6.1 kernel to the test image in %.0f s", time.monotonic() - t0)
    return GuestImage(out, base.signing_key)
