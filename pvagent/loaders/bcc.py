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
"""

from __future__ import annotations

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

from pvagent.errors import LoadFailed
from pvagent.program import EventSink
from pvproto import ProgramKind

__all__ = ["DEFAULT_CACHE_DIR", "BccProgram", "kernel_source", "load_source"]

log = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = Path("/var/cache/pvagent")
_RINGBUF = re.compile(r"\bBPF_RINGBUF_OUTPUT\s*\(\s*([A-Za-z_]\w*)\s*,")
_fd2_lock = threading.Lock()


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

    def __init__(self, program_id: str, source: str, sink: EventSink, cache_dir: Path) -> None:
        try:
            import bcc  # noqa: PLC0415 - optional: only guests that run bcc sources have it
        except ImportError as err:
            raise LoadFailed(
                f"bcc is not available ({err}); hint: install python3-bpfcc, or send a bpf-object"
            ) from err
        self.program_id = program_id
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
        try:
            with capture:
                self._bpf: Any = bcc.BPF(text=source.encode())
        except Exception as err:  # bcc raises bare Exception for compile and verifier errors
            raise LoadFailed(f"bcc could not load the program: {err}", capture.text) from err
        try:
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


def load_source(
    program_id: str, payload: bytes, sink: EventSink, *, cache_dir: Path | None = None
) -> BccProgram:
    """Compile, verify and attach a bcc source; raise LoadFailed with the compiler's log."""
    try:
        source = payload.decode("utf-8")
    except UnicodeDecodeError as err:
        raise LoadFailed(f"a bcc-source payload is UTF-8 C source: {err}") from err
    program = BccProgram(program_id, source, sink, cache_dir or DEFAULT_CACHE_DIR)
    log.info("loaded %s with bcc in %.0f ms", program_id, program.load_seconds * 1000)
    return program
