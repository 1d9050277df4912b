"""The affinity program is read and signed once per version of its file: a guest that says
Hello in a loop costs the host no reads, and an operator's edit (in place or by rename) is
what the next Hello injects."""

from __future__ import annotations

import os
from pathlib import Path

from pvhost.programs import SignedAffinityProgram, file_stamp

SOURCE = b'int trace(void *ctx) { return 0; }  // "bcc-source": any text that is not ELF\n'


def test_unchanged_file_is_signed_once(tmp_path: Path) -> None:
    src = tmp_path / "affinity.c"
    src.write_bytes(SOURCE)
    program = SignedAffinityProgram(src, tmp_path / "no-key")
    first = program()
    assert first.kind == "bcc-source" and first.payload == SOURCE
    assert all(program() is first for _ in range(3)), "re-signed an unchanged file"


def test_rewrite_in_place_with_the_same_mtime_is_a_new_version(tmp_path: Path) -> None:
    src = tmp_path / "affinity.c"
    src.write_bytes(SOURCE)
    program = SignedAffinityProgram(src, tmp_path / "no-key")
    first = program()
    before = src.stat()
    src.write_bytes(SOURCE + b"// edited\n")  # same inode; the size tells it apart
    os.utime(src, ns=(before.st_atime_ns, before.st_mtime_ns))
    second = program()
    assert second.payload.endswith(b"// edited\n")
    assert second.version > first.version


def test_replaced_by_rename_is_a_new_version(tmp_path: Path) -> None:
    src = tmp_path / "affinity.c"
    src.write_bytes(SOURCE)
    program = SignedAffinityProgram(src, tmp_path / "no-key")
    first = program()
    new = tmp_path / "new.c"
    new.write_bytes(SOURCE.replace(b"0", b"1"))  # same size: the inode tells it apart
    os.replace(new, src)
    second = program()
    assert second.payload == SOURCE.replace(b"0", b"1")
    assert second.version > first.version


def test_stamp_of_a_missing_file_is_none(tmp_path: Path) -> None:
    assert file_stamp(tmp_path / "absent") is None
