"""The VM-name rule, in one place for everything that names a VM.

A VM name becomes a directory under the runtime directory (``/run/extpv/vms/<name>/``), a
cgroup (``vm-<name>``), a key in ``pvhost.toml`` and a word in logs and metrics, so it is
kept short and plain: a letter or digit, then up to 62 letters, digits, ``_``, ``.``, ``-``.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import Field

__all__ = ["VM_NAME_MAX", "VM_NAME_PATTERN", "VmName", "check_vm_name", "is_vm_name"]

VM_NAME_MAX = 63
VM_NAME_PATTERN = rf"^[A-Za-z0-9][A-Za-z0-9_.-]{{0,{VM_NAME_MAX - 1}}}$"
_NAME = re.compile(VM_NAME_PATTERN)

#: A pydantic field type for VM names.
VmName = Annotated[str, Field(pattern=VM_NAME_PATTERN)]


def is_vm_name(name: str) -> bool:
    return _NAME.fullmatch(name) is not None


def check_vm_name(name: str) -> str:
    """Return ``name``, or raise ValueError saying what a VM name may be."""
    if not is_vm_name(name):
        raise ValueError(
            f"invalid VM name {name!r}: use 1 to {VM_NAME_MAX} letters, digits, '_', '.' or "
            "'-', starting with a letter or digit"
        )
    return name
