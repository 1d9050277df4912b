"""Ed25519 signing of the programs the host injects into guests.

The private key (PEM, PKCS#8) stays on the host, by default ``/etc/extpv/signing.key``;
its public half (PEM, SubjectPublicKeyInfo) goes into each guest image as
``/etc/pvagent/trusted.d/<name>.pem``. :func:`sign` signs whatever bytes it is given; the
programs pvhost sends are signed over their envelope (:func:`pvhost.programs.sign_program`,
:func:`pvproto.program_envelope`), not over the bare payload.

``python -m pvhost.signing keygen DIR`` and ``… sign FILE`` work before ``pvctl`` does.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from extpv.cli import die
from pvhost.errors import HostError

__all__ = [
    "DEFAULT_KEY",
    "PRIVATE_NAME",
    "PUBLIC_NAME",
    "SigningError",
    "generate_keypair",
    "main",
    "sign",
    "sign_file",
]

DEFAULT_KEY = Path("/etc/extpv/signing.key")
PRIVATE_NAME = "signing.key"
PUBLIC_NAME = "signing.pem"


class SigningError(HostError):
    """A key that cannot be created or used."""


def _replace_file(path: Path, data: bytes, mode: int) -> None:
    """Make ``path`` a new file holding ``data`` with ``mode``, whatever ``path`` was before.

    The bytes go to a fresh file next to it (``mkstemp``: O_CREAT|O_EXCL, so never through a
    symlink, and mode 0600 from the start), which is then renamed over ``path``: an old file's
    mode is not kept, and a symlink at ``path`` is replaced, not followed.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as out:
            os.fchmod(out.fileno(), mode)
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def generate_keypair(directory: Path, *, overwrite: bool = False) -> tuple[Path, Path]:
    """Write ``signing.key`` (private, mode 0600) and ``signing.pem`` (public, 0644) in
    ``directory``; with ``overwrite``, each replaces whatever is there (file or symlink)."""
    directory = Path(directory)
    private, public = directory / PRIVATE_NAME, directory / PUBLIC_NAME
    # lexists: a dangling symlink is something there too.
    if not overwrite and (os.path.lexists(private) or os.path.lexists(public)):
        raise SigningError(f"{private} or {public} exists already; refusing to overwrite a key")
    directory.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _replace_file(private, pem, 0o600)
    _replace_file(
        public,
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
        0o644,
    )
    return private, public


def _private_key(key_path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(Path(key_path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as err:
        raise SigningError(f"cannot read the signing key {key_path}: {err}") from err
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningError(f"{key_path} is not an Ed25519 private key")
    return key


def sign(payload: bytes, key_path: Path = DEFAULT_KEY) -> bytes:
    """The 64-byte Ed25519 signature of ``payload`` (raw bytes; see the module docstring)."""
    return _private_key(key_path).sign(payload)


def sign_file(path: Path, key_path: Path = DEFAULT_KEY, out: Path | None = None) -> Path:
    """Sign the file ``path``; write the raw signature to ``out`` (default ``<path>.sig``)."""
    target = out or Path(f"{path}.sig")
    target.write_bytes(sign(Path(path).read_bytes(), key_path))
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pvhost.signing", description="Ed25519 keys and signatures for programs"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    keygen = sub.add_parser("keygen", help="create signing.key + signing.pem in DIR")
    keygen.add_argument("dir", type=Path)
    keygen.add_argument("--force", action="store_true", help="overwrite an existing key pair")
    signp = sub.add_parser("sign", help="sign FILE, writing FILE.sig (raw 64 bytes)")
    signp.add_argument("file", type=Path)
    signp.add_argument("--key", type=Path, default=DEFAULT_KEY, help=f"default {DEFAULT_KEY}")
    signp.add_argument("--out", type=Path, help="signature file (default FILE.sig)")
    args = parser.parse_args(argv)
    try:
        if args.command == "keygen":
            private, public = generate_keypair(args.dir, overwrite=args.force)
            print(f"private key: {private}\npublic key:  {public} (copy to guests' trusted.d/)")
        else:
            print(sign_file(args.file, args.key, args.out))
    except (SigningError, OSError) as err:
        die("pvhost.signing", str(err))
    return 0


if __name__ == "__main__":
    sys.exit(main())
