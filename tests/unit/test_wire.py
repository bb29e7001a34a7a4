"""Tests of gossipfl.protocol.messages and framing: every message round-trips through any split of the byte
stream, and every malformed or oversized frame is refused with a typed error, as early as the bytes allow."""

from __future__ import annotations

import itertools
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gossipfl.errors import (
    BadMessage,
    BadPayload,
    BufferFull,
    FrameTooLarge,
    ProtocolError,
    TruncatedFrame,
    UnknownMessageType,
    UnsupportedVersion,
)
from gossipfl.protocol import codec
from gossipfl.protocol.codec import CodecConfig, encode_delta
from gossipfl.protocol.framing import (
    PREFIX_SIZE,
    FrameDecoder,
    Limits,
    encode,
)
from gossipfl.protocol.messages import (
    PROTOCOL_VERSION,
    Ack,
    Error,
    ErrorCode,
    GatewayRound,
    GatewayUpdate,
    Hello,
    Message,
    ModelDelta,
    NeedFull,
    Ping,
    Pong,
    PullRequest,
)

U64 = (1 << 64) - 1
SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ------------------------------------------------------------------------------------------ strategies


@st.composite
def codec_payloads(draw: st.DrawFn) -> bytes:
    n = draw(st.integers(0, 2000))
    seed = draw(st.integers(0, 2**32 - 1))
    scheme = draw(st.sampled_from(["float32", "float16", "int8", "topk"]))
    x = np.random.default_rng(seed).normal(0, 1, n).astype(np.float32)
    return encode_delta(x, CodecConfig(scheme=scheme, int8_block=64))


@st.composite
def seq_pairs(draw: st.DrawFn) -> tuple[int, int]:
    base = draw(st.one_of(st.just(0), st.integers(0, U64 - 1)))
    new = draw(st.integers(base + 1, U64))
    return base, new


u64 = st.one_of(st.sampled_from([0, 1, U64]), st.integers(0, U64))
nonneg = st.floats(min_value=0, allow_nan=False, allow_infinity=False)
positive = st.floats(min_value=0, exclude_min=True, allow_nan=False, allow_infinity=False)
ids = st.binary(min_size=32, max_size=32)
capabilities = st.lists(
    st.from_regex(r"[a-z0-9][a-z0-9._+-]{0,31}", fullmatch=True), max_size=32, unique=True
).map(tuple)
error_text = st.text(st.characters(blacklist_categories=("Cc", "Cs")), max_size=300).filter(
    lambda s: len(s.encode("utf-8")) <= 1024
)

hellos = st.builds(
    Hello, ids, st.integers(1, 0xFFFF), ids, st.sampled_from(["node", "gateway"]), capabilities
)
deltas = st.builds(
    lambda seqs, age, n, p: ModelDelta(seqs[0], seqs[1], age, n, p),
    seq_pairs(),
    nonneg,
    u64,
    codec_payloads(),
)
rounds = st.builds(
    lambda r, seqs, age, dl, ep, p: GatewayRound(r, seqs[0], seqs[1], age, dl, ep, p),
    u64,
    seq_pairs(),
    nonneg,
    positive,
    st.integers(0, 2**32 - 1),
    codec_payloads(),
)
updates = st.builds(GatewayUpdate, u64, u64, u64, nonneg, codec_payloads())
messages = st.one_of(
    hellos,
    deltas,
    st.builds(NeedFull, u64),
    st.builds(Ack, u64),
    rounds,
    updates,
    st.builds(Ping, u64),
    st.builds(Pong, u64),
    st.builds(PullRequest, u64),
    st.builds(Error, st.integers(0, 0xFFFF), error_text),
)


def decode_all(data: bytes, splits: list[int] | None = None, limits: Limits | None = None) -> list[Message]:
    dec = FrameDecoder(limits)
    out: list[Message] = []
    cuts = sorted({0, len(data), *(s % (len(data) + 1) for s in (splits or []))})
    for a, b in itertools.pairwise(cuts):
        dec.feed(data[a:b])
        out.extend(dec)
    dec.feed_eof()
    assert dec.buffered == 0
    return out


# ----------------------------------------------------------------------------------------- round trips


@SETTINGS
@given(message=messages)
def test_every_message_round_trips(message: Message) -> None:
    frame = encode(message)
    (back,) = decode_all(frame)
    assert back == message
    assert type(back) is type(message)
    assert encode(back) == frame  # one encoding per message


@SETTINGS
@given(batch=st.lists(messages, min_size=1, max_size=6), splits=st.lists(st.integers(0, 10**9), max_size=40))
def test_random_splits_give_the_same_messages(batch: list[Message], splits: list[int]) -> None:
    data = b"".join(encode(m) for m in batch)
    assert decode_all(data, splits) == batch


@settings(max_examples=25, deadline=None)
@given(batch=st.lists(messages, min_size=1, max_size=4))
def test_one_byte_at_a_time_gives_the_same_messages(batch: list[Message]) -> None:
    data = b"".join(encode(m) for m in batch)
    dec = FrameDecoder()
    out: list[Message] = []
    for i in range(len(data)):
        dec.feed(data[i : i + 1])
        out.extend(dec)
        assert dec.buffered <= max(len(encode(m)) for m in batch)
    dec.feed_eof()
    assert out == batch


def test_frame_layout_is_as_documented() -> None:
    frame = encode(Ack(0x0102030405060708))
    assert frame[:2] == b"GF"
    assert frame[2] == PROTOCOL_VERSION == 1
    assert frame[3] == Ack.TYPE
    assert struct.unpack_from("<IQ", frame, 4) == (8, 0)
    assert frame[16:] == bytes.fromhex("0807060504030201")
    payload = encode_delta(np.ones(10, np.float32))
    frame = encode(ModelDelta(0, 1, 2.5, 3, payload))
    assert struct.unpack_from("<IQ", frame, 4) == (32, len(payload))
    assert struct.unpack_from("<QQdQ", frame, 16) == (0, 1, 2.5, 3)
    assert frame[48:] == payload


def test_ping_and_pong_are_distinct_types() -> None:
    assert Ping(5) != Pong(5)
    assert not isinstance(Pong(5), Ping)
    assert decode_all(encode(Pong(5))) == [Pong(5)]


# ----------------------------------------------------------------------------------- field validation

GOOD_ID = bytes(32)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: Hello(b"short", 1, GOOD_ID, "node"), "node_id must be 32 bytes"),
        (lambda: Hello("x" * 32, 1, GOOD_ID, "node"), "node_id must be bytes"),
        (lambda: Hello(GOOD_ID, 0, GOOD_ID, "node"), "protocol_version 0"),
        (lambda: Hello(GOOD_ID, 1 << 16, GOOD_ID, "node"), "protocol_version"),
        (lambda: Hello(GOOD_ID, 1, GOOD_ID[:31], "node"), "model_fingerprint"),
        (lambda: Hello(GOOD_ID, 1, GOOD_ID, "server"), "role"),
        (lambda: Hello(GOOD_ID, 1, GOOD_ID, "node", ("Upper",)), "capability"),
        (lambda: Hello(GOOD_ID, 1, GOOD_ID, "node", ("a" * 33,)), "capability"),
        (lambda: Hello(GOOD_ID, 1, GOOD_ID, "node", ("int8", "int8")), "duplicate"),
        (lambda: Hello(GOOD_ID, 1, GOOD_ID, "node", tuple(f"c{i}" for i in range(33))), "33 capabilities"),
        (lambda: Hello(GOOD_ID, 1, GOOD_ID, "node", "int8"), "tuple"),
        (lambda: ModelDelta(0, 0, 1.0, 1, b"x"), "greater than base_seq"),
        (lambda: ModelDelta(5, 4, 1.0, 1, b"x"), "greater than base_seq"),
        (lambda: ModelDelta(0, 1 << 64, 1.0, 1, b"x"), "new_seq"),
        (lambda: ModelDelta(-1, 1, 1.0, 1, b"x"), "base_seq -1"),
        (lambda: ModelDelta(0, 1, float("nan"), 1, b"x"), "age"),
        (lambda: ModelDelta(0, 1, float("inf"), 1, b"x"), "age"),
        (lambda: ModelDelta(0, 1, -1.0, 1, b"x"), "age"),
        (lambda: ModelDelta(0, 1, True, 1, b"x"), "age must be a number"),
        (lambda: ModelDelta(0, 1, 1.0, 1.5, b"x"), "sample_count must be an integer"),
        (lambda: ModelDelta(0, 1, 1.0, True, b"x"), "bool"),
        (lambda: ModelDelta(0, 1, 1.0, 1, b""), "empty"),
        (lambda: ModelDelta(0, 1, 1.0, 1, "text"), "payload must be bytes"),
        (lambda: GatewayRound(1, 0, 1, 0.0, 0.0, 1, b"x"), "deadline"),
        (lambda: GatewayRound(1, 0, 1, -1.0, 5.0, 1, b"x"), "age"),
        (lambda: GatewayRound(1, 0, 1, 0.0, 5.0, -1, b"x"), "epochs"),
        (lambda: GatewayRound(1, 0, 1, 0.0, 5.0, 1 << 32, b"x"), "epochs"),
        (lambda: GatewayUpdate(1, 0, -5, 0.0, b"x"), "sample_count"),
        (lambda: GatewayUpdate(1, 0, 5, float("nan"), b"x"), "age"),
        (lambda: NeedFull(1 << 64), "base_seq"),
        (lambda: Ack(-1), "seq"),
        (lambda: Ping(None), "nonce"),
        (lambda: Error(1 << 16, "x"), "code"),
        (lambda: Error(1, "line\nforged"), "control character"),
        (lambda: Error(1, "\x9b[31m"), "control character"),
        (lambda: Error(1, "é" * 513), "1026 bytes"),
        (lambda: Error(1, "\ud800"), "surrogate"),
        (lambda: Error(1, b"bytes"), "str"),
    ],
)
def test_invalid_fields_are_refused_when_building(build, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(BadMessage, match=message) as info:
        build()
    assert isinstance(info.value, ProtocolError) and isinstance(info.value, ValueError)


def test_fields_are_normalized() -> None:
    m = ModelDelta(np.uint64(3), np.int64(4), 7, np.int32(2), bytearray(b"p"))
    assert (m.base_seq, m.new_seq, m.age, m.sample_count, m.payload) == (3, 4, 7.0, 2, b"p")
    assert type(m.base_seq) is int and type(m.age) is float and type(m.payload) is bytes
    h = Hello(bytearray(32), 1, memoryview(bytes(32)), "gateway", ["int8", "push-pull"])
    assert h.capabilities == ("int8", "push-pull") and type(h.node_id) is bytes
    assert Error(ErrorCode.CODEC, "x").code == 3


def test_encode_refuses_non_messages() -> None:
    with pytest.raises(TypeError):
        encode("hello")  # type: ignore[arg-type]


# -------------------------------------------------------------------------------------- decoder refusals


def prefix(mtype: int, hlen: int, plen: int, *, magic: bytes = b"GF", version: int = 1) -> bytes:
    return struct.pack("<2sBBIQ", magic, version, mtype, hlen, plen)


def refuse(data: bytes, exc: type[ProtocolError], match: str, limits: Limits | None = None) -> FrameDecoder:
    dec = FrameDecoder(limits)
    with pytest.raises(exc, match=match):
        dec.feed(data)
        list(dec)
        dec.feed_eof()
    return dec


def test_oversized_lengths_are_refused_from_the_prefix_alone() -> None:
    limits = Limits.for_model(1000)
    # only the 16 prefix bytes are fed: the refusal does not wait for the body
    refuse(prefix(ModelDelta.TYPE, 32, limits.max_payload_size + 1), FrameTooLarge, "payload", limits)
    refuse(prefix(ModelDelta.TYPE, 32, U64), FrameTooLarge, "payload", limits)
    refuse(prefix(Hello.TYPE, 2**32 - 1, 0), FrameTooLarge, "header", limits)
    small = Limits(
        max_header_size=100, max_payload_size=1000, max_element_count=10, max_frame_size=500, max_buffered=600
    )
    refuse(prefix(ModelDelta.TYPE, 32, 900), FrameTooLarge, "frame of 948 bytes", small)


def test_prefix_problems_are_named() -> None:
    refuse(prefix(1, 0, 0, magic=b"HT"), ProtocolError, "magic")
    refuse(b"GET / HTTP/1.1\r\n\r\n", ProtocolError, "magic")
    refuse(prefix(1, 0, 0, version=2), UnsupportedVersion, "version 2")
    refuse(prefix(0, 0, 0), UnknownMessageType, "type 0")
    refuse(prefix(200, 0, 0), UnknownMessageType, "type 200")
    refuse(prefix(Ack.TYPE, 7, 0), BadMessage, "Ack header must be 8 bytes")
    refuse(prefix(Ack.TYPE, 8, 1), BadMessage, "takes none")
    refuse(prefix(ModelDelta.TYPE, 32, 0), BadMessage, "no payload")
    refuse(prefix(Hello.TYPE, 10, 0), BadMessage, "Hello header must be")
    refuse(prefix(Error.TYPE, 1, 0), BadMessage, "Error header must be")
    refuse(prefix(Error.TYPE, 2000, 0), BadMessage, "Error header must be")


def good_frame(message: Message) -> bytearray:
    return bytearray(encode(message))


def test_header_contents_are_checked() -> None:
    payload = encode_delta(np.ones(10, np.float32))
    f = good_frame(ModelDelta(1, 2, 1.0, 1, payload))
    struct.pack_into("<Q", f, 24, 1)  # new_seq == base_seq
    refuse(bytes(f), BadMessage, "greater than base_seq")
    f = good_frame(ModelDelta(1, 2, 1.0, 1, payload))
    struct.pack_into("<d", f, 32, float("nan"))
    refuse(bytes(f), BadMessage, "age")
    f = good_frame(GatewayRound(1, 1, 2, 10.0, 5.0, 1, payload))
    struct.pack_into("<d", f, 48, float("-inf"))  # prefix 16 + round, base, new 24 + age 8
    refuse(bytes(f), BadMessage, "deadline")

    hello = good_frame(Hello(GOOD_ID, 1, GOOD_ID, "node", ("int8",)))
    bad = bytearray(hello)
    bad[16 + 66] = 7  # role id
    refuse(bytes(bad), BadMessage, "role id 7")
    bad = bytearray(hello)
    bad[16 + 67] = 2  # two capabilities announced, one present
    refuse(bytes(bad), BadMessage, "capability")
    bad = bytearray(hello)
    bad[16 + 69] = 0xFF  # non-ASCII capability
    refuse(bytes(bad), BadMessage, "ASCII")
    extra = prefix(Hello.TYPE, len(hello) - 16 + 1, 0) + bytes(hello[16:]) + b"\0"
    refuse(extra, BadMessage, "trailing")

    err = good_frame(Error(1, "ok"))
    err[-1] = 0xFF
    refuse(bytes(err), BadMessage, "UTF-8")
    refuse(prefix(Error.TYPE, 3, 0) + b"\x01\x00\x00", BadMessage, "control")


def test_delta_payloads_are_peeked_against_the_limits() -> None:
    payload = encode_delta(np.ones(2000, np.float32), CodecConfig(scheme="float32"))
    refuse(
        encode(ModelDelta(0, 1, 1.0, 1, b"not a codec payload at all, but long enough......")),
        BadPayload,
        "ModelDelta payload: not a gossipfl delta payload",
    )
    refuse(
        encode(GatewayUpdate(0, 1, 1, 0.0, payload)),
        BadPayload,
        "2000 elements, the limit is 1000",
        Limits.for_model(1000),
    )
    # a payload far larger than its element count can need
    tiny = encode_delta(np.ones(1, np.float32))
    padded = tiny[: codec.HEADER_SIZE] + b"\0" * 10_000 + tiny[codec.HEADER_SIZE :]
    refuse(encode(ModelDelta(0, 1, 1.0, 1, padded)), BadPayload, "larger than 1 elements need")
    (msg,) = decode_all(encode(ModelDelta(0, 1, 1.0, 1, payload)), limits=Limits.for_model(2000))
    assert codec.decode_delta(msg.payload, 2000).sum() == 2000


def test_decoder_stays_failed() -> None:
    dec = FrameDecoder()
    dec.feed(encode(Ping(1)) + prefix(99, 0, 0))
    assert dec.next_message() == Ping(1)  # the good frame before the bad one is delivered
    with pytest.raises(UnknownMessageType):
        dec.next_message()
    assert dec.failed and dec.buffered == 0
    for action in (lambda: dec.feed(encode(Ping(2))), dec.next_message, dec.feed_eof):
        with pytest.raises(UnknownMessageType):
            action()


def test_truncated_stream_is_reported_at_eof() -> None:
    frame = encode(Hello(GOOD_ID, 1, GOOD_ID, "node"))
    for cut in (1, 15, 16, len(frame) - 1):
        dec = FrameDecoder()
        dec.feed(frame[:cut])
        assert dec.next_message() is None
        with pytest.raises(TruncatedFrame, match="stream ended inside"):
            dec.feed_eof()
    dec = FrameDecoder()
    dec.feed(encode(Ack(1)) + frame[:20])
    dec.feed_eof()  # a whole frame is still waiting: not an error yet
    assert dec.next_message() == Ack(1)
    with pytest.raises(TruncatedFrame):
        dec.next_message()


def test_buffer_is_bounded() -> None:
    limits = Limits.for_model(100, read_size=4096)
    dec = FrameDecoder(limits)
    frames = encode(Ping(1)) * 100
    dec.feed(frames)
    assert len(list(dec)) == 100 and dec.buffered == 0
    with pytest.raises(BufferFull, match="limit"):
        dec.feed(b"\0" * (limits.max_buffered + 1))
    # a caller that never drains hits the limit instead of growing without bound
    dec = FrameDecoder(limits)
    with pytest.raises(BufferFull):
        for _ in range(10_000):
            dec.feed(encode(Ping(1)))
    assert dec.buffered == 0


def test_limits_are_validated_and_derived() -> None:
    with pytest.raises(ValueError, match="max_header_size"):
        Limits(max_header_size=-1)
    with pytest.raises(ValueError, match="max_buffered"):
        Limits(max_frame_size=100, max_buffered=99)
    lim = Limits.for_model(10_000)
    assert lim.max_element_count == 10_000
    assert lim.max_payload_size == codec.encoded_size_bound(10_000)
    assert lim.max_frame_size == PREFIX_SIZE + lim.max_header_size + lim.max_payload_size
    # the largest legitimate messages fit the limits
    x = np.random.default_rng(0).normal(0, 1, 10_000).astype(np.float32)
    big = encode_delta(
        x, CodecConfig(scheme="topk", topk_fraction=1.0, topk_values="float16", chunk_bytes=4096)
    )
    hello = Hello(GOOD_ID, 1, GOOD_ID, "node", tuple(f"{i:02d}" + "x" * 30 for i in range(32)))
    err = Error(1, "é" * 512)
    assert decode_all(encode(GatewayUpdate(1, 1, 1, 2.0, big)) + encode(hello) + encode(err), limits=lim) == [
        GatewayUpdate(1, 1, 1, 2.0, big),
        hello,
        err,
    ]
