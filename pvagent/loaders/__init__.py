"""The two program loaders behind one call: :func:`load`.

=============  ==========================  ===============================
kind           loader                      needs in the guest
=============  ==========================  ===============================
bpf-object     :mod:`.libbpf` (ctypes)     ``libbpf1``
bcc-source     :mod:`.bcc` (lazy import)   ``python3-bpfcc`` + kernel headers
=============  ==========================  ===============================

Trust is checked *before* this (see :mod:`pvagent.trust`); a loader only loads.
"""

from __future__ import annotations

from pathlib import Path

from pvagent.loaders.bcc import load_source
from pvagent.loaders.libbpf import load_object
from pvagent.program import EventSink, LoadedProgram
from pvproto import ProgramKind

__all__ = ["load"]


def load(
    program_id: str,
    kind: ProgramKind,
    payload: bytes,
    sink: EventSink,
    *,
    bcc_cache_dir: Path | None = None,
) -> LoadedProgram:
    """Load and attach ``payload``; raise :class:`~pvagent.errors.LoadFailed` with the log."""
    if kind == "bpf-object":
        return load_object(program_id, payload, sink)

    return load_source(program_id, payload, sink, cache_dir=bcc_cache_dir)
