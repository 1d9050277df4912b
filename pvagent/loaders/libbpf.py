"""``bpf-object`` loader: a CO-RE ELF object loaded with libbpf through ctypes.

open (from memory) → load (CO-RE relocation + kernel verifier) → attach every
auto-loaded program (libbpf picks the attach point from the section name) → one libbpf
``ring_buffer`` over every ringbuf map, whose epoll fd the agent waits on.
"""

from __future__ import annotations

import ctypes
import logging
import os
import time

from pvagent import libbpf_ctypes as bpf
from pvagent.errors import LoadFailed
from pvagent.program import EventSink
from pvproto import ProgramKind

__all__ = ["LibbpfProgram", "load_object"]

log = logging.getLogger(__name__)


def _error_text(lines: list[str]) -> str:
    return "".join(lines)[-60000:]


class LibbpfProgram:
    """A loaded, attached CO-RE object (see :class:`pvagent.program.LoadedProgram`)."""

    kind: ProgramKind = "bpf-object"

    def __init__(self, program_id: str, payload: bytes, sink: EventSink) -> None:
        self.program_id = program_id
        self._lib = bpf.lib()
        self._sink = sink
        self._obj: int | None = None
        self._links: list[int] = []
        self._rb: int | None = None
        self._maps: dict[str, tuple[int, int]] = {}  # name -> (fd, type)
        self._payload = ctypes.create_string_buffer(payload, len(payload))  # kept alive
        self._callback = bpf.SAMPLE_FN(self._on_sample)
        self._failure: BaseException | None = None
        started = time.perf_counter()
        try:
            self._open_load_attach()
        except BaseException:
            self.close()
            raise
        self.load_seconds = time.perf_counter() - started
        self.ringbufs = tuple(
            n for n, (_, t) in self._maps.items() if t == bpf.BPF_MAP_TYPE_RINGBUF
        )

    def _open_load_attach(self) -> None:
        lib = self._lib
        with bpf.capture_log() as lines:
            obj = lib.bpf_object__open_mem(self._payload, len(self._payload), None)
            if not obj:
                err = ctypes.get_errno()
                raise LoadFailed(
                    f"libbpf cannot open the object: {os.strerror(err)}", _error_text(lines)
                )
            self._obj = obj
            rc = lib.bpf_object__load(obj)
            if rc < 0:
                raise LoadFailed(
                    f"the kernel refused the program ({os.strerror(-rc)}); see the verifier log",
                    _error_text(lines),
                )
            prog = lib.bpf_object__next_program(obj, None)
            while prog:
                if lib.bpf_program__autoload(prog):
                    link = lib.bpf_program__attach(prog)
                    if not link:
                        err = ctypes.get_errno()
                        section = lib.bpf_program__section_name(prog).decode()
                        raise LoadFailed(
                            f"cannot attach {section}: {os.strerror(err)}", _error_text(lines)
                        )
                    self._links.append(link)
                prog = lib.bpf_object__next_program(obj, prog)
            bmap = lib.bpf_object__next_map(obj, None)
            while bmap:
                name = lib.bpf_map__name(bmap).decode()
                self._maps[name] = (lib.bpf_map__fd(bmap), lib.bpf_map__type(bmap))
                bmap = lib.bpf_object__next_map(obj, bmap)
        rings = [(n, fd) for n, (fd, t) in self._maps.items() if t == bpf.BPF_MAP_TYPE_RINGBUF]
        if not rings:
            raise LoadFailed("the object has no BPF_MAP_TYPE_RINGBUF map: it could report nothing")
        self._ring_names = [n for n, _ in rings]
        for index, (_, fd) in enumerate(rings):
            if self._rb is None:
                self._rb = lib.ring_buffer__new(fd, self._callback, index, None)
                if not self._rb:
                    raise LoadFailed(f"ring_buffer__new: {os.strerror(ctypes.get_errno())}")
            elif lib.ring_buffer__add(self._rb, fd, self._callback, index) < 0:
                raise LoadFailed(f"ring_buffer__add: {os.strerror(ctypes.get_errno())}")

    def _on_sample(self, ctx: int | None, data: int | None, size: int) -> int:
        try:
            self._sink(self._ring_names[ctx or 0], ctypes.string_at(data or 0, size))
        except BaseException as err:  # must not unwind through C; re-raised by consume()
            self._failure = err
            return -1  # stops this consume round
        return 0

    def fileno(self) -> int:
        assert self._rb is not None
        return int(self._lib.ring_buffer__epoll_fd(self._rb))

    def consume(self) -> int:
        if self._rb is None:
            return 0
        count = int(self._lib.ring_buffer__consume(self._rb))
        if self._failure is not None:
            failure, self._failure = self._failure, None
            raise failure
        return count

    def map_fd(self, name: str) -> int | None:
        entry = self._maps.get(name)
        return entry[0] if entry else None

    def close(self) -> None:
        if self._rb is not None:
            self._lib.ring_buffer__free(self._rb)
            self._rb = None
        for link in self._links:
            self._lib.bpf_link__destroy(link)
        self._links.clear()
        if self._obj is not None:
            self._lib.bpf_object__close(self._obj)
            self._obj = None
        self._maps.clear()


def load_object(program_id: str, payload: bytes, sink: EventSink) -> LibbpfProgram:
    """Open, verify and attach a CO-RE object; raise LoadFailed with libbpf's log."""
    if not payload.startswith(b"\x7fELF"):
        raise LoadFailed(
            "a bpf-object payload is an ELF file; this one does not start with \\x7fELF"
        )
    program = LibbpfProgram(program_id, payload, sink)
    log.info("loaded %s with libbpf in %.1f ms", program_id, program.load_seconds * 1000)
    return program
