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

__all__ = ["SignedAffinityProgram", "affinity_program", "program_from_file", "sign_payload"]


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


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


class SignedAffinityProgram:
    """The affinity program, read and signed once per change of its file or of the key.

    Called at every guest Hello: a guest that says Hello in a loop must not make the host
    re-read and re-sign the program each time.
    """

    def __init__(self, override: Path | None, key_path: Path) -> None:
        self.override = override
        self.key_path = key_path
        self._stamp: tuple[object, ...] | None = None
        self._value: tuple[str, ProgramKind, bytes, bytes] | None = None

    def _source(self) -> Path | None:
        if self.override is not None:
            return self.override
        try:
            return bpfobj.path("affinity.bpf.o")
        except ObjectMissing:
            return None

    def __call__(self) -> tuple[str, ProgramKind, bytes, bytes]:
        source = self._source()
        stamp = (source, source and _stamp(source), _stamp(self.key_path))
        if self._value is None or stamp != self._stamp:
            self._value = affinity_program(self.override, self.key_path)
            self._stamp = stamp
        return self._value


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
