"""Programs the host injects: where their bytes come from and how they are signed.

The affinity program is the compiled object ``extpv.bpfobj.read("affinity.bpf.o")`` (built by
``make -C bpf`` into a package of neither daemon: the host never imports the agent) unless the
config names a file. Signatures come from
``pvhost.signing`` (Ed25519) when the signing key exists; otherwise the program goes
unsigned and only a guest configured with ``trust = "any"`` will load it.

A signature covers the program's envelope (:func:`pvproto.program_envelope`: id, kind,
payload digest and version), so a captured ``LoadProgram`` cannot be replayed under another
id, and the guest refuses one older than a version it has loaded under the same id. The
version is the signing time in nanoseconds (strictly increasing within this process).
"""

from __future__ import annotations

import hashlib
import re
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from extpv import bpfobj
from extpv.bpfobj import ObjectMissing
from pvhost import signing
from pvhost.errors import ChannelError
from pvproto import LoadProgram, ProgramKind, program_envelope

__all__ = [
    "SignedAffinityProgram",
    "SignedProgram",
    "affinity_program",
    "file_stamp",
    "program_from_file",
    "sign_program",
    "without_iterators",
]


@dataclass(frozen=True)
class SignedProgram:
    """A program ready to send: its bytes, its version and the signature of its envelope."""

    program_id: str
    kind: ProgramKind
    payload: bytes
    version: int
    #: Ed25519 over the envelope; b"" when this host has no signing key.
    signature: bytes

    def message(self, request_id: int = 0) -> LoadProgram:
        """The ``LoadProgram`` carrying it."""
        return LoadProgram.for_payload(
            self.program_id,
            self.kind,
            self.payload,
            self.signature,
            request_id,
            version=self.version,
        )


_version_lock = threading.Lock()
_last_version = 0


def _next_version() -> int:
    """The signing time in ns, but always above the previous one (clocks can step back)."""
    global _last_version  # noqa: PLW0603 - one sequence per process
    with _version_lock:
        _last_version = max(time.time_ns(), _last_version + 1)
        return _last_version


def sign_program(
    program_id: str,
    kind: ProgramKind,
    payload: bytes,
    key_path: Path,
    *,
    version: int | None = None,
) -> SignedProgram:
    """Sign the envelope of ``payload`` under ``program_id`` (unsigned without a key)."""
    version = _next_version() if version is None else version
    signature = b""
    if key_path.exists():
        digest = hashlib.sha256(payload).hexdigest()
        signature = signing.sign(program_envelope(program_id, kind, digest, version), key_path)
    return SignedProgram(program_id, kind, payload, version, signature)


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


def file_stamp(path: Path) -> tuple[int, int, int] | None:
    """What tells one version of a file from the next (inode: replaced; size and mtime:
    rewritten in place); None when it cannot be read. Programs are re-read and re-signed only
    when a stamp changes, so a guest that says Hello in a loop costs the host no file reads."""
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


_ELF_HEADER = struct.Struct("<16sHHIQQQIHHHHHH")
_SECTION_HEADER = struct.Struct("<IIQQQQIIQQ")
_SHF_EXECINSTR = 0x4
_ITERATOR_KINDS = ("iter/", "iter.s/")


def without_iterators(payload: bytes) -> bytes:
    """The object with its iterator programs (``iter/…``, ``?iter/…`` sections) made inert.

    Agents before protocol 4 vet every executable section against their attach allow-list,
    which has no ``iter/task``, and would refuse the whole object; they never run iterators
    anyway. Clearing the sections' SHF_EXECINSTR flag hides them from those agents' checks
    and from libbpf (which skips non-executable sections and their relocations); the rest of
    the object is byte for byte the same. Not an ELF64 little-endian object: unchanged.
    """
    if len(payload) < _ELF_HEADER.size or payload[:6] != b"\x7fELF\x02\x01":
        return payload
    fields = _ELF_HEADER.unpack_from(payload)
    shoff, shentsize, shnum, shstrndx = fields[6], fields[11], fields[12], fields[13]
    if shentsize != _SECTION_HEADER.size or shoff + shnum * shentsize > len(payload):
        return payload
    headers = [_SECTION_HEADER.unpack_from(payload, shoff + i * shentsize) for i in range(shnum)]
    if shstrndx >= shnum:
        return payload
    names_at, names_size = headers[shstrndx][4], headers[shstrndx][5]
    names = payload[names_at : names_at + names_size]
    out = bytearray(payload)
    for index, header in enumerate(headers):
        end = names.find(b"\0", header[0])
        name = names[header[0] : end if end >= 0 else None].decode(errors="replace")
        if header[2] & _SHF_EXECINSTR and name.removeprefix("?").startswith(_ITERATOR_KINDS):
            patched = (*header[:2], header[2] & ~_SHF_EXECINSTR, *header[3:])
            _SECTION_HEADER.pack_into(out, shoff + index * shentsize, *patched)
    return bytes(out)


class SignedAffinityProgram:
    """The affinity program, read and signed once per change of its file or of the key.

    Called at every guest Hello: a guest that says Hello in a loop must not make the host
    re-read and re-sign the program each time. ``compat``: the variant for agents of
    protocol 2 and 3 (:func:`without_iterators`).
    """

    def __init__(self, override: Path | None, key_path: Path, *, compat: bool = False) -> None:
        self.override = override
        self.key_path = key_path
        self.compat = compat
        self._stamp: tuple[object, ...] | None = None
        self._value: SignedProgram | None = None

    def _source(self) -> Path | None:
        if self.override is not None:
            return self.override
        try:
            return bpfobj.path("affinity.bpf.o")
        except ObjectMissing:
            return None

    def __call__(self) -> SignedProgram:
        source = self._source()
        stamp = (source, source and file_stamp(source), file_stamp(self.key_path))
        if self._value is None or stamp != self._stamp:
            self._value = affinity_program(self.override, self.key_path, compat=self.compat)
            self._stamp = stamp
        return self._value


def affinity_program(
    override: Path | None, key_path: Path, *, compat: bool = False
) -> SignedProgram:
    """The affinity program to inject at every (re)connection, signed (a new version);
    ``compat``: with its iterators made inert, for agents before protocol 4."""
    if override is not None:
        _, kind, payload = program_from_file(override, "affinity")
    else:
        try:
            payload = bpfobj.read("affinity.bpf.o")
        except ObjectMissing as err:
            raise ChannelError(str(err)) from err
        kind = "bpf-object"
    if compat and kind == "bpf-object":
        payload = without_iterators(payload)
    return sign_program("affinity", kind, payload, key_path)
