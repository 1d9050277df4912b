"""``bcc-source`` loader: C source compiled in the guest by bcc (Debian ``python3-bpfcc``).

For ad-hoc probes an operator writes without a build step. bcc is imported lazily,
here only, so a guest without it still runs ``bpf-object`` programs.

bcc compiles against a kernel header tree. Debian ships the headers of one kernel as
two directories (``linux-headers-<v>-common`` and ``-<arch>``) and bcc needs them as one
tree when ``/lib/modules/$(uname -r)/build`` is absent (a kernel without its headers
package): :func:`kernel_source` merges them once, as symlinks, into a cache directory
and points ``BCC_KERNEL_SOURCE`` at it. Tracepoint programs take their argument layout
from tracefs, so headers of a nearby version are safe for them.

bcc prints compiler and verifier diagnostics on fd 2; the loader captures that fd while
compiling so the log reaches the host.

Nothing is loaded or attached before the trust policy has judged the *compiled* program:
bcc's automatic attach (of ``kprobe__``, ``tracepoint__``, ``kfunc__``… functions) is
switched off; after compiling, every function's bytecode (its helper calls, whatever the
source text looked like) and the attach point its name implies go to the policy's vet,
with every table; only then does this loader load and attach the functions itself.

bcc creates its tables while compiling, pinned ones included (``BPF_TABLE_PINNED``: it
opens an existing pin, or creates and pins a new map). So the loader notes the maps and
pins that exist before compiling: a table that is an older map, or a pin that appeared
and holds one of the program's tables, is a pinned table. Refused, its new pins are
removed at once; allowed, they are removed when the program is closed.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import platform
import re
import select
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from pvagent import libbpf_ctypes
from pvagent.elf import helper_calls
from pvagent.errors import LoadFailed
from pvagent.program import EventSink
from pvagent.trust import MapView, ProgramView, Vet
from pvproto import ProgramKind

__all__ = ["DEFAULT_CACHE_DIR", "BccProgram", "kernel_source", "load_source"]

log = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = Path("/var/cache/pvagent")
_RINGBUF = re.compile(r"\bBPF_RINGBUF_OUTPUT\s*\(\s*([A-Za-z_]\w*)\s*,")
_fd2_lock = threading.Lock()
#: bcc's automatic-attach name prefixes (bcc 0.26 ``BPF._trace_autoload``) → libbpf section
#: prefix of the attach point they imply.
_PREFIXES = {
    "kprobe__": "kprobe/",
    "kretprobe__": "kretprobe/",
    "tracepoint__": "tracepoint/",
    "raw_tracepoint__": "raw_tracepoint/",
    "kfunc__": "fentry/",
    "kretfunc__": "fexit/",
    "lsm__": "lsm/",
}
_BPFFS_MAGIC_TYPE = "bpf"
_MAX_PINS = 10_000  # entries of bpf filesystems looked at, at most


def _attach_point(function: str) -> str | None:
    """Where bcc would attach ``function``, in libbpf section syntax; None: nowhere."""
    for prefix, section in _PREFIXES.items():
        if function.startswith(prefix):
            rest = function[len(prefix) :]
            if prefix == "tracepoint__":
                rest = rest.replace("__", "/")
            return section + rest
    return None


def _pins() -> set[str]:
    """Every file in every mounted bpf filesystem (bounded)."""
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return set()
    found: set[str] = set()
    for line in mounts:
        fields = line.split()
        if len(fields) < 3 or fields[2] != _BPFFS_MAGIC_TYPE:
            continue
        for root, _dirs, files in os.walk(fields[1]):
            found.update(os.path.join(root, f) for f in files)
            if len(found) >= _MAX_PINS:
                return found
    return found


def _map_id(fd: int) -> int | None:
    value = libbpf_ctypes.fdinfo(fd).get("map_id", "")
    return int(value) if value.isdigit() else None


def _pinned_map_id(path: str) -> int | None:
    fd = libbpf_ctypes.lib().bpf_obj_get(path.encode())
    if fd < 0:
        return None
    try:
        return _map_id(fd)
    finally:
        os.close(fd)


def _header_pairs(src: Path) -> list[tuple[str, Path, Path]]:
    """(version, common dir, arch dir) for every complete Debian header pair, newest first."""
    pairs = []
    for common in src.glob("linux-headers-*-common"):
        version = common.name[len("linux-headers-") : -len("-common")]
        for arch in src.glob(f"linux-headers-{version}-*"):
            if arch != common and not arch.name.endswith("-common") and arch.is_dir():
                pairs.append((version, common, arch))
    return sorted(
        pairs,
        key=lambda p: [int(x) if x.isdigit() else 0 for x in re.split(r"[.-]", p[0])],
        reverse=True,
    )


def kernel_source(cache_dir: Path, *, src: Path = Path("/usr/src")) -> Path | None:
    """A header tree for bcc, or None when bcc finds the running kernel's own.

    Honours an explicit ``BCC_KERNEL_SOURCE``; otherwise merges the newest Debian
    header pair under ``src`` into ``cache_dir/kernel-headers/<name>`` (once).
    """
    if os.environ.get("BCC_KERNEL_SOURCE"):
        return Path(os.environ["BCC_KERNEL_SOURCE"])
    if Path(f"/lib/modules/{platform.release()}/build/include").is_dir():
        return None
    pairs = _header_pairs(src)
    if not pairs:
        raise LoadFailed(
            f"bcc needs kernel headers and there are none for {platform.release()}; "
            "hint: install linux-headers-amd64 (or the headers of the running kernel)"
        )
    _, common, arch = pairs[0]
    tree = cache_dir / "kernel-headers" / arch.name
    stamp = tree / ".pvagent-complete"
    if not stamp.exists():
        tree.parent.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(prefix=arch.name + ".", dir=tree.parent))
        try:
            subprocess.run(
                ["cp", "-rs", f"{common}/.", f"{partial}/"], check=True, capture_output=True
            )
            subprocess.run(
                ["cp", "-rsf", f"{arch}/.", f"{partial}/"], check=True, capture_output=True
            )
            (partial / ".pvagent-complete").touch()
            partial.rename(tree)
        except (OSError, subprocess.CalledProcessError) as err:
            subprocess.run(["rm", "-rf", str(partial)], check=False)
            if not stamp.exists():  # a concurrent agent may have won the rename
                detail = getattr(err, "stderr", b"") or str(err)
                raise LoadFailed(f"cannot merge kernel headers into {tree}: {detail!r}") from err
    return tree


class _Fd2Capture:
    """Redirect fd 2 into a temporary file for the duration of a with-block."""

    def __enter__(self) -> _Fd2Capture:
        _fd2_lock.acquire()
        self._file = tempfile.TemporaryFile()
        self._saved = os.dup(2)
        os.dup2(self._file.fileno(), 2)
        self.text = ""
        return self

    def __exit__(self, *exc: object) -> None:
        os.dup2(self._saved, 2)
        os.close(self._saved)
        self._file.seek(0)
        self.text = self._file.read()[-60000:].decode(errors="replace")
        self._file.close()
        _fd2_lock.release()


class BccProgram:
    """A compiled, attached bcc program (see :class:`pvagent.program.LoadedProgram`)."""

    kind: ProgramKind = "bcc-source"

    def __init__(
        self, program_id: str, source: str, sink: EventSink, cache_dir: Path, vet: Vet
    ) -> None:
        try:
            import bcc  # noqa: PLC0415 - optional: only guests that run bcc sources have it
        except ImportError as err:
            raise LoadFailed(
                f"bcc is not available ({err}); hint: install python3-bpfcc, or send a bpf-object"
            ) from err
        self.program_id = program_id
        self.attach_points: tuple[str, ...] = ()
        self.memory_bytes = 0
        self._pins: list[str] = []
        self._attached: list[str] = []
        self._bcc = bcc
        self._sink = sink
        self._failure: BaseException | None = None
        self._epoll: select.epoll | None = None
        self.ringbufs = tuple(_RINGBUF.findall(source))
        if not self.ringbufs:
            raise LoadFailed("the source declares no BPF_RINGBUF_OUTPUT: it could report nothing")
        started = time.perf_counter()
        headers = kernel_source(cache_dir)
        if headers is not None:
            os.environ["BCC_KERNEL_SOURCE"] = str(headers)
        capture = _Fd2Capture()
        maps_before, pins_before = libbpf_ctypes.map_ids(), _pins()
        try:
            with capture:
                self._bpf: Any = _compile_only(bcc, source)
        except Exception as err:  # bcc raises bare Exception for compile and verifier errors
            self.close()
            raise LoadFailed(f"bcc could not compile the program: {err}", capture.text) from err
        try:
            self._vet_compiled(bcc, vet, maps_before, pins_before)
            try:
                with capture:
                    self._attach(bcc)
            except Exception as err:  # bcc: bare Exception for verifier and attach errors
                raise LoadFailed(f"bcc could not load the program: {err}", capture.text) from err
            self.memory_bytes = sum(
                int(v) if (v := libbpf_ctypes.fdinfo(fd).get("memlock", "")).isdigit() else 0
                for fd in self._fds()
            )
            self._epoll = select.epoll()
            for name in self.ringbufs:
                table = self._bpf[name.encode()]
                table.open_ring_buffer(self._make_callback(name))
                # Level-triggered: the ring fd stays readable while records are unread.
                self._epoll.register(table.map_fd, select.EPOLLIN)
        except BaseException:
            self.close()
            raise
        self.load_seconds = time.perf_counter() - started

    def _tables(self, bcc: Any) -> list[tuple[str, int]]:
        """(name, fd) of every table bcc created for the module."""
        lib, module = bcc.libbcc.lib, self._bpf.module
        lib.bpf_num_tables.restype = ctypes.c_size_t
        lib.bpf_num_tables.argtypes = [ctypes.c_void_p]
        lib.bpf_table_name.restype = ctypes.c_char_p
        lib.bpf_table_name.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        lib.bpf_table_fd_id.restype = ctypes.c_int
        lib.bpf_table_fd_id.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        return [
            (lib.bpf_table_name(module, i).decode(errors="replace"), lib.bpf_table_fd_id(module, i))
            for i in range(lib.bpf_num_tables(module))
        ]

    def _vet_compiled(
        self, bcc: Any, vet: Vet, maps_before: set[int], pins_before: set[str]
    ) -> None:
        lib, module = bcc.libbcc.lib, self._bpf.module
        views = []
        for i in range(lib.bpf_num_functions(module)):
            name = lib.bpf_function_name(module, i).decode(errors="replace")
            calls = helper_calls(self._bpf.dump_func(name.encode()), subprograms=False)
            views.append(ProgramView(name, _attach_point(name) or ".text", frozenset(calls)))
        tables = self._tables(bcc)
        ids = {fd: _map_id(fd) for _, fd in tables if fd >= 0}
        ours = {i for i in ids.values() if i is not None}
        new_pins = {p: _pinned_map_id(p) for p in sorted(_pins() - pins_before)}
        self._pins = [p for p, i in new_pins.items() if i in ours]
        pinned_at = {i: p for p, i in new_pins.items() if i in ours}
        maps = []
        for name, fd in tables:
            map_id = ids.get(fd)
            pinned = None
            if map_id in maps_before:
                pinned = f"an existing map, id {map_id}"
            elif map_id in pinned_at:
                pinned = pinned_at[map_id]
            type_id = lib.bpf_table_type_id(module, lib.bpf_table_id(module, name.encode()))
            maps.append(MapView(name, type_id, pinned))
        # Functions without an attach prefix are never loaded: only the attached ones count.
        attached = [v for v in views if v.attach != ".text"]
        self.attach_points = tuple(vet(attached, maps))
        self._attached = [v.name for v in attached]

    def _attach(self, bcc: Any) -> None:
        """What ``BPF._trace_autoload`` does, for the vetted functions only."""
        bpf = self._bpf
        for name in self._attached:
            fn = name.encode()
            if name.startswith("kprobe__"):
                bpf.attach_kprobe(event=bpf.fix_syscall_fnname(fn[8:]), fn_name=fn)
            elif name.startswith("kretprobe__"):
                bpf.attach_kretprobe(event=bpf.fix_syscall_fnname(fn[11:]), fn_name=fn)
            elif name.startswith("tracepoint__"):
                bpf.load_func(fn, bcc.BPF.TRACEPOINT)
                tp = fn[len(b"tracepoint__") :].replace(b"__", b":")
                bpf.attach_tracepoint(tp=tp, fn_name=fn)
            elif name.startswith("raw_tracepoint__"):
                bpf.load_func(fn, bcc.BPF.RAW_TRACEPOINT)
                bpf.attach_raw_tracepoint(tp=fn[len(b"raw_tracepoint__") :], fn_name=fn)
            elif name.startswith("kfunc__"):
                bpf.attach_kfunc(fn_name=fn)
            elif name.startswith("kretfunc__"):
                bpf.attach_kretfunc(fn_name=fn)
            elif name.startswith("lsm__"):
                bpf.attach_lsm(fn_name=fn)

    def _fds(self) -> list[int]:
        funcs = [int(f.fd) for f in self._bpf.funcs.values()]
        return funcs + [fd for _, fd in self._tables(self._bcc) if fd >= 0]

    def _make_callback(self, name: str) -> Any:
        def callback(_ctx: object, data: int, size: int) -> int:
            try:
                self._sink(name, ctypes.string_at(data, size))
            except BaseException as err:  # must not unwind through C; re-raised by consume()
                self._failure = err
                return -1
            return 0

        return callback

    def fileno(self) -> int:
        assert self._epoll is not None
        return self._epoll.fileno()

    def consume(self) -> int:
        if self._epoll is None:
            return 0
        self._bpf.ring_buffer_consume()
        if self._failure is not None:
            failure, self._failure = self._failure, None
            raise failure
        return -1  # bcc does not report the count

    def map_fd(self, name: str) -> int | None:
        try:
            return int(self._bpf[name.encode()].map_fd)
        except KeyError:
            return None

    def close(self) -> None:
        if self._epoll is not None:
            self._epoll.close()
            self._epoll = None
        bpf = getattr(self, "_bpf", None)
        if bpf is not None:
            bpf.cleanup()
            self._bpf = None
        for path in self._pins:  # only pins this program's tables created
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        self._pins.clear()


def _compile_only(bcc: Any, source: str) -> Any:
    """``bcc.BPF(text=source)`` without its automatic load and attach."""

    class Compiled(bcc.BPF):  # type: ignore[misc]
        def _trace_autoload(self) -> None:
            """Off: the loader attaches, after the vet."""

    return Compiled(text=source.encode())


def load_source(
    program_id: str,
    payload: bytes,
    sink: EventSink,
    vet: Vet,
    *,
    cache_dir: Path | None = None,
) -> BccProgram:
    """Compile, vet, verify and attach a bcc source; raise LoadFailed with the compiler's
    log, or TrustRefused when ``vet`` refuses the compiled program."""
    try:
        source = payload.decode("utf-8")
    except UnicodeDecodeError as err:
        raise LoadFailed(f"a bcc-source payload is UTF-8 C source: {err}") from err
    program = BccProgram(program_id, source, sink, cache_dir or DEFAULT_CACHE_DIR, vet)
    log.info("loaded %s with bcc in %.0f ms", program_id, program.load_seconds * 1000)
    return program
