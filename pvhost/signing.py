"""Ed25519 signing of the programs the host injects into guests.

The private key (PEM, PKCS#8) stays on the host, by default ``/etc/extpv/signing.key``;
its public half (PEM, SubjectPublicKeyInfo) goes into each guest image as
``/etc/pvagent/trusted.d/<name>.pem``. :func:`sign` signs whatever bytes it is given; the
programs pvhost sends are signed over their envelope (:func:`pvhost.programs.sign_program`,
:func:`pvproto.program_envelope`), not over the bare payload.

``python -m pvhost.signing keygen DIR`` (also ``pvctl keygen DIR``) makes the key pair; there is
no command to sign a file by hand, because a signature over a bare file is not one any agent
accepts.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from extpv.cli import die
from pvhost.errors import HostError
from pvhost.files import replace_file

__all__ = [
    "DEFAULT_KEY",
    "PRIVATE_NAME",
    "PUBLIC_NAME",
    "SigningError",
    "generate_keypair",
    "main",
    "sign",
]

DEFAULT_KEY = Path("/etc/extpv/signing.key")
PRIVATE_NAME = "signing.key"
PUBLIC_NAME = "signing.pem"


class SigningError(HostError):
    """A key that cannot be created or used."""


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
    replace_file(private, pem, mode=0o600)
    replace_file(
        public,
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
        mode=0o644,
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


def keygen_command(directory: Path, *, force: bool = False, prog: str = "pvctl") -> int:
    """``keygen DIR``: create the key pair, print where each half went (shared by pvctl)."""
    try:
        private, public = generate_keypair(directory, overwrite=force)
    except (SigningError, OSError) as err:
        die(prog, str(err))
    print(f"private key: {private}\npublic key:  {public} (copy to guests' trusted.d/)")
    return 0


def main(argv: list[str] | None = None) -> int:
    # Programs are signed by pvhost when it sends them (over their envelope: id, kind, digest,
    # version), so the only thing an operator makes by hand is the key pair.
    parser = argparse.ArgumentParser(
        prog="python -m pvhost.signing", description="the Ed25519 key pair pvhost signs with"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    keygen = sub.add_parser("keygen", help="create signing.key + signing.pem in DIR")
    keygen.add_argument("dir", type=Path)
    keygen.add_argument("--force", action="store_true", help="overwrite an existing key pair")
    args = parser.parse_args(argv)
    return keygen_command(args.dir, force=args.force, prog="pvhost.signing")


if __name__ == "__main__":
    sys.exit(main())
