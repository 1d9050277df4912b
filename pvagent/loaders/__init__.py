"""The two program loaders behind one call: :func:`load`.

=============  ==========================  ===============================
kind           loader                      needs in the guest
=============  ==========================  ===============================
bpf-object     :mod:`.libbpf` (ctypes)     ``libbpf1``
bcc-source     :mod:`.bcc` (lazy import)   ``python3-bpfcc`` + kernel headers
=============  ==========================  ===============================

The signature is checked *before* this (see :mod:`pvagent.trust`); each loader hands
what it is about to load to ``vet`` (:meth:`pvagent.trust.TrustPolicy.vet`) before
anything reaches the kernel, and raises :class:`~pvagent.errors.TrustRefused` if it says no.
"""

from __future__ import annotations

from pathlib import Path

from pvagent.loaders.bcc import load_source
from pvagent.loaders.libbpf import load_object
from pvagent.program import EventSink, LoadedProgram
from pvagent.trust import Vet
from pvproto import ProgramKind

__all__ = ["load"]


def load(
    program_id: str,
    kind: ProgramKind,
    payload: bytes,
    sink: EventSink,
    *,
    vet: Vet,
    bcc_cache_dir: Path | None = None,
) -> LoadedProgram:
    """Vet, load and attach ``payload``; raise :class:`~pvagent.errors.LoadFailed` with the
    log, or :class:`~pvagent.errors.TrustRefused` when ``vet`` refuses it."""
    if kind == "bpf-object":
        return load_object(program_id, payload, sink, vet)

    return load_source(program_id, payload, sink, vet, cache_dir=bcc_cache_dir)
