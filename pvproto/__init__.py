"""extpv wire protocol: framing, messages, version negotiation. Nothing else.

>>> from pvproto import encode, FrameDecoder, Ping
>>> FrameDecoder().feed(encode(Ping(nonce=1)))
[Ping(request_id=0, type='ping', nonce=1)]
"""

from pvproto.cpulist import MAX_CPUS, CpuListError, format_cpulist, parse_cpulist
from pvproto.errors import (
    BadHeader,
    BadMagic,
    FrameTooLarge,
    FramingError,
    InvalidBody,
    ProtocolError,
    TruncatedFrame,
    UnknownMessageType,
    UnsupportedVersion,
    VersionMismatch,
)
from pvproto.framing import HEADER_SIZE, MAGIC, MAX_BODY_SIZE, FrameDecoder, encode
from pvproto.messages import (
    MAX_PAYLOAD_BYTES,
    MESSAGE_TYPES,
    AffinityResult,
    AffinityUpdate,
    BaseMessage,
    Error,
    GuestTopology,
    Hello,
    LoadProgram,
    Message,
    Ping,
    Pong,
    ProgramEvent,
    ProgramKind,
    ProgramLoaded,
    ThreadRequest,
    UnloadProgram,
    VcpuPlacement,
)
from pvproto.version import PROTOCOL_VERSION, SUPPORTED_VERSIONS, negotiate

__version__ = "0.1.0"

__all__ = [
    "HEADER_SIZE",
    "MAGIC",
    "MAX_BODY_SIZE",
    "MAX_CPUS",
    "MAX_PAYLOAD_BYTES",
    "MESSAGE_TYPES",
    "PROTOCOL_VERSION",
    "SUPPORTED_VERSIONS",
    "AffinityResult",
    "AffinityUpdate",
    "BadHeader",
    "BadMagic",
    "BaseMessage",
    "CpuListError",
    "Error",
    "FrameDecoder",
    "FrameTooLarge",
    "FramingError",
    "GuestTopology",
    "Hello",
    "InvalidBody",
    "LoadProgram",
    "Message",
    "Ping",
    "Pong",
    "ProgramEvent",
    "ProgramKind",
    "ProgramLoaded",
    "ProtocolError",
    "ThreadRequest",
    "TruncatedFrame",
    "UnknownMessageType",
    "UnloadProgram",
    "UnsupportedVersion",
    "VcpuPlacement",
    "VersionMismatch",
    "encode",
    "format_cpulist",
    "negotiate",
    "parse_cpulist",
]
