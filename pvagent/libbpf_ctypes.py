"""ctypes bindings to the few libbpf (``libbpf.so.1``, Debian ``libbpf1``) calls the agent uses.

libbpf reports through a global print callback; :func:`capture_log` routes it into a
buffer while a load runs, so its messages and the kernel verifier's log end up in the
error the host receives instead of on a console nobody reads. Outside a capture they go
to this module's logger at debug level.

Map helpers (:func:`map_lookup`, :func:`map_update`, :func:`map_keys`) take a plain map fd,
so they serve maps created by bcc as well.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pvagent.errors import LoadFailed

__all__ = [
    "BPF_MAP_TYPE_RINGBUF",
    "SAMPLE_FN",
    "capture_log",
    "fdinfo",
    "lib",
    "map_ids",
    "map_keys",
    "map_lookup",
    "map_update",
]

log = logging.getLogger(__name__)

#: enum bpf_map_type value of ring buffers (stable UAPI).
BPF_MAP_TYPE_RINGBUF = 27
#: ring_buffer_sample_fn: int (*)(void *ctx, void *data, size_t size)
SAMPLE_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)
#: libbpf_print_fn_t: int (*)(enum libbpf_print_level, const char *fmt, va_list ap).
#: On x86-64 and arm64 a va_list argument is passed as a pointer.
_PRINT_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
_MAX_LOG = 256 * 1024

_P = ctypes.c_void_p


def _load() -> ctypes.CDLL:
    try:
        library = ctypes.CDLL("libbpf.so.1", use_errno=True)
    except OSError as err:
        raise LoadFailed(
            f"cannot load libbpf ({err}); hint: install Debian's libbpf1 package"
        ) from err
    signatures: dict[str, tuple[object, list[object]]] = {
        "libbpf_set_print": (_P, [_PRINT_FN]),
        "bpf_object__open_mem": (_P, [ctypes.c_char_p, ctypes.c_size_t, _P]),
        "bpf_object__load": (ctypes.c_int, [_P]),
        "bpf_object__close": (None, [_P]),
        "bpf_object__next_program": (_P, [_P, _P]),
        "bpf_object__next_map": (_P, [_P, _P]),
        "bpf_program__name": (ctypes.c_char_p, [_P]),
        "bpf_program__section_name": (ctypes.c_char_p, [_P]),
        "bpf_program__autoload": (ctypes.c_bool, [_P]),
        "bpf_program__set_autoload": (ctypes.c_int, [_P, ctypes.c_bool]),
        "bpf_program__attach_iter": (_P, [_P, _P]),
        "bpf_link__fd": (ctypes.c_int, [_P]),
        "bpf_iter_create": (ctypes.c_int, [ctypes.c_int]),
        "bpf_program__attach": (_P, [_P]),
        "bpf_program__fd": (ctypes.c_int, [_P]),
        "bpf_map__pin_path": (ctypes.c_char_p, [_P]),
        "bpf_link__destroy": (ctypes.c_int, [_P]),
        "bpf_map__name": (ctypes.c_char_p, [_P]),
        "bpf_map__type": (ctypes.c_int, [_P]),
        "bpf_map__fd": (ctypes.c_int, [_P]),
        "ring_buffer__new": (_P, [ctypes.c_int, SAMPLE_FN, _P, _P]),
        "ring_buffer__add": (ctypes.c_int, [_P, ctypes.c_int, SAMPLE_FN, _P]),
        "ring_buffer__consume": (ctypes.c_int, [_P]),
        "ring_buffer__epoll_fd": (ctypes.c_int, [_P]),
        "ring_buffer__free": (None, [_P]),
        "bpf_map_lookup_elem": (ctypes.c_int, [ctypes.c_int, _P, _P]),
        "bpf_map_update_elem": (ctypes.c_int, [ctypes.c_int, _P, _P, ctypes.c_uint64]),
        "bpf_map_get_next_key": (ctypes.c_int, [ctypes.c_int, _P, _P]),
        "bpf_map_get_next_id": (ctypes.c_int, [ctypes.c_uint32, ctypes.POINTER(ctypes.c_uint32)]),
        "bpf_obj_get": (ctypes.c_int, [ctypes.c_char_p]),
    }
    for name, (restype, argtypes) in signatures.items():
        func = getattr(library, name)
        func.restype = restype
        func.argtypes = argtypes
    return library


_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.vsnprintf.restype = ctypes.c_int
_libc.vsnprintf.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_void_p]

_lock = threading.Lock()  # one capture at a time: libbpf's print hook is process-global
_capture: list[str] | None = None
_lib: ctypes.CDLL | None = None


def _print_to_capture(level: int, fmt: bytes | None, args: int | None) -> int:
    buf = ctypes.create_string_buffer(4096)
    _libc.vsnprintf(buf, len(buf), fmt, args)
    text = buf.value.decode(errors="replace")
    sink = _capture
    if sink is not None:
        if sum(map(len, sink)) < _MAX_LOG:
            sink.append(text)
    else:
        log.debug("libbpf: %s", text.rstrip())
    return 0


_on_print = _PRINT_FN(_print_to_capture)


def lib() -> ctypes.CDLL:
    """The loaded libbpf, with argument types declared and the print hook installed."""
    global _lib  # noqa: PLW0603 - one library handle per process
    if _lib is None:
        _lib = _load()
        _lib.libbpf_set_print(_on_print)
    return _lib


@contextmanager
def capture_log() -> Iterator[list[str]]:
    """Collect libbpf's (and the verifier's) messages printed inside the block."""
    global _capture  # noqa: PLW0603 - libbpf's print hook is process-global
    library = lib()
    with _lock:
        # Re-install the hook every time: libbcc shares libbpf.so and installs its own.
        library.libbpf_set_print(_on_print)
        lines: list[str] = []
        _capture = lines
        try:
            yield lines
        finally:
            _capture = None


def _check(rc: int, what: str) -> None:
    if rc < 0:
        err = ctypes.get_errno() or -rc
        raise OSError(err, f"{what}: {os.strerror(err)}")


def map_lookup(fd: int, key: bytes, value_size: int) -> bytes | None:
    """Value of ``key`` in the map ``fd``, or None if absent."""
    value = ctypes.create_string_buffer(value_size)
    rc = lib().bpf_map_lookup_elem(fd, key, value)
    if rc < 0 and ctypes.get_errno() == errno.ENOENT:
        return None
    _check(rc, "bpf_map_lookup_elem")
    return value.raw


def map_update(fd: int, key: bytes, value: bytes) -> None:
    """Set ``key`` to ``value`` in the map ``fd`` (BPF_ANY)."""
    _check(lib().bpf_map_update_elem(fd, key, value, 0), "bpf_map_update_elem")


def map_keys(fd: int, key_size: int, limit: int) -> list[bytes]:
    """Up to ``limit`` keys of the hash map ``fd`` (a snapshot; the map may change meanwhile)."""
    keys: list[bytes] = []
    prev: bytes | None = None
    nxt = ctypes.create_string_buffer(key_size)
    while len(keys) < limit:
        rc = lib().bpf_map_get_next_key(fd, prev, nxt)
        if rc < 0 and ctypes.get_errno() == errno.ENOENT:
            break
        _check(rc, "bpf_map_get_next_key")
        prev = nxt.raw
        keys.append(prev)
    return keys


def fdinfo(fd: int) -> dict[str, str]:
    """The kernel's ``/proc/self/fdinfo`` fields of a BPF map or program fd (``memlock``,
    ``map_id``, ``prog_id``, …); {} when unreadable."""
    try:
        text = Path(f"/proc/self/fdinfo/{fd}").read_text()
    except OSError:
        return {}
    fields = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    return fields


def map_ids(limit: int = 1 << 16) -> set[int]:
    """Ids of every BPF map in the kernel now (at most ``limit``)."""
    ids: set[int] = set()
    current = ctypes.c_uint32(0)
    while len(ids) < limit and lib().bpf_map_get_next_id(current.value, ctypes.byref(current)) == 0:
        ids.add(current.value)
    return ids
