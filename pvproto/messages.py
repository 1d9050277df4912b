"""Message models: every message of the protocol, as one discriminated union.

Bodies travel as 7-bit ASCII JSON (bytes fields in base64). The ``type`` field is
the union's discriminator and must agree with the header's type code. Every
model is frozen, rejects unknown fields and bounds every list and string, so a
hostile peer cannot make the other side allocate or loop without limit.

The header's request id is carried on the model as ``request_id`` (not in the
JSON body): replies echo the id of the request they answer.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from typing import Annotated, Any, ClassVar, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pvproto.cpulist import MAX_CPUS

__all__ = [
    "MAX_PAYLOAD_BYTES",
    "MESSAGE_TYPES",
    "AffinityResult",
    "AffinityUpdate",
    "BaseMessage",
    "Error",
    "ErrorCode",
    "GuestDocument",
    "GuestTopology",
    "Hello",
    "IsolationMode",
    "LoadProgram",
    "MapContents",
    "MapEntry",
    "Message",
    "Ping",
    "Pong",
    "ProgramEvent",
    "ProgramKind",
    "ProgramLoaded",
    "ProgramRecords",
    "ReadMap",
    "ThreadRequest",
    "TopologyUpdate",
    "UnloadProgram",
    "VcpuPlacement",
    "build_schemas",
    "program_envelope",
]

#: Bounds of the protocol-3 record and map messages (one frame stays under MAX_BODY_SIZE with
#: base64: 256 records x 2 KiB, or 1024 map entries x (256 B key + 256 B value)).
MAX_RECORDS = 256
MAX_RECORD_BYTES = 2048
MAX_MAP_ENTRIES = 1024
MAX_MAP_KEY_BYTES = 256
MAX_MAP_VALUE_BYTES = 256
#: Largest document a host asks a protocol-4 agent to publish in the guest (JSON text).
MAX_DOCUMENT_BYTES = 64 * 1024

#: Largest program payload: base64 (4/3) of it plus the envelope fits in MAX_BODY_SIZE.
MAX_PAYLOAD_BYTES = 700 * 1024

Cpu = Annotated[int, Field(ge=0, lt=MAX_CPUS)]
Tid = Annotated[int, Field(ge=0, le=2**32 - 1)]
ShortText = Annotated[str, Field(max_length=256)]
ProgramId = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$")]
CpuSet = Annotated[list[Cpu], Field(max_length=MAX_CPUS)]
#: Why a peer could not act on a frame (``Error.code``).
ErrorCode = Literal["bad-frame", "bad-request", "unsupported", "rate-limited", "internal"]
#: What a LoadProgram payload is: a compiled CO-RE object, or a bcc C source.
ProgramKind = Literal["bpf-object", "bcc-source"]


def program_envelope(program_id: str, kind: ProgramKind, sha256: str, version: int) -> bytes:
    """The bytes a program signature covers: what is loaded (digest), as what (kind), under
    which id, and which version of it. Signing this, not the bare payload, makes a captured
    LoadProgram useless under another id or kind, and an older version recognisable.

    One ``key=value`` line per field; every field's alphabet excludes ``=`` and newlines
    (ids by their pattern, kinds by their literal, the digest is hex, the version decimal),
    so two different envelopes never share bytes.
    """
    return (
        f"extpv-load-program\nid={program_id}\nkind={kind}\nsha256={sha256}\nversion={version}\n"
    ).encode("ascii")


def _sorted_unique(values: list[int], what: str) -> None:
    if any(b <= a for a, b in itertools.pairwise(values)):
        raise ValueError(f"{what} must be sorted and without duplicates")


class BaseMessage(BaseModel):
    """Common envelope: the header's type code and request id."""

    model_config = ConfigDict(
        frozen=True,
        extra="forbid",
        ser_json_bytes="base64",
        val_json_bytes="base64",
        defer_build=True,
    )

    #: Header type code; unique per message class.
    TYPE_CODE: ClassVar[int]

    request_id: int = Field(default=0, ge=0, le=2**32 - 1, exclude=True)

    def wire_body(self, version: int) -> dict[str, Any]:
        """The JSON body of this message in a frame of protocol ``version``: a field newer
        than the version is left out (a peer of that version rejects unknown fields)."""
        return self.model_dump(mode="json")


class GuestTopology(BaseModel):
    """The guest's CPUs as its kernel sees them."""

    model_config = ConfigDict(frozen=True, extra="forbid", defer_build=True)

    online_vcpus: CpuSet
    #: SMT sibling groups among the online vCPUs (each vCPU in at most one group).
    sibling_groups: Annotated[list[CpuSet], Field(max_length=MAX_CPUS)] = []

    @model_validator(mode="after")
    def _check(self) -> Self:
        _sorted_unique(self.online_vcpus, "online_vcpus")
        if not self.online_vcpus:
            raise ValueError("a guest has at least one online vCPU")
        seen: set[int] = set()
        online = set(self.online_vcpus)
        for group in self.sibling_groups:
            _sorted_unique(group, "a sibling group")
            if not set(group) <= online:
                raise ValueError(f"sibling group {group} names vCPUs that are not online")
            if seen & set(group):
                raise ValueError("a vCPU appears in two sibling groups")
            seen |= set(group)
        return self


class Hello(BaseMessage):
    """First message of each side on every (re)connection."""

    TYPE_CODE: ClassVar[int] = 1
    type: Literal["hello"] = "hello"
    role: Literal["host", "guest"]
    protocol_versions: Annotated[
        list[Annotated[int, Field(ge=1, le=255)]], Field(min_length=1, max_length=16)
    ]
    software_version: Annotated[str, Field(max_length=64)]
    capabilities: Annotated[list[Annotated[str, Field(max_length=64)]], Field(max_length=64)] = []
    #: Required from the guest, absent from the host.
    topology: GuestTopology | None = None

    @model_validator(mode="after")
    def _check(self) -> Self:
        if (self.role == "guest") != (self.topology is not None):
            raise ValueError("a guest Hello carries its CPU topology; a host Hello does not")
        return self


class Ping(BaseMessage):
    TYPE_CODE: ClassVar[int] = 2
    type: Literal["ping"] = "ping"
    nonce: Annotated[int, Field(ge=0, le=2**63 - 1)] = 0


class Pong(BaseMessage):
    TYPE_CODE: ClassVar[int] = 3
    type: Literal["pong"] = "pong"
    nonce: Annotated[int, Field(ge=0, le=2**63 - 1)] = 0


class Error(BaseMessage):
    """A peer could not act on something it received; ``request_id`` names it when known."""

    TYPE_CODE: ClassVar[int] = 4
    type: Literal["error"] = "error"
    code: ErrorCode
    message: Annotated[str, Field(max_length=4096)]


class LoadProgram(BaseMessage):
    """Host → guest: load and attach this eBPF program, then stream its events."""

    TYPE_CODE: ClassVar[int] = 16
    type: Literal["load-program"] = "load-program"
    program_id: ProgramId
    kind: ProgramKind
    payload: Annotated[bytes, Field(max_length=MAX_PAYLOAD_BYTES)]
    #: Hex SHA-256 of ``payload``; checked on decode, so corruption is an InvalidBody.
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    #: The program's version under this id: the host's signing time in nanoseconds since the
    #: epoch. A guest refuses a version older than one it has loaded under the same id.
    version: Annotated[int, Field(ge=0, le=2**63 - 1)] = 0
    #: Ed25519 signature over :meth:`envelope` (empty when the host has no signing key).
    signature: Annotated[bytes, Field(max_length=64)] = b""

    @model_validator(mode="after")
    def _check(self) -> Self:
        if hashlib.sha256(self.payload).hexdigest() != self.sha256:
            raise ValueError("payload does not match its sha256")
        return self

    def envelope(self) -> bytes:
        """What :attr:`signature` signs (see :func:`program_envelope`)."""
        return program_envelope(self.program_id, self.kind, self.sha256, self.version)

    @classmethod
    def for_payload(
        cls,
        program_id: str,
        kind: ProgramKind,
        payload: bytes,
        signature: bytes = b"",
        request_id: int = 0,
        *,
        version: int = 0,
    ) -> LoadProgram:
        """Build a LoadProgram with the digest computed from ``payload``."""
        return cls(
            program_id=program_id,
            kind=kind,
            payload=payload,
            sha256=hashlib.sha256(payload).hexdigest(),
            version=version,
            signature=signature,
            request_id=request_id,
        )


class ProgramLoaded(BaseMessage):
    """Guest → host: the verdict on a LoadProgram (trust check, verifier, attach)."""

    TYPE_CODE: ClassVar[int] = 17
    type: Literal["program-loaded"] = "program-loaded"
    program_id: ProgramId
    ok: bool
    reason: Annotated[str, Field(max_length=4096)] = ""
    #: The kernel verifier's / loader's log on failure (tail, bounded).
    log: Annotated[str, Field(max_length=65536)] = ""

    @model_validator(mode="after")
    def _check(self) -> Self:
        if not self.ok and not self.reason:
            raise ValueError("a refused or failed load says why")
        return self


class UnloadProgram(BaseMessage):
    TYPE_CODE: ClassVar[int] = 18
    type: Literal["unload-program"] = "unload-program"
    program_id: ProgramId


EventValue = int | str | bool | Annotated[list[int], Field(max_length=MAX_CPUS)]


class ProgramEvent(BaseMessage):
    """Guest → host: one event from a loaded program, already decoded by the agent."""

    TYPE_CODE: ClassVar[int] = 19
    type: Literal["program-event"] = "program-event"
    program_id: ProgramId
    seq: Annotated[int, Field(ge=0)]
    data: Annotated[dict[Annotated[str, Field(max_length=64)], EventValue], Field(max_length=64)]


MapName = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_.]{0,63}$")]


class ProgramRecords(BaseMessage):
    """Guest → host (protocol 3): a batch of ring-buffer records of one loaded program, as
    bytes; the host's service for the program decodes them (the agent knows no layouts).

    ``first_seq`` numbers the batch's first record (the agent counts every record it takes
    from any ring buffer); ``lost`` counts the program's records the agent dropped since its
    previous batch (no host connected, or a host too slow to read them).
    """

    TYPE_CODE: ClassVar[int] = 20
    type: Literal["program-records"] = "program-records"
    program_id: ProgramId
    ringbuf: MapName
    first_seq: Annotated[int, Field(ge=0, le=2**63 - 1)]
    records: Annotated[
        list[Annotated[bytes, Field(max_length=MAX_RECORD_BYTES)]],
        Field(min_length=1, max_length=MAX_RECORDS),
    ]
    lost: Annotated[int, Field(ge=0, le=2**63 - 1)] = 0


class ReadMap(BaseMessage):
    """Host → guest (protocol 3): the entries of one map of a loaded program (a service
    resynchronises from the kernel's own table after it lost records). Answered with
    ``MapContents`` echoing the request id, or ``Error{bad-request}``."""

    TYPE_CODE: ClassVar[int] = 21
    type: Literal["read-map"] = "read-map"
    program_id: ProgramId
    map: MapName
    max_entries: Annotated[int, Field(ge=1, le=MAX_MAP_ENTRIES)] = MAX_MAP_ENTRIES


class MapEntry(BaseModel):
    model_config = ConfigDict(
        frozen=True,
        extra="forbid",
        ser_json_bytes="base64",
        val_json_bytes="base64",
        defer_build=True,
    )

    key: Annotated[bytes, Field(max_length=MAX_MAP_KEY_BYTES)]
    value: Annotated[bytes, Field(max_length=MAX_MAP_VALUE_BYTES)]


class MapContents(BaseMessage):
    """Guest → host (protocol 3): the answer to ``ReadMap`` (a snapshot: the map may change
    while it is read). ``truncated``: the map holds more than ``max_entries``."""

    TYPE_CODE: ClassVar[int] = 22
    type: Literal["map-contents"] = "map-contents"
    program_id: ProgramId
    map: MapName
    entries: Annotated[list[MapEntry], Field(max_length=MAX_MAP_ENTRIES)]
    truncated: bool = False


class GuestDocument(BaseMessage):
    """Host → guest (protocol 4): publish a service's JSON document for the guest's admins and
    applications; the agent writes it, whole and atomically, to ``<documents_dir>/NAME.json``
    (``/run/pvagent``). The agent knows no document: what it says is the service's (the
    affinity service's ``placement`` is the content of ``AffinityResult``)."""

    TYPE_CODE: ClassVar[int] = 23
    type: Literal["guest-document"] = "guest-document"
    #: The file's name without ``.json``: no path separator, no leading dot.
    name: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$")]
    #: A JSON value, as text (checked on decode).
    content: Annotated[str, Field(max_length=MAX_DOCUMENT_BYTES)]

    @model_validator(mode="after")
    def _check(self) -> Self:
        try:
            json.loads(self.content)
        except ValueError as err:
            raise ValueError(f"content is not JSON: {err}") from err
        return self


#: The first protocol version whose agents say when the guest's CPUs change
#: (``TopologyUpdate``); a side sends it only in a session of this version or newer.
TOPOLOGY_UPDATE_VERSION = 5


class TopologyUpdate(BaseMessage):
    """Guest → host (protocol 5): the guest's CPUs changed since the Hello (a vCPU hot-plugged
    and brought online, or taken offline); the whole topology, as in the Hello (idempotent).

    Not a Hello: the session stays as it is (no handshake, no program re-injection). The
    agent sends it only when what it read differs from what it last told this session."""

    TYPE_CODE: ClassVar[int] = 24
    type: Literal["topology-update"] = "topology-update"
    topology: GuestTopology


class ThreadRequest(BaseModel):
    """One live guest thread whose affinity mask is a strict subset of the online vCPUs."""

    model_config = ConfigDict(frozen=True, extra="forbid", defer_build=True)

    tid: Tid
    vcpus: CpuSet

    @model_validator(mode="after")
    def _check(self) -> Self:
        _sorted_unique(self.vcpus, "vcpus")
        if not self.vcpus:
            raise ValueError("a thread request names at least one vCPU")
        return self


class AffinityUpdate(BaseMessage):
    """Guest → host: the *whole* set of vCPUs wanted pinned now (idempotent).

    ``wanted`` is authoritative; ``threads`` explains it (bounded sample: at most
    1024 threads are listed, ``threads_omitted`` counts the rest).
    """

    TYPE_CODE: ClassVar[int] = 32
    type: Literal["affinity-update"] = "affinity-update"
    seq: Annotated[int, Field(ge=0)]
    wanted: CpuSet
    threads: Annotated[list[ThreadRequest], Field(max_length=1024)] = []
    threads_omitted: Annotated[int, Field(ge=0)] = 0

    @model_validator(mode="after")
    def _check(self) -> Self:
        _sorted_unique(self.wanted, "wanted")
        wanted = set(self.wanted)
        for thread in self.threads:
            if not set(thread.vcpus) <= wanted:
                raise ValueError(f"thread {thread.tid} requests vCPUs outside 'wanted'")
        return self


#: What a pin achieved for its pCPU: ``isolated`` (no other task may run there) or
#: ``restricted`` (the vCPU thread is confined to it, other tasks may still run there).
IsolationMode = Literal["isolated", "restricted"]
#: The first protocol version whose placements carry ``isolation``.
ISOLATION_VERSION = 4


class VcpuPlacement(BaseModel):
    """Where one wanted vCPU ended up: a physical CPU, or a refusal with its reason.

    Protocol 4: a pin also says what it achieved (``isolation``) and, when ``restricted``,
    why (``isolation_reason``); both are None from a host of an older version.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", defer_build=True)

    vcpu: Cpu
    pcpu: Cpu | None = None
    refused: Annotated[str, Field(max_length=1024)] | None = None
    isolation: IsolationMode | None = None
    isolation_reason: Annotated[str, Field(max_length=1024)] | None = None

    @model_validator(mode="after")
    def _check(self) -> Self:
        if (self.pcpu is None) == (self.refused is None):
            raise ValueError("a placement has either a pcpu or a refusal reason")
        if self.isolation is not None and self.pcpu is None:
            raise ValueError("only a placement with a pcpu has an isolation")
        if self.isolation_reason is not None and self.isolation != "restricted":
            raise ValueError("isolation_reason says why a placement is restricted")
        return self


class AffinityResult(BaseMessage):
    """Host → guest: the answer to the AffinityUpdate with the same ``seq``."""

    TYPE_CODE: ClassVar[int] = 33
    type: Literal["affinity-result"] = "affinity-result"
    seq: Annotated[int, Field(ge=0)]
    placements: Annotated[list[VcpuPlacement], Field(max_length=MAX_CPUS)]
    policy: ShortText = ""
    backend: ShortText = ""

    def wire_body(self, version: int) -> dict[str, Any]:
        body = self.model_dump(mode="json")
        if version < ISOLATION_VERSION:
            for placement in body["placements"]:
                del placement["isolation"], placement["isolation_reason"]
        return body


Message = Annotated[
    Hello
    | Ping
    | Pong
    | Error
    | LoadProgram
    | ProgramLoaded
    | UnloadProgram
    | ProgramEvent
    | ProgramRecords
    | ReadMap
    | MapContents
    | GuestDocument
    | TopologyUpdate
    | AffinityUpdate
    | AffinityResult,
    Field(discriminator="type"),
]

#: Header type code → message class.
MESSAGE_TYPES: dict[int, type[BaseMessage]] = {
    cls.TYPE_CODE: cls
    for cls in (
        Hello,
        Ping,
        Pong,
        Error,
        LoadProgram,
        ProgramLoaded,
        UnloadProgram,
        ProgramEvent,
        ProgramRecords,
        ReadMap,
        MapContents,
        GuestDocument,
        TopologyUpdate,
        AffinityUpdate,
        AffinityResult,
    )
}


def build_schemas() -> None:
    """Build every message model's validator and serializer now.

    The models defer that to their first use, so a guest agent, whose start-up under
    emulation is slow, builds only the ones it uses. A long-running peer with many VMs
    (pvhost) calls this at start, so that no frame pays for a build later, under load.
    """
    for cls in list(globals().values()):  # every model of this module, none forgotten
        if isinstance(cls, type) and issubclass(cls, BaseModel) and cls.__module__ == __name__:
            cls.model_rebuild(force=True)
