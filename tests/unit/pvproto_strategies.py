"""Hypothesis strategies producing valid messages of every type."""

from __future__ import annotations

import json

from hypothesis import strategies as st

from pvproto import (
    AffinityResult,
    AffinityUpdate,
    Error,
    GuestDocument,
    GuestTopology,
    Hello,
    LoadProgram,
    MapContents,
    MapEntry,
    Ping,
    Pong,
    ProgramEvent,
    ProgramLoaded,
    ProgramRecords,
    ReadMap,
    ThreadRequest,
    TopologyUpdate,
    UnloadProgram,
    VcpuPlacement,
)

request_ids = st.integers(0, 2**32 - 1)
program_ids = st.from_regex(r"[a-z0-9][a-z0-9._-]{0,20}", fullmatch=True)
text = st.text(max_size=40)  # includes non-ASCII: bodies must still be 7-bit on the wire
cpus = st.integers(0, 255)
cpu_sets = st.sets(cpus, max_size=12).map(sorted)


@st.composite
def topologies(draw: st.DrawFn) -> GuestTopology:
    online = draw(st.sets(cpus, min_size=1, max_size=16).map(sorted))
    pairs = [online[i : i + 2] for i in range(0, len(online) - 1, 2)]
    return GuestTopology(online_vcpus=online, sibling_groups=draw(st.sampled_from([[], pairs])))


@st.composite
def affinity_updates(draw: st.DrawFn) -> AffinityUpdate:
    threads = draw(
        st.lists(
            st.builds(ThreadRequest, tid=st.integers(1, 2**22), vcpus=cpu_sets.filter(bool)),
            max_size=5,
        )
    )
    wanted = sorted({c for t in threads for c in t.vcpus} | set(draw(cpu_sets)))
    return AffinityUpdate(
        seq=draw(st.integers(0, 2**40)),
        wanted=wanted,
        threads=threads,
        request_id=draw(request_ids),
    )


placements = st.one_of(
    st.builds(VcpuPlacement, vcpu=cpus, pcpu=cpus),
    st.builds(VcpuPlacement, vcpu=cpus, refused=text.filter(bool)),
)

#: One strategy per message class, so tests can prove every type is covered.
BY_TYPE: dict[type, st.SearchStrategy[object]] = {
    Hello: st.one_of(
        st.builds(
            Hello,
            role=st.just("host"),
            protocol_versions=st.lists(st.integers(1, 255), min_size=1, max_size=4),
            software_version=st.text(max_size=10),
            capabilities=st.lists(st.text(max_size=10), max_size=3),
            request_id=request_ids,
        ),
        st.builds(
            Hello,
            role=st.just("guest"),
            protocol_versions=st.just([1]),
            software_version=st.just("0.1.0"),
            topology=topologies(),
            request_id=request_ids,
        ),
    ),
    Ping: st.builds(Ping, nonce=st.integers(0, 2**63 - 1), request_id=request_ids),
    Pong: st.builds(Pong, nonce=st.integers(0, 2**63 - 1), request_id=request_ids),
    Error: st.builds(
        Error,
        code=st.sampled_from(["bad-frame", "bad-request", "internal"]),
        message=text,
        request_id=request_ids,
    ),
    LoadProgram: st.builds(
        LoadProgram.for_payload,
        program_id=program_ids,
        kind=st.sampled_from(["bpf-object", "bcc-source"]),
        payload=st.binary(max_size=300),
        signature=st.binary(min_size=64, max_size=64),
        request_id=request_ids,
    ),
    ProgramLoaded: st.one_of(
        st.builds(ProgramLoaded, program_id=program_ids, ok=st.just(True), request_id=request_ids),
        st.builds(
            ProgramLoaded,
            program_id=program_ids,
            ok=st.just(False),
            reason=text.filter(bool),
            log=text,
            request_id=request_ids,
        ),
    ),
    UnloadProgram: st.builds(UnloadProgram, program_id=program_ids, request_id=request_ids),
    ProgramEvent: st.builds(
        ProgramEvent,
        program_id=program_ids,
        seq=st.integers(0, 2**40),
        data=st.dictionaries(
            st.text(max_size=8),
            st.one_of(st.integers(-5, 5), text, st.booleans(), cpu_sets),
            max_size=4,
        ),
        request_id=request_ids,
    ),
    ProgramRecords: st.builds(
        ProgramRecords,
        program_id=program_ids,
        ringbuf=st.from_regex(r"[a-z_][a-z0-9_]{0,12}", fullmatch=True),
        first_seq=st.integers(0, 2**40),
        records=st.lists(st.binary(max_size=64), min_size=1, max_size=5),
        lost=st.integers(0, 2**20),
        request_id=request_ids,
    ),
    ReadMap: st.builds(
        ReadMap,
        program_id=program_ids,
        map=st.from_regex(r"[a-z_][a-z0-9_]{0,12}", fullmatch=True),
        max_entries=st.integers(1, 1024),
        request_id=request_ids,
    ),
    MapContents: st.builds(
        MapContents,
        program_id=program_ids,
        map=st.from_regex(r"[a-z_][a-z0-9_]{0,12}", fullmatch=True),
        entries=st.lists(
            st.builds(MapEntry, key=st.binary(max_size=16), value=st.binary(max_size=16)),
            max_size=4,
        ),
        truncated=st.booleans(),
        request_id=request_ids,
    ),
    GuestDocument: st.builds(
        GuestDocument,
        name=st.from_regex(r"[a-z0-9][a-z0-9_-]{0,20}", fullmatch=True),
        content=st.recursive(
            st.none() | st.booleans() | st.integers() | st.text(max_size=8),
            lambda inner: (
                st.lists(inner, max_size=3)
                | st.dictionaries(st.text(max_size=5), inner, max_size=3)
            ),
            max_leaves=8,
        ).map(json.dumps),
        request_id=request_ids,
    ),
    TopologyUpdate: st.builds(TopologyUpdate, topology=topologies(), request_id=request_ids),
    AffinityUpdate: affinity_updates(),
    AffinityResult: st.builds(
        AffinityResult,
        seq=st.integers(0, 2**40),
        placements=st.lists(placements, max_size=4),
        policy=st.sampled_from(["identity", "pool", "ht-aware"]),
        request_id=request_ids,
    ),
}

messages = st.one_of(*BY_TYPE.values())
