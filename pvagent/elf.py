"""Just enough ELF reading to vet an eBPF object before libbpf sees it (stdlib only).

The payload comes from the host, so every offset and size is bounds-checked: a
malformed file is an :class:`ElfError`, never an IndexError or a huge allocation.

Kernel functions (kfuncs) are invisible in the instructions alone: clang emits a kfunc
call as ``call -1`` with ``src_reg = BPF_PSEUDO_CALL`` (1), exactly like a call of a
subprogram, plus a relocation naming an *undefined* (extern) symbol; libbpf turns it into
``src_reg = BPF_PSEUDO_KFUNC_CALL`` (2) at load time. So the relocations are read too: a
call whose relocation names an undefined symbol is a kfunc call, by that symbol's name.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["KFUNC", "ElfError", "Section", "helper_calls", "program_sections"]

_EM_BPF = 247
_SHT_PROGBITS = 1
_SHT_SYMTAB = 2
_SHT_REL = 9
_SHF_EXECINSTR = 0x4
_SHN_UNDEF = 0
_HDR = struct.Struct("<16sHHIQQQIHHHHHH")
_SHDR = struct.Struct("<IIQQQQIIQQ")
_SYM = struct.Struct("<IBBHQQ")
_REL = struct.Struct("<QQ")
_INSN = struct.Struct("<BBhi")
_BPF_CALL = 0x85  # BPF_JMP | BPF_CALL
_BPF_CALLX = 0x8D  # BPF_JMP | BPF_CALL | BPF_X: call through a register
_BPF_LD_IMM64 = 0x18  # two instruction slots
_PSEUDO_CALL = 1
#: In :func:`helper_calls`: a call that is neither a helper nor a local subprogram.
KFUNC = "kfunc"
#: Relocations read per section at most (a hostile file must not make us loop long).
_MAX_RELOCATIONS = 1 << 20


class ElfError(ValueError):
    """The payload is not a well-formed 64-bit little-endian eBPF ELF object."""


@dataclass(frozen=True)
class Section:
    name: str
    data: bytes
    #: Undefined (extern) symbols this section calls: kfuncs, by name.
    extern_calls: frozenset[str] = frozenset()


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
    externs = _extern_calls(headers, data)
    out = []
    for index, (name, kind, flags, *_rest) in enumerate(headers):
        if kind == _SHT_PROGBITS and flags & _SHF_EXECINSTR:
            calls = frozenset(externs.get(index, ()))
            out.append(Section(_cstring(names, name), data(index), calls))
    return out


def _extern_calls(
    headers: list[tuple[int, ...]], data: Callable[[int], bytes]
) -> dict[int, set[str]]:
    """Section index → names of the undefined symbols its call instructions are relocated to."""
    out: dict[int, set[str]] = {}
    for rel_index, rel_header in enumerate(headers):
        _name, kind, _flags, _addr, _off, _size, link, target, *_ = rel_header
        if kind != _SHT_REL:
            continue
        if link >= len(headers) or headers[link][1] != _SHT_SYMTAB or target >= len(headers):
            raise ElfError("a relocation section names no symbol table or no target section")
        if not headers[target][2] & _SHF_EXECINSTR:
            continue  # relocations of data (BTF, .maps, …) call nothing
        symtab = data(link)
        strtab_index = headers[link][6]
        if strtab_index >= len(headers):
            raise ElfError("the symbol table names no string table")
        strings = data(strtab_index)
        code = data(target)
        rels = data(rel_index)
        count = min(len(rels) // _REL.size, _MAX_RELOCATIONS)
        for i in range(count):
            offset, info = _REL.unpack_from(rels, i * _REL.size)
            symbol = info >> 32
            if (symbol + 1) * _SYM.size > len(symtab):
                raise ElfError(f"relocation {i} names symbol {symbol}, beyond the symbol table")
            st_name, _info, _other, shndx, _value, _size = _SYM.unpack_from(
                symtab, symbol * _SYM.size
            )
            if shndx != _SHN_UNDEF or offset + _INSN.size > len(code):
                continue
            op, regs, _off, _imm = _INSN.unpack_from(code, offset)
            if op == _BPF_CALL and regs >> 4 == _PSEUDO_CALL:
                name = _cstring(strings, st_name) if st_name else "?"
                out.setdefault(target, set()).add(name)
    return out


def helper_calls(code: bytes, *, subprograms: bool = True) -> set[int | str]:
    """Helper ids called by ``code``, plus :data:`KFUNC` for any call that is neither a
    helper nor a local subprogram call (an already resolved kfunc call, ``src_reg = 2``,
    or a call through a register). Calls with ``src_reg = 1`` are subprogram calls here:
    whether one is really a kfunc call only its relocation says (:class:`Section`). Code
    without relocations (bcc's) has no subprogram calls: ``subprograms=False`` makes any
    ``src_reg = 1`` call a :data:`KFUNC` too."""
    calls: set[int | str] = set()
    slot = 0
    while slot + _INSN.size <= len(code):
        op, regs, _off, imm = _INSN.unpack_from(code, slot)
        if op == _BPF_CALL:
            src = regs >> 4
            if src == 0:
                calls.add(imm)
            elif src != _PSEUDO_CALL or not subprograms:
                calls.add(KFUNC)
        elif op == _BPF_CALLX:
            calls.add(KFUNC)
        slot += 16 if op == _BPF_LD_IMM64 else 8
    return calls
