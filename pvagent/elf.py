"""Just enough ELF reading to vet an eBPF object before libbpf sees it (stdlib only).

The payload comes from the host, so every offset and size is bounds-checked: a
malformed file is an :class:`ElfError`, never an IndexError or a huge allocation.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

__all__ = ["ElfError", "Section", "helper_calls", "program_sections"]

_EM_BPF = 247
_SHT_PROGBITS = 1
_SHF_EXECINSTR = 0x4
_HDR = struct.Struct("<16sHHIQQQIHHHHHH")
_SHDR = struct.Struct("<IIQQQQIIQQ")
_INSN = struct.Struct("<BBhi")
_BPF_CALL = 0x85  # BPF_JMP | BPF_CALL
_BPF_LD_IMM64 = 0x18  # two instruction slots
_PSEUDO_KFUNC_CALL = 2


class ElfError(ValueError):
    """The payload is not a well-formed 64-bit little-endian eBPF ELF object."""


@dataclass(frozen=True)
class Section:
    name: str
    data: bytes


def _cstring(table: bytes, offset: int) -> str:
    if offset >= len(table):
        raise ElfError(f"section name offset {offset} is outside the string table")
    end = table.find(b"\0", offset)
    if end < 0:
        raise ElfError("unterminated section name")
    return table[offset:end].decode("ascii", errors="replace")


def program_sections(payload: bytes) -> list[Section]:
    """Executable sections (eBPF code) of the object: section name → instructions."""
    if len(payload) < _HDR.size or payload[:4] != b"\x7fELF":
        raise ElfError("not an ELF file")
    ident, _type, machine, *_rest = _HDR.unpack_from(payload)
    if ident[4] != 2 or ident[5] != 1:
        raise ElfError("not a 64-bit little-endian ELF object")
    if machine != _EM_BPF:
        raise ElfError(f"ELF machine {machine} is not eBPF ({_EM_BPF})")
    fields = _HDR.unpack_from(payload)
    shoff, shentsize, shnum, shstrndx = fields[6], fields[11], fields[12], fields[13]
    if shentsize != _SHDR.size or shoff + shnum * shentsize > len(payload):
        raise ElfError("section header table lies outside the file")
    headers = [_SHDR.unpack_from(payload, shoff + i * shentsize) for i in range(shnum)]

    def data(index: int) -> bytes:
        _name, _kind, _flags, _addr, offset, size, *_ = headers[index]
        if offset + size > len(payload):
            raise ElfError(f"section {index} lies outside the file")
        return payload[offset : offset + size]

    if shstrndx >= shnum:
        raise ElfError("no section name table")
    names = data(shstrndx)
    out = []
    for index, (name, kind, flags, *_rest) in enumerate(headers):
        if kind == _SHT_PROGBITS and flags & _SHF_EXECINSTR:
            out.append(Section(_cstring(names, name), data(index)))
    return out


def helper_calls(code: bytes) -> set[int | str]:
    """Helper ids called by ``code`` (plus ``"kfunc"`` if it calls kernel functions)."""
    calls: set[int | str] = set()
    slot = 0
    while slot + _INSN.size <= len(code):
        op, regs, _off, imm = _INSN.unpack_from(code, slot)
        if op == _BPF_CALL:
            src = regs >> 4
            if src == 0:
                calls.add(imm)
            elif src == _PSEUDO_KFUNC_CALL:
                calls.add("kfunc")
        slot += 16 if op == _BPF_LD_IMM64 else 8
    return calls
