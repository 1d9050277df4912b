"""What a loaded eBPF program looks like to the agent, whichever loader made it.

Both loaders (:mod:`pvagent.loaders.libbpf` for ``bpf-object`` payloads,
:mod:`pvagent.loaders.bcc` for ``bcc-source``) return a :class:`LoadedProgram`: its
``fileno()`` is an epoll fd that becomes readable when any of its ring buffers holds
records, so the asyncio loop waits on it (``loop.add_reader``) with no polling, and
``consume()`` hands every available record to the program's :data:`EventSink`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from pvproto import ProgramKind

__all__ = ["EventSink", "LoadedProgram"]

#: Called once per ring-buffer record: (ring buffer map name, record bytes).
EventSink = Callable[[str, bytes], None]


class LoadedProgram(Protocol):
    """A program loaded into the kernel and attached; ``close()`` detaches and frees it."""

    program_id: str
    kind: ProgramKind
    #: Names of its ring-buffer maps, in the order their records are dispatched.
    ringbufs: tuple[str, ...]
    #: Wall time of open + verify + attach (+ compile for bcc), seconds.
    load_seconds: float
    #: Where its programs are attached (libbpf section syntax), as vetted before loading.
    attach_points: tuple[str, ...]
    #: Kernel memory charged to its programs and maps (fdinfo ``memlock``), bytes.
    memory_bytes: int

    def fileno(self) -> int:
        """An epoll fd, readable while any ring buffer of the program holds records."""
        ...

    def consume(self) -> int:
        """Deliver all available records to the sink; return how many."""
        ...

    def map_fd(self, name: str) -> int | None:
        """File descriptor of the program's map ``name``, or None if it has none."""
        ...

    def close(self) -> None:
        """Detach every probe and free the program's maps. Idempotent."""
        ...
