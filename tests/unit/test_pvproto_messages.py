"""Every message survives encode → decode unchanged; invalid messages are refused."""

from __future__ import annotations

import subprocess
import sys

import pydantic
import pytest
from hypothesis import given

import pvproto
from pvproto import (
    MESSAGE_TYPES,
    AffinityUpdate,
    FrameDecoder,
    GuestTopology,
    Hello,
    LoadProgram,
    ProgramLoaded,
    ThreadRequest,
    VcpuPlacement,
    VersionMismatch,
    encode,
    negotiate,
)
from tests.unit.pvproto_strategies import BY_TYPE, messages

SUBMODULES = (
    pvproto.cpulist,
    pvproto.errors,
    pvproto.framing,
    pvproto.messages,
    pvproto.ratelimit,
    pvproto.session,
    pvproto.version,
)


def test_strategies_cover_every_message_type() -> None:
    assert set(BY_TYPE) == set(MESSAGE_TYPES.values())


@pytest.mark.parametrize(
    "cls", sorted(MESSAGE_TYPES.values(), key=lambda c: c.TYPE_CODE), ids=lambda c: c.__name__
)
def test_every_message_type_round_trips(cls: type) -> None:
    @given(BY_TYPE[cls])
    def round_trip(message: pydantic.BaseModel) -> None:
        assert FrameDecoder().feed(encode(message)) == [message]  # type: ignore[arg-type]

    round_trip()


@given(messages)
def test_body_is_7bit_even_for_non_ascii_text(message: pydantic.BaseModel) -> None:
    frame = encode(message)  # type: ignore[arg-type]
    assert frame[20:].isascii()


def test_negotiation_picks_highest_common_version() -> None:
    assert negotiate([1, 2, 3], [2, 3, 4]) == 3
    with pytest.raises(VersionMismatch, match=r"this side speaks \[1\], the peer speaks \[2\]"):
        negotiate([1], [2])


@pytest.mark.parametrize(
    ("build", "why"),
    [
        (lambda: Hello(role="guest", protocol_versions=[1], software_version="x"), "topology"),
        (lambda: Hello(role="host", protocol_versions=[], software_version="x"), "at least 1"),
        (lambda: GuestTopology(online_vcpus=[1, 0]), "sorted"),
        (lambda: GuestTopology(online_vcpus=[0, 1], sibling_groups=[[0, 2]]), "not online"),
        (
            lambda: GuestTopology(online_vcpus=[0, 1, 2], sibling_groups=[[0, 1], [1, 2]]),
            "two sibling",
        ),
        (
            lambda: AffinityUpdate(seq=1, wanted=[1], threads=[ThreadRequest(tid=5, vcpus=[2])]),
            "outside",
        ),
        (lambda: AffinityUpdate(seq=1, wanted=[9000]), "less than 8192"),
        (lambda: VcpuPlacement(vcpu=1), "either a pcpu or a refusal"),
        (lambda: VcpuPlacement(vcpu=1, pcpu=2, refused="no"), "either a pcpu or a refusal"),
        (lambda: ProgramLoaded(program_id="a", ok=False), "says why"),
        (
            lambda: LoadProgram(program_id="a", kind="bpf-object", payload=b"x", sha256="0" * 64),
            "sha256",
        ),
        (lambda: LoadProgram.for_payload("../etc", "bpf-object", b"x"), "pattern"),
    ],
)
def test_invalid_messages_are_refused_with_a_reason(build: object, why: str) -> None:
    with pytest.raises(pydantic.ValidationError, match=why):
        build()  # type: ignore[operator]


def test_the_package_exports_every_submodules_names_once() -> None:
    """``from pvproto import X`` works for each public name of each submodule, and no two
    submodules export the same name (one would silently shadow the other)."""
    exported = [name for m in SUBMODULES for name in m.__all__]
    assert len(exported) == len(set(exported))
    assert sorted(pvproto.__all__) == sorted(exported)
    star: dict[str, object] = {}
    exec("from pvproto import *", star)
    for module in SUBMODULES:
        for name in module.__all__:
            assert star[name] is getattr(module, name), name


def test_importing_the_protocol_builds_no_validator() -> None:
    """Every model defers its build to its first use: the guest agent's start-up under
    emulation pays only for the messages it handles (a model built at import cost the agent
    a schema build and check at every start, ~0.3 s under TCG). A fresh interpreter, so
    that nothing built earlier in this run counts."""
    probe = (
        "import pydantic, pvproto.messages as m\n"
        "print(' '.join(n for n, c in vars(m).items() if isinstance(c, type)"
        " and issubclass(c, pydantic.BaseModel) and c.__module__ == m.__name__"
        " and c.__pydantic_complete__))"
    )
    built = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout.split()
    assert built == [], f"built at import: {built}"
