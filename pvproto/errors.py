"""The one exception tree of the wire protocol.

::

    ProtocolError                 anything wrong with bytes or messages on the channel
    ├── FramingError              the byte stream itself
    │   ├── BadMagic              bytes that do not start a valid frame header (skipped)
    │   ├── BadHeader             a checksummed header with reserved bits set
    │   ├── FrameTooLarge         a length field above the hard maximum (never allocated)
    │   └── TruncatedFrame        a frame cut short by the start of another one
    ├── UnsupportedVersion        a well-formed frame of a protocol version we do not speak
    ├── UnknownMessageType        a well-formed frame whose type code we do not know
    ├── InvalidBody               a body that is not a valid message of its type
    └── VersionMismatch           Hello negotiation found no common version

The decoder *returns* these in stream order instead of raising them, so one bad
frame never costs the good frames behind it; ``encode`` and ``negotiate`` raise them.
"""

from __future__ import annotations

__all__ = [
    "BadHeader",
    "BadMagic",
    "FrameTooLarge",
    "FramingError",
    "InvalidBody",
    "ProtocolError",
    "TruncatedFrame",
    "UnknownMessageType",
    "UnsupportedVersion",
    "VersionMismatch",
]


class ProtocolError(Exception):
    """Root of every wire-protocol error.

    ``request_id`` is the id from the offending frame's header when one was read
    (so a peer can answer the right request with an ``Error`` message), else ``None``.
    """

    def __init__(self, message: str, *, request_id: int | None = None) -> None:
        super().__init__(message)
        self.request_id = request_id

    def __eq__(self, other: object) -> bool:
        # Value equality makes decoder output comparable in tests and logs.
        return (
            type(self) is type(other)
            and self.args == other.args
            and self.request_id == other.request_id
        )

    def __hash__(self) -> int:
        return hash((type(self), self.args, self.request_id))


class FramingError(ProtocolError):
    """The byte stream does not hold a well-formed frame here."""


class BadMagic(FramingError):
    """``skipped`` bytes did not begin a valid header and were discarded."""

    def __init__(self, skipped: int) -> None:
        super().__init__(
            f"skipped {skipped} byte(s) that do not start a valid extpv frame header "
            "(wrong magic or corrupted header); is something else writing to this port?"
        )
        self.skipped = skipped


class BadHeader(FramingError):
    """A header with a valid checksum but reserved fields set."""


class FrameTooLarge(FramingError):
    """A frame whose body would exceed the hard maximum; nothing was allocated for it."""

    def __init__(self, length: int, maximum: int, *, request_id: int | None = None) -> None:
        super().__init__(
            f"frame body of {length} bytes exceeds the maximum of {maximum} bytes; "
            "split the payload or raise the limit on both sides",
            request_id=request_id,
        )
        self.length = length
        self.maximum = maximum


class TruncatedFrame(FramingError):
    """A frame whose body was cut short (the peer restarted mid-write, or bytes were lost)."""


class UnsupportedVersion(ProtocolError):
    """A frame of a protocol version this decoder was not told to accept."""


class UnknownMessageType(ProtocolError):
    """A frame whose message type code is not defined in this protocol version."""


class InvalidBody(ProtocolError):
    """A frame body that is not valid JSON for its message type, or fails validation."""


class VersionMismatch(ProtocolError):
    """The two sides share no protocol version."""
