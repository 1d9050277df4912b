"""The eBPF programs built from ``bpf/`` (``make -C bpf``), where every side can take them.

The host reads the objects it injects from here, the guest agent the ones ``pvagent trace``
loads locally, and the image and container builds get them as package data of the wheel.
This package belongs to neither daemon, so neither imports the other to find a program.

``read("affinity.bpf.o")`` returns the CO-RE object, ``read("affinity.bcc.c")`` the
self-contained bcc source.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["ObjectMissing", "directory", "path", "read"]

_HERE = Path(__file__).resolve().parent


class ObjectMissing(FileNotFoundError):
    """A program that ``make -C bpf`` builds is absent (or the name is not a file name)."""


def directory() -> Path:
    """Where the built programs are (this package's directory)."""
    return _HERE


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
