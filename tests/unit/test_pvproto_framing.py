"""The decoder never loses a good frame, never raises, never hangs, stays bounded."""

from __future__ import annotations

import json
import struct
import tracemalloc
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pvproto import (
    HEADER_SIZE,
    MAGIC,
    MAX_BODY_SIZE,
    PROTOCOL_VERSION,
    BadHeader,
    BadMagic,
    FrameDecoder,
    FrameTooLarge,
    InvalidBody,
    Ping,
    ProtocolError,
    TruncatedFrame,
    UnknownMessageType,
    UnsupportedVersion,
    encode,
)
from tests.unit.pvproto_strategies import messages


def raw_frame(
    body: bytes,
    *,
    version: int = PROTOCOL_VERSION,
    type_code: int = 2,
    flags: int = 0,
    request_id: int = 0,
    length: int | None = None,
) -> bytes:
    """A frame built by hand, to produce what ``encode`` refuses to."""
    head = struct.pack(
        "!4sBBHII",
        MAGIC,
        version,
        type_code,
        flags,
        request_id,
        len(body) if length is None else length,
    )
    return head + struct.pack("!I", zlib.crc32(head)) + body


def feed_chunks(data: bytes, cuts: list[int]) -> list[object]:
    dec = FrameDecoder()
    out: list[object] = []
    points = sorted({c % (len(data) + 1) for c in cuts})
    prev = 0
    for point in [*points, len(data)]:
        out += dec.feed(data[prev:point])
        prev = point
    return out


def only_messages(items: list[object]) -> list[object]:
    for item in items:
        assert not isinstance(item, Exception) or isinstance(item, ProtocolError), item
    return [m for m in items if not isinstance(m, ProtocolError)]


@given(st.lists(messages, min_size=1, max_size=5), st.lists(st.integers(0, 10**6), max_size=30))
def test_any_chunking_yields_the_same_messages(msgs: list[Ping], cuts: list[int]) -> None:
    stream = b"".join(encode(m) for m in msgs)
    assert feed_chunks(stream, cuts) == msgs


def test_one_byte_at_a_time() -> None:
    msgs = [Ping(nonce=i, request_id=i) for i in range(20)]
    dec = FrameDecoder()
    out: list[object] = []
    for byte in b"".join(encode(m) for m in msgs):
        out += dec.feed(bytes([byte]))
    assert out == msgs
    assert dec.buffered == 0


@settings(max_examples=300)
@given(
    st.lists(st.tuples(st.binary(max_size=200), messages), min_size=1, max_size=6),
    st.binary(max_size=50),
    st.lists(st.integers(0, 10**6), max_size=20),
)
def test_garbage_between_frames_never_costs_a_valid_frame(
    pairs: list[tuple[bytes, Ping]], tail: bytes, cuts: list[int]
) -> None:
    stream = b"".join(garbage + encode(m) for garbage, m in pairs) + tail
    out = feed_chunks(stream, cuts)
    assert only_messages(out) == [m for _, m in pairs]


@given(st.lists(messages, min_size=2, max_size=5), st.data())
def test_truncated_frames_are_reported_and_skipped(msgs: list[Ping], data: st.DataObject) -> None:
    """Cut some frames short (a sender restarting mid-write): every whole frame survives."""
    stream = b""
    whole = []
    truncated = 0
    for m in msgs:
        frame = encode(m)
        if data.draw(st.booleans()):
            stream += frame[: data.draw(st.integers(1, len(frame) - 1))]
            truncated += 1
        else:
            stream += frame
            whole.append(m)
    stream += encode(Ping(nonce=424242))  # a frame after the last cut proves resync
    out = FrameDecoder().feed(stream)
    assert only_messages(out) == [*whole, Ping(nonce=424242)]
    errors = [e for e in out if isinstance(e, ProtocolError)]
    assert all(isinstance(e, (TruncatedFrame, BadMagic)) for e in errors)
    # Adjacent cut-offs may merge into one skipped run; none goes unreported.
    assert bool(errors) == bool(truncated)


def test_truncation_is_detected_without_waiting_for_the_claimed_length() -> None:
    """A header claiming 1000 bytes, cut after 10: the next frame decodes at once."""
    out = FrameDecoder().feed(raw_frame(b"{" * 10, length=1000) + encode(Ping(nonce=1)))
    assert isinstance(out[0], TruncatedFrame)
    assert "cut after 10 of 1000" in str(out[0])
    assert out[1:] == [Ping(nonce=1)]


def test_oversized_length_is_refused_without_allocating() -> None:
    dec = FrameDecoder()
    tracemalloc.start()
    try:
        out = dec.feed(raw_frame(b"", length=2**32 - 1, request_id=9) + encode(Ping(nonce=3)))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert out[0] == FrameTooLarge(2**32 - 1, MAX_BODY_SIZE, request_id=9)
    assert "exceeds the maximum" in str(out[0])
    assert out[-1] == Ping(nonce=3)
    assert peak < 1024 * 1024


def test_encode_refuses_an_oversized_body() -> None:
    dec = FrameDecoder(max_body_size=64)
    out = dec.feed(encode(Ping(nonce=2**62)) + raw_frame(b"{}" * 40))
    assert out[0] == Ping(nonce=2**62)
    assert isinstance(out[1], FrameTooLarge)


def test_wrong_magic_is_skipped_and_reported_once() -> None:
    frame = encode(Ping(nonce=5))
    out = FrameDecoder().feed(b"XPVF" + frame[4:] + frame)
    assert out == [BadMagic(len(frame)), Ping(nonce=5)]
    assert "skipped" in str(out[0])


def test_corrupted_header_is_not_trusted() -> None:
    frame = bytearray(encode(Ping(nonce=5)))
    frame[13] ^= 0x40  # flip a bit of the length: the CRC no longer holds
    out = FrameDecoder().feed(bytes(frame) + encode(Ping(nonce=6)))
    assert only_messages(out) == [Ping(nonce=6)]
    assert isinstance(out[0], BadMagic)


@pytest.mark.parametrize(
    ("frame", "error", "text"),
    [
        (raw_frame(b'{"type":"ping"}', version=9, request_id=4), UnsupportedVersion, "version 9"),
        (raw_frame(b'{"type":"ping"}', type_code=200), UnknownMessageType, "type code 200"),
        (raw_frame(b'{"type":"ping"}', flags=1), BadHeader, "reserved header flags"),
        (raw_frame(b"{not json"), InvalidBody, "invalid Ping body"),
        (raw_frame(b'{"type":"ping","nonce":-1}'), InvalidBody, "nonce"),
        (raw_frame(b'{"type":"ping","extra":1}'), InvalidBody, "extra"),
        (raw_frame(b'{"type":"pong"}'), InvalidBody, "invalid Ping body: type: Input should be"),
        (
            raw_frame(
                json.dumps({"type": "affinity-update", "seq": 1, "wanted": [3, 1]}).encode(),
                type_code=32,
            ),
            InvalidBody,
            "sorted",
        ),
    ],
)
def test_well_framed_but_bad_frames_are_errors_then_decoding_continues(
    frame: bytes, error: type[ProtocolError], text: str
) -> None:
    out = FrameDecoder().feed(frame + encode(Ping(nonce=77)))
    assert isinstance(out[0], error), out
    assert text in str(out[0])
    assert out[1:] == [Ping(nonce=77)]


def test_request_id_of_a_bad_frame_is_kept_for_the_reply() -> None:
    out = FrameDecoder().feed(raw_frame(b"{}", version=9, request_id=1234))
    assert out[0].request_id == 1234  # type: ignore[union-attr]


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=0, max_size=4096), st.lists(st.integers(0, 4096), max_size=40))
def test_random_bytes_only_ever_yield_protocol_errors(noise: bytes, cuts: list[int]) -> None:
    for item in feed_chunks(noise, cuts):
        assert isinstance(item, ProtocolError)


def test_megabytes_of_noise_keep_memory_bounded() -> None:
    import random

    rng = random.Random(1)
    dec = FrameDecoder()
    # Noise rich in magic bytes is the worst case for the scanner.
    chunk_pool = [rng.randbytes(65536), (MAGIC + rng.randbytes(12)) * 4096, MAGIC[:3] * 20000]
    errors = 0
    for i in range(48):
        out = dec.feed(chunk_pool[i % 3])
        assert all(isinstance(e, ProtocolError) for e in out)
        errors += len(out)
        assert dec.buffered <= HEADER_SIZE + MAX_BODY_SIZE
    assert errors > 0
    assert dec.feed(encode(Ping(nonce=1)))[-1] == Ping(nonce=1)


def test_a_forged_header_claiming_a_huge_body_cannot_stall_later_frames() -> None:
    """A hostile peer sends a valid header for a 1 MiB body and never the body."""
    dec = FrameDecoder()
    assert dec.feed(raw_frame(b"", length=MAX_BODY_SIZE)) == []
    out = dec.feed(encode(Ping(nonce=8)))
    assert isinstance(out[0], TruncatedFrame)
    assert out[1:] == [Ping(nonce=8)]
