"""Framing over a byte stream (virtio-serial and unix sockets have no message boundaries).

Wire layout of one frame, all integers big-endian::

    offset size field
    0      4    magic        b"\\xe5PVF"
    4      1    version      protocol version of this frame
    5      1    type         message type code (see MESSAGE_TYPES)
    6      2    flags        reserved, zero in versions 1 and 2
    8      4    request_id   echoed by replies
    12     4    body_length  ≤ MAX_BODY_SIZE, checked before anything is buffered
    16     4    header_crc   CRC-32 of bytes 0..15
    20     n    body         7-bit ASCII JSON

Two invariants make resynchronisation unambiguous in every protocol version:
the magic starts with a byte ≥ 0x80, and a body never contains one. So a frame
can never hide inside another frame's body, a new magic inside a pending body
proves that frame truncated, and garbage is skipped up to the next header whose
checksum holds. The decoder therefore never waits for bytes a cut frame will
not send, never loses a valid frame behind a bad one, and buffers at most one
frame (header + MAX_BODY_SIZE) plus the chunk being fed.
"""

from __future__ import annotations

import json
import re
import struct
import zlib
from collections.abc import Iterable
from typing import Any, cast

import pydantic

from pvproto.errors import (
    BadHeader,
    BadMagic,
    FrameTooLarge,
    InvalidBody,
    ProtocolError,
    TruncatedFrame,
    UnknownMessageType,
    UnsupportedVersion,
)
from pvproto.messages import MESSAGE_TYPES, BaseMessage, Message
from pvproto.version import PROTOCOL_VERSION, SUPPORTED_VERSIONS

__all__ = ["HEADER_SIZE", "MAGIC", "MAX_BODY_SIZE", "FrameDecoder", "encode"]

MAGIC = b"\xe5PVF"
_HEADER = struct.Struct("!4sBBHII")  # everything the CRC covers
_CRC = struct.Struct("!I")
HEADER_SIZE = _HEADER.size + _CRC.size
#: Hard maximum of a frame body. A larger length field is refused unread.
MAX_BODY_SIZE = 1024 * 1024
#: Skipped garbage is reported at the latest once this much has accumulated.
_GARBAGE_REPORT = 64 * 1024
_NON_ASCII = re.compile(rb"[\x80-\xff]")


def encode(message: BaseMessage, *, version: int = PROTOCOL_VERSION) -> bytes:
    """Serialise one message into one frame. The only encoder.

    Raises :class:`FrameTooLarge` if the body would exceed :data:`MAX_BODY_SIZE`.
    """
    body = _ascii_json(message.wire_body(version))
    if len(body) > MAX_BODY_SIZE:
        raise FrameTooLarge(len(body), MAX_BODY_SIZE, request_id=message.request_id)
    head = _HEADER.pack(MAGIC, version, message.TYPE_CODE, 0, message.request_id, len(body))
    return head + _CRC.pack(zlib.crc32(head)) + body


def _ascii_json(data: Any) -> bytes:
    return json.dumps(data, ensure_ascii=True, separators=(",", ":")).encode("ascii")


class FrameDecoder:
    """Incremental decoder: feed it bytes in any chunking, get messages and errors back.

    >>> dec = FrameDecoder()
    >>> dec.feed(encode(Ping(nonce=7)))
    [Ping(request_id=0, type='ping', nonce=7)]
    """

    def __init__(
        self,
        *,
        versions: Iterable[int] = SUPPORTED_VERSIONS,
        max_body_size: int = MAX_BODY_SIZE,
    ) -> None:
        self._versions = frozenset(versions)
        self._max_body = max_body_size
        self._buf = bytearray()
        #: Header fields of the frame whose body is being collected, else None.
        self._pending: tuple[int, int, int, int, int] | None = None
        #: Bytes of the pending body already checked for non-ASCII.
        self._checked = 0
        self._garbage = 0

    @property
    def buffered(self) -> int:
        """Bytes held for an incomplete frame (bounded by one maximum frame)."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[Message | ProtocolError]:
        """Consume ``data``; return complete messages and errors in stream order.

        Never raises for bad input: every failure is a :class:`ProtocolError` in the list.
        """
        self._buf += data
        out: list[Message | ProtocolError] = []
        while self._step(out):
            pass
        return out

    # The decoder is a two-state machine: scanning for a header, or collecting a body.
    def _step(self, out: list[Message | ProtocolError]) -> bool:
        """Make one unit of progress; return False when more input is needed."""
        if self._pending is None:
            return self._scan_header(out)
        return self._collect_body(out)

    def _scan_header(self, out: list[Message | ProtocolError]) -> bool:
        buf = self._buf
        start = buf.find(MAGIC)
        if start < 0:
            # Keep a tail that may be the beginning of a magic split across chunks.
            keep = next(
                (n for n in range(min(len(MAGIC) - 1, len(buf)), 0, -1) if buf.endswith(MAGIC[:n])),
                0,
            )
            self._skip(len(buf) - keep, out)
            return False
        self._skip(start, out)
        if len(buf) < HEADER_SIZE:
            return False
        fields = _HEADER.unpack_from(buf)
        (crc,) = _CRC.unpack_from(buf, _HEADER.size)
        if zlib.crc32(buf[: _HEADER.size]) != crc:
            self._skip(1, out)  # not a header after all: rescan after this magic byte
            return True
        self._report_garbage(out)
        _, version, type_code, flags, request_id, length = fields
        if length > self._max_body:
            del buf[:HEADER_SIZE]
            out.append(FrameTooLarge(length, self._max_body, request_id=request_id))
            return True
        self._pending = (version, type_code, flags, request_id, length)
        self._checked = 0
        return True

    def _collect_body(self, out: list[Message | ProtocolError]) -> bool:
        assert self._pending is not None
        version, type_code, flags, request_id, length = self._pending
        available = min(len(self._buf) - HEADER_SIZE, length)
        bad = _NON_ASCII.search(self._buf, HEADER_SIZE + self._checked, HEADER_SIZE + available)
        if bad is not None:
            # A body is 7-bit: this byte is the start of something else (another frame).
            cut = bad.start()
            del self._buf[:cut]
            self._pending = None
            out.append(
                TruncatedFrame(
                    f"frame (type {type_code}, request {request_id}) was cut after "
                    f"{cut - HEADER_SIZE} of {length} body bytes; the sender probably restarted "
                    "mid-write. Decoding resumed at the next header.",
                    request_id=request_id,
                )
            )
            return True
        self._checked = available
        if available < length:
            return False
        body = bytes(self._buf[HEADER_SIZE : HEADER_SIZE + length])
        del self._buf[: HEADER_SIZE + length]
        self._pending = None
        out.append(self._decode(version, type_code, flags, request_id, body))
        return True

    def _decode(
        self, version: int, type_code: int, flags: int, request_id: int, body: bytes
    ) -> Message | ProtocolError:
        if version not in self._versions:
            return UnsupportedVersion(
                f"frame of protocol version {version}; this side speaks "
                f"{sorted(self._versions)}. Upgrade the older side.",
                request_id=request_id,
            )
        if flags:
            return BadHeader(
                f"reserved header flags {flags:#06x} are set in a version-{version} frame",
                request_id=request_id,
            )
        cls = MESSAGE_TYPES.get(type_code)
        if cls is None:
            return UnknownMessageType(
                f"unknown message type code {type_code} in a version-{version} frame",
                request_id=request_id,
            )
        try:
            # The header's class validates the body (its ``type`` literal included): only the
            # models a peer uses are ever built (they defer their schemas, see messages.py).
            message = cls.model_validate_json(body)
        except pydantic.ValidationError as err:
            return InvalidBody(
                f"invalid {cls.__name__} body: {_summarise(err)}", request_id=request_id
            )
        return cast("Message", message.model_copy(update={"request_id": request_id}))

    def _skip(self, count: int, out: list[Message | ProtocolError]) -> None:
        if count <= 0:
            return
        del self._buf[:count]
        self._garbage += count
        if self._garbage >= _GARBAGE_REPORT:
            self._report_garbage(out)

    def _report_garbage(self, out: list[Message | ProtocolError]) -> None:
        if self._garbage:
            out.append(BadMagic(self._garbage))
            self._garbage = 0


def _summarise(err: pydantic.ValidationError) -> str:
    problems = err.errors(include_url=False)
    first = problems[0]
    where = ".".join(str(p) for p in first["loc"]) or "body"
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return f"{where}: {first['msg']}{more}"
