"""``bpf-object`` loader: a CO-RE ELF object loaded with libbpf through ctypes.

open (from memory) → **vet** (the trust policy judges the programs libbpf will load, with
their attach points and calls, and the maps it will create, with their pinning) → load
(CO-RE relocation + kernel verifier) → attach every auto-loaded program (libbpf picks the
attach point from the section name) → one libbpf ``ring_buffer`` over every ringbuf map,
whose epoll fd the agent waits on. Nothing reaches the kernel before the vet.

Maps a program pinned (only when the policy allows pinning) are unpinned when it is
closed: its pins do not outlive it. Pins that existed before it was loaded are left alone.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import time

from pvagent import libbpf_ctypes as bpf
from pvagent.elf import ElfError, helper_calls, program_sections
from pvagent.errors import LoadFailed, TrustRefused
from pvagent.program import EventSink
from pvagent.trust import MapView, ProgramView, Vet
from pvproto import ProgramKind

__all__ = ["LibbpfProgram", "load_object"]

log = logging.getLogger(__name__)


#: Section kinds of iterator programs (libbpf's ``iter/`` and sleepable ``iter.s/``).
_ITERATOR_SECTIONS = frozenset({"iter", "iter.s"})
#: Output an iterator may print while it runs once (it has no reader: it is discarded).
_MAX_ITER_OUTPUT = 1 << 20


def _error_text(lines: list[str]) -> str:
    return "".join(lines)[-60000:]


class LibbpfProgram:
    """A loaded, attached CO-RE object (see :class:`pvagent.program.LoadedProgram`)."""

    kind: ProgramKind = "bpf-object"

    def __init__(self, program_id: str, payload: bytes, sink: EventSink, vet: Vet) -> None:
        self.program_id = program_id
        self._vet = vet
        self._raw = payload
        self.attach_points: tuple[str, ...] = ()
        self.memory_bytes = 0
        self._pins: list[str] = []  # pins this program created: removed by close()
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
            iterators = self._enable_iterators(obj)
            self._pins = self._vet_opened(obj)  # before load: a failed load may have pinned
            rc = lib.bpf_object__load(obj)
            if rc < 0:
                raise LoadFailed(
                    f"the kernel refused the program ({os.strerror(-rc)}); see the verifier log",
                    _error_text(lines),
                )
            prog = lib.bpf_object__next_program(obj, None)
            while prog:
                if lib.bpf_program__autoload(prog) and prog not in iterators:
                    link = lib.bpf_program__attach(prog)
                    if not link:
                        err = ctypes.get_errno()
                        section = lib.bpf_program__section_name(prog).decode()
                        raise LoadFailed(
                            f"cannot attach {section}: {os.strerror(err)}", _error_text(lines)
                        )
                    self._links.append(link)
                prog = lib.bpf_object__next_program(obj, prog)
            for prog in iterators:
                self._run_iterator(prog, lines)
            fds = []
            prog = lib.bpf_object__next_program(obj, None)
            while prog:
                fds.append(lib.bpf_program__fd(prog))
                prog = lib.bpf_object__next_program(obj, prog)
            bmap = lib.bpf_object__next_map(obj, None)
            while bmap:
                name = lib.bpf_map__name(bmap).decode()
                self._maps[name] = (lib.bpf_map__fd(bmap), lib.bpf_map__type(bmap))
                fds.append(lib.bpf_map__fd(bmap))
                bmap = lib.bpf_object__next_map(obj, bmap)
            self.memory_bytes = sum(_memlock(fd) for fd in fds if fd >= 0)
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

    def _enable_iterators(self, obj: int) -> list[int]:
        """The object's iterator programs (``iter/…`` or ``?iter/…`` sections), set to load.

        The generic rule (protocol 4): an object's iterators are vetted and loaded with it
        and run once, after its other programs are attached and before the load is answered,
        so an object can fill its maps with what existed before it (the affinity program
        finds threads pinned earlier). ``?`` keeps them out of older agents, which load only
        auto-loaded programs and would attach an iterator without ever running it.
        """
        lib = self._lib
        found = []
        prog = lib.bpf_object__next_program(obj, None)
        while prog:
            section = lib.bpf_program__section_name(prog).decode(errors="replace")
            if section.removeprefix("?").split("/", 1)[0] in _ITERATOR_SECTIONS:
                if lib.bpf_program__set_autoload(prog, True) < 0:
                    raise LoadFailed(f"cannot enable the iterator in {section}")
                found.append(prog)
            prog = lib.bpf_object__next_program(obj, prog)
        return found

    def _run_iterator(self, prog: int, lines: list[str]) -> None:
        """Attach one iterator, read it to the end (that runs it over every object it
        iterates), detach it. What it prints is discarded, bounded by ``_MAX_ITER_OUTPUT``."""
        lib = self._lib
        section = lib.bpf_program__section_name(prog).decode(errors="replace")
        link = lib.bpf_program__attach_iter(prog, None)
        if not link:
            err = ctypes.get_errno()
            raise LoadFailed(f"cannot attach {section}: {os.strerror(err)}", _error_text(lines))
        try:
            fd = lib.bpf_iter_create(lib.bpf_link__fd(link))
            if fd < 0:
                raise LoadFailed(f"cannot run {section}: {os.strerror(-fd)}", _error_text(lines))
            try:
                total = 0
                while chunk := os.read(fd, 65536):
                    total += len(chunk)
                    if total > _MAX_ITER_OUTPUT:
                        raise LoadFailed(f"{section} writes more than {_MAX_ITER_OUTPUT} bytes")
            except OSError as err:
                raise LoadFailed(f"running {section} failed: {err}") from err
            finally:
                os.close(fd)
        finally:
            lib.bpf_link__destroy(link)

    def _vet_opened(self, obj: int) -> list[str]:
        """Show the policy what libbpf is about to load; the pin paths it would create."""
        lib = self._lib
        try:
            sections = {s.name: s for s in program_sections(self._raw)}
        except ElfError as err:
            raise TrustRefused(f"not a valid eBPF object: {err}") from err
        views = []
        if ".text" in sections:  # subprograms: their calls count, they attach nowhere
            text = sections[".text"]
            views.append(ProgramView(".text", ".text", frozenset(helper_calls(text.data)),
                                     text.extern_calls))  # fmt: skip
        prog = lib.bpf_object__next_program(obj, None)
        while prog:
            if lib.bpf_program__autoload(prog):
                section = lib.bpf_program__section_name(prog).decode(errors="replace")
                # libbpf names a "?sec" (not auto-loaded) program's section "sec".
                elf = sections.get(section) or sections.get(f"?{section}")
                if elf is None:
                    raise TrustRefused(f"libbpf sees a program in {section!r}, the ELF does not")
                views.append(
                    ProgramView(
                        lib.bpf_program__name(prog).decode(errors="replace"),
                        section.removeprefix("?"),
                        frozenset(helper_calls(elf.data)),
                        elf.extern_calls,
                    )
                )
            prog = lib.bpf_object__next_program(obj, prog)
        maps, new_pins = [], []
        bmap = lib.bpf_object__next_map(obj, None)
        while bmap:
            raw_path = lib.bpf_map__pin_path(bmap)
            path = raw_path.decode(errors="replace") if raw_path else None
            maps.append(MapView(lib.bpf_map__name(bmap).decode(errors="replace"),
                                lib.bpf_map__type(bmap), path))  # fmt: skip
            if path is not None and not os.path.lexists(path):
                new_pins.append(path)
            bmap = lib.bpf_object__next_map(obj, bmap)
        self.attach_points = tuple(self._vet(views, maps))
        return new_pins

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
        for path in self._pins:  # only pins this program created (policy allowed them)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        self._pins.clear()
        self._maps.clear()


def _memlock(fd: int) -> int:
    value = bpf.fdinfo(fd).get("memlock", "0")
    return int(value) if value.isdigit() else 0


def load_object(program_id: str, payload: bytes, sink: EventSink, vet: Vet) -> LibbpfProgram:
    """Open, vet, verify and attach a CO-RE object; raise LoadFailed with libbpf's log, or
    TrustRefused when ``vet`` refuses what libbpf would load."""
    if not payload.startswith(b"\x7fELF"):
        raise LoadFailed(
            "a bpf-object payload is an ELF file; this one does not start with \\x7fELF"
        )
    program = LibbpfProgram(program_id, payload, sink, vet)
    log.info("loaded %s with libbpf in %.1f ms", program_id, program.load_seconds * 1000)
    return program
