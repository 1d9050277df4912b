"""The agent's built-in eBPF programs, built by ``make -C bpf`` into this package.

``read("affinity.bpf.o")`` returns the CO-RE object, ``read("affinity.bcc.c")`` the
self-contained bcc source. The host reads the object it injects from here too.
"""

from __future__ import annotations

from pathlib import Path

from pvagent.errors import ObjectMissing

__all__ = ["path", "read"]

_HERE = Path(__file__).resolve().parent


def path(name: str) -> Path:
    """Path of the built program ``name`` (e.g. ``"affinity.bpf.o"``); it must exist."""
    if "/" in name or name.startswith("."):
        raise ObjectMissing(f"{name!r} is not a program file name")
    found = _HERE / name
    if not found.is_file():
        built = sorted(p.name for p in _HERE.iterdir() if p.suffix in {".o", ".c"})
        raise ObjectMissing(
            f"eBPF program {name!r} is not built (have: {', '.join(built) or 'nothing'}); "
            "hint: run `make -C bpf` in the source tree (./dev setup does it)"
        )
    return found


def read(name: str) -> bytes:
    """Bytes of the built program ``name``."""
    return path(name).read_bytes()
