"""Programs the host injects: where their bytes come from and how they are signed.

The affinity program is the agent's compiled object (``pvagent.bpfobj.read("affinity.bpf.o")``,
built by ``make -C bpf``) unless the config names a file. Signatures come from
``pvhost.signing`` (Ed25519) when the signing key exists; otherwise the program goes
unsigned and only a guest configured with ``trust = "any"`` will load it.
"""

from __future__ import annotations

import re
from pathlib import Path

from pvagent import bpfobj
from pvagent.errors import ObjectMissing
from pvhost import signing
from pvhost.errors import ChannelError
from pvproto import ProgramKind

__all__ = ["affinity_program", "program_from_file", "sign_payload"]


def sign_payload(payload: bytes, key_path: Path) -> bytes:
    """Ed25519 signature over ``payload``, or b"" when there is no key on this host."""
    if not key_path.exists():
        return b""
    return signing.sign(payload, key_path)


def program_from_file(path: Path, program_id: str | None = None) -> tuple[str, ProgramKind, bytes]:
    """Read a program file: an ELF object (``*.o``) or a bcc C source (``*.c``)."""
    try:
        payload = path.read_bytes()
    except OSError as err:
        raise ChannelError(f"cannot read program {path}: {err.strerror}") from err
    kind: ProgramKind = "bpf-object" if payload.startswith(b"\x7fELF") else "bcc-source"
    if program_id is None:
        stem = path.name.split(".", 1)[0].lower()
        program_id = re.sub(r"[^a-z0-9._-]", "-", stem).strip("-._") or "program"
    return program_id, kind, payload


def affinity_program(
    override: Path | None, key_path: Path
) -> tuple[str, ProgramKind, bytes, bytes]:
    """The affinity program to inject at every (re)connection, signed."""
    if override is not None:
        _, kind, payload = program_from_file(override, "affinity")
    else:
        try:
            payload = bpfobj.read("affinity.bpf.o")
        except ObjectMissing as err:
            raise ChannelError(str(err)) from err
        kind = "bpf-object"
    return "affinity", kind, payload, sign_payload(payload, key_path)
