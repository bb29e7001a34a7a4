"""The peer-to-peer wire protocol: message types, framing, and a sans-I/O frame decoder.

Like h11, nothing here reads a socket or a clock: :func:`encode` turns a message into bytes, and a
:class:`FrameDecoder` is fed whatever bytes arrived and hands back whole messages. The daemon owns the
sockets, timeouts and TLS; tests and simulators drive the same code with plain byte strings.

Frame (all integers little-endian)::

    0   2  magic      b"GF"
    2   1  version    framing/protocol version, 1
    3   1  type       message type id
    4   4  hlen       header length (u32)
    8   8  plen       payload length (u64)
    16  hlen          header: the message's fields, struct-packed
    ..  plen          payload: a codec payload (gossipfl.codec) for delta-carrying messages, else empty

Headers are fixed-layout ``struct`` records, not JSON: every field has one width and one encoding, the
length of the header is known from the type (or bounded, for the two with strings), and a parser cannot
meet duplicate keys, big-number precision loss or type confusion. Extending a message means a new protocol
version. Every length is checked against :class:`Limits` as soon as the 16-byte prefix has arrived, so a
frame that would be too large is refused before its bytes are waited for or buffered. See
``docs/protocol.md`` for the message fields and the reasoning.

Public API::

    Hello, ModelDelta, NeedFull, Ack, GatewayRound, GatewayUpdate, Ping, Pong, Error  (frozen dataclasses)
    encode(message) -> bytes
    Limits(max_frame_size, max_header_size, max_payload_size, max_element_count, max_buffered)
    Limits.for_model(element_count) -> Limits
    FrameDecoder(limits).feed(data) / .feed_eof() / .next_message() -> Message | None / iteration
"""

from __future__ import annotations

import dataclasses
import enum
import math
import operator
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar, Final, NoReturn, Self

from gossipfl import codec
from gossipfl.errors import CodecError, ProtocolError

__all__ = [
    "MAGIC",
    "PREFIX_SIZE",
    "PROTOCOL_VERSION",
    "Ack",
    "BadMessage",
    "BadPayload",
    "BufferFull",
    "Error",
    "ErrorCode",
    "FrameDecoder",
    "FrameTooLarge",
    "GatewayRound",
    "GatewayUpdate",
    "Hello",
    "Limits",
    "Message",
    "ModelDelta",
    "NeedFull",
    "Ping",
    "Pong",
    "PullRequest",
    "TruncatedFrame",
    "UnknownMessageType",
    "UnsupportedVersion",
    "encode",
]

MAGIC: Final = b"GF"
PROTOCOL_VERSION: Final = 1
_PREFIX: Final = struct.Struct("<2sBBIQ")
PREFIX_SIZE: Final = _PREFIX.size  # 16

U16_MAX: Final = (1 << 16) - 1
U32_MAX: Final = (1 << 32) - 1
U64_MAX: Final = (1 << 64) - 1
ID_SIZE: Final = 32  # SHA-256 of a certificate's public key; SHA-256 of a model's structure
MAX_CAPABILITIES: Final = 32
MAX_ERROR_TEXT: Final = 1024  # bytes of UTF-8
_CAPABILITY_RE: Final = re.compile(r"[a-z0-9][a-z0-9._+-]{0,31}")
_ROLES: Final = ("node", "gateway")


# ------------------------------------------------------------------------------------------------ errors


class FrameTooLarge(ProtocolError):
    """A length field exceeds the configured limits; refused before the bytes are read."""


class UnsupportedVersion(ProtocolError):
    """The peer speaks a framing version this build does not."""


class UnknownMessageType(ProtocolError):
    """The type byte names no message of this protocol version."""


class BadMessage(ProtocolError, ValueError):
    """A header that does not parse, or a field out of range. Also raised when a message is built
    with bad fields locally (hence ValueError too): an invalid message cannot be sent or received."""


class BadPayload(ProtocolError):
    """The payload of a delta-carrying message is not an acceptable codec payload."""


class TruncatedFrame(ProtocolError):
    """The stream ended in the middle of a frame."""


class BufferFull(ProtocolError):
    """More bytes were fed than the decoder may hold; the caller must drain messages between feeds."""


class ErrorCode(enum.IntEnum):
    """Codes for :class:`Error`. Unknown codes are still accepted on the wire (future versions)."""

    PROTOCOL = 1  # the peer sent something malformed
    FINGERPRINT_MISMATCH = 2  # different model structure; no parameters will be exchanged
    CODEC = 3  # a payload failed to decode (corrupt, wrong size, non-finite)
    REFUSED = 4  # policy: not on the allowlist, update norm too large, ...
    OVERLOADED = 5  # too many peers/connections; try later
    INTERNAL = 6  # the sender failed; not the receiver's fault


# ---------------------------------------------------------------------------------------------- messages


def _uint(name: str, value: object, hi: int, lo: int = 0) -> int:
    if isinstance(value, bool):
        raise BadMessage(f"{name} must be an integer, got a bool")
    try:
        v = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise BadMessage(f"{name} must be an integer, got {type(value).__name__}") from None
    if not lo <= v <= hi:
        raise BadMessage(f"{name} {v} is outside [{lo}, {hi}]")
    return v


def _nonneg_float(name: str, value: object, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadMessage(f"{name} must be a number, got {type(value).__name__}")
    v = float(value)
    if not math.isfinite(v) or v < 0 or (positive and v == 0):
        raise BadMessage(f"{name} {v!r} must be finite and {'> 0' if positive else '>= 0'}")
    return v


def _fixed_bytes(name: str, value: object, size: int) -> bytes:
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise BadMessage(f"{name} must be bytes, got {type(value).__name__}")
    b = bytes(value)
    if len(b) != size:
        raise BadMessage(f"{name} must be {size} bytes, got {len(b)}")
    return b


def _payload(name: str, value: object) -> bytes:
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise BadMessage(f"{name} must be bytes, got {type(value).__name__}")
    b = bytes(value)
    if not b:
        raise BadMessage(f"{name} is empty; a delta message carries a codec payload")
    return b


class Message:
    """Base of all messages: each subclass has a type id, packs its fields into a header and reads
    them back. Subclasses are frozen dataclasses whose ``__post_init__`` validates and normalizes every
    field, so an instance is valid whether it was built locally or parsed from the wire."""

    TYPE: ClassVar[int]
    HAS_PAYLOAD: ClassVar[bool] = False
    # exact header size for fixed-layout messages, None for the ones with strings
    HEADER_SIZE: ClassVar[int | None] = None

    def _pack_header(self) -> bytes:
        raise NotImplementedError

    def _payload_bytes(self) -> bytes:
        return b""

    @classmethod
    def _parse(cls, header: bytes, payload: bytes) -> Self:
        raise NotImplementedError

    def _set(self, name: str, value: object) -> None:
        object.__setattr__(self, name, value)


@dataclass(frozen=True)
class Hello(Message):
    """First message each way on a connection: who I am, what model, what I can do.

    ``node_id`` must match the peer certificate's key hash (checked by the daemon after TLS);
    ``model_fingerprint`` must match ours or no parameters are exchanged; ``capabilities`` are short
    lowercase tokens such as codec scheme names or ``"push-pull"``."""

    node_id: bytes
    protocol_version: int
    model_fingerprint: bytes
    role: str
    capabilities: tuple[str, ...] = ()

    TYPE: ClassVar[int] = 1
    _FIXED: ClassVar[struct.Struct] = struct.Struct(f"<{ID_SIZE}sH{ID_SIZE}sBB")

    def __post_init__(self) -> None:
        self._set("node_id", _fixed_bytes("node_id", self.node_id, ID_SIZE))
        self._set("protocol_version", _uint("protocol_version", self.protocol_version, U16_MAX, 1))
        self._set("model_fingerprint", _fixed_bytes("model_fingerprint", self.model_fingerprint, ID_SIZE))
        if self.role not in _ROLES:
            raise BadMessage(f"role {self.role!r} must be one of {_ROLES}")
        caps = self.capabilities
        if isinstance(caps, (str, bytes)) or not isinstance(caps, (tuple, list)):
            raise BadMessage(f"capabilities must be a tuple of strings, got {type(caps).__name__}")
        caps = tuple(caps)
        if len(caps) > MAX_CAPABILITIES:
            raise BadMessage(f"{len(caps)} capabilities, at most {MAX_CAPABILITIES}")
        for c in caps:
            if not isinstance(c, str) or not _CAPABILITY_RE.fullmatch(c):
                raise BadMessage(f"capability {c!r} must match {_CAPABILITY_RE.pattern}")
        if len(set(caps)) != len(caps):
            raise BadMessage("capabilities hold a duplicate")
        self._set("capabilities", caps)

    def _pack_header(self) -> bytes:
        parts = [
            self._FIXED.pack(
                self.node_id,
                self.protocol_version,
                self.model_fingerprint,
                _ROLES.index(self.role),
                len(self.capabilities),
            )
        ]
        for c in self.capabilities:
            raw = c.encode("ascii")
            parts.append(bytes([len(raw)]) + raw)
        return b"".join(parts)

    @classmethod
    def _parse(cls, header: bytes, payload: bytes) -> Self:
        if len(header) < cls._FIXED.size:
            raise BadMessage(f"Hello header of {len(header)} bytes is shorter than {cls._FIXED.size}")
        node_id, version, fingerprint, role, ncap = cls._FIXED.unpack_from(header)
        if role >= len(_ROLES):
            raise BadMessage(f"Hello role id {role} is unknown")
        pos = cls._FIXED.size
        caps = []
        for _ in range(ncap):
            if pos >= len(header):
                raise BadMessage("Hello header ends inside its capability list")
            n = header[pos]
            raw = bytes(header[pos + 1 : pos + 1 + n])
            if len(raw) != n:
                raise BadMessage("Hello header ends inside a capability")
            try:
                caps.append(raw.decode("ascii"))
            except UnicodeDecodeError:
                raise BadMessage(f"Hello capability {raw!r} is not ASCII") from None
            pos += 1 + n
        if pos != len(header):
            raise BadMessage(f"Hello header has {len(header) - pos} trailing bytes")
        return cls(node_id, version, fingerprint, _ROLES[role], tuple(caps))


@dataclass(frozen=True)
class ModelDelta(Message):
    """A gossip push: the sender's model coded as a delta against the reference with ``base_seq``
    that the receiver holds (``base_seq == 0``: against zero, i.e. the full model). ``age`` is the number
    of samples the model has learned from, the weight of the age-weighted merge; ``sample_count`` the
    samples since the previous push."""

    base_seq: int
    new_seq: int
    age: float
    sample_count: int
    payload: bytes

    TYPE: ClassVar[int] = 2
    HAS_PAYLOAD: ClassVar[bool] = True
    _S: ClassVar[struct.Struct] = struct.Struct("<QQdQ")
    HEADER_SIZE: ClassVar[int | None] = _S.size

    def __post_init__(self) -> None:
        self._set("base_seq", _uint("base_seq", self.base_seq, U64_MAX))
        self._set("new_seq", _uint("new_seq", self.new_seq, U64_MAX))
        if self.new_seq <= self.base_seq:
            raise BadMessage(f"new_seq {self.new_seq} must be greater than base_seq {self.base_seq}")
        self._set("age", _nonneg_float("age", self.age))
        self._set("sample_count", _uint("sample_count", self.sample_count, U64_MAX))
        self._set("payload", _payload("payload", self.payload))

    def _pack_header(self) -> bytes:
        return self._S.pack(self.base_seq, self.new_seq, self.age, self.sample_count)

    def _payload_bytes(self) -> bytes:
        return self.payload

    @classmethod
    def _parse(cls, header: bytes, payload: bytes) -> Self:
        return cls(*cls._S.unpack(header), payload)


@dataclass(frozen=True)
class _U64Message(Message):
    """A message whose whole header is its one field, an unsigned 64-bit integer."""

    _S: ClassVar[struct.Struct] = struct.Struct("<Q")
    HEADER_SIZE: ClassVar[int | None] = _S.size

    def __post_init__(self) -> None:
        (only,) = dataclasses.fields(self)
        self._set(only.name, _uint(only.name, getattr(self, only.name), U64_MAX))

    def _pack_header(self) -> bytes:
        (only,) = dataclasses.fields(self)
        return self._S.pack(getattr(self, only.name))

    @classmethod
    def _parse(cls, header: bytes, payload: bytes) -> Self:
        return cls(*cls._S.unpack(header))


@dataclass(frozen=True)
class NeedFull(_U64Message):
    """Reply to a delta whose base the receiver does not hold: send the full model (base 0)."""

    base_seq: int

    TYPE: ClassVar[int] = 3


@dataclass(frozen=True)
class Ack(_U64Message):
    """The receiver applied the delta that produced ``seq``: the sender may now code against it."""

    seq: int

    TYPE: ClassVar[int] = 4


@dataclass(frozen=True)
class PullRequest(_U64Message):
    """Push-pull: after its push was acknowledged, the pusher asks for the receiver's model, as a delta
    against ``base_seq``, the sequence of the reference the pusher holds of it (0: it holds none).

    The receiver answers with a ModelDelta of its model as it was *before* it merged the push, so both
    ends compute the same weighted average and the exchange keeps the cluster's mean model where it was
    (push-only gossip drifts it towards whoever pushes most), or with Error(OVERLOADED) when it is
    already sending to that peer, which is no failure: the push stands.
    """

    base_seq: int

    TYPE: ClassVar[int] = 10


@dataclass(frozen=True)
class GatewayRound(Message):
    """A FedAvg round from a gateway: the global model as a delta from global ``base_seq`` to
    ``new_seq``, its age, the seconds clients have to answer, and how many local epochs to train.
    ``epochs`` 0 asks the client only to adopt the model: the gateway sends it so after aggregating,
    so every participant ends a round holding the new global model."""

    round: int
    base_seq: int
    new_seq: int
    age: float
    deadline: float
    epochs: int
    payload: bytes

    TYPE: ClassVar[int] = 5
    HAS_PAYLOAD: ClassVar[bool] = True
    _S: ClassVar[struct.Struct] = struct.Struct("<QQQddI")
    HEADER_SIZE: ClassVar[int | None] = _S.size

    def __post_init__(self) -> None:
        self._set("round", _uint("round", self.round, U64_MAX))
        self._set("base_seq", _uint("base_seq", self.base_seq, U64_MAX))
        self._set("new_seq", _uint("new_seq", self.new_seq, U64_MAX))
        if self.new_seq <= self.base_seq:
            raise BadMessage(f"new_seq {self.new_seq} must be greater than base_seq {self.base_seq}")
        self._set("age", _nonneg_float("age", self.age))
        self._set("deadline", _nonneg_float("deadline", self.deadline, positive=True))
        self._set("epochs", _uint("epochs", self.epochs, U32_MAX))
        self._set("payload", _payload("payload", self.payload))

    def _pack_header(self) -> bytes:
        return self._S.pack(self.round, self.base_seq, self.new_seq, self.age, self.deadline, self.epochs)

    def _payload_bytes(self) -> bytes:
        return self.payload

    @classmethod
    def _parse(cls, header: bytes, payload: bytes) -> Self:
        return cls(*cls._S.unpack(header), payload)


@dataclass(frozen=True)
class GatewayUpdate(Message):
    """A client's answer to a round: its delta against global ``base_seq``, its sample count (the
    weight of the sample-weighted mean) and the age of its model after local training."""

    round: int
    base_seq: int
    sample_count: int
    age: float
    payload: bytes

    TYPE: ClassVar[int] = 6
    HAS_PAYLOAD: ClassVar[bool] = True
    _S: ClassVar[struct.Struct] = struct.Struct("<QQQd")
    HEADER_SIZE: ClassVar[int | None] = _S.size

    def __post_init__(self) -> None:
        self._set("round", _uint("round", self.round, U64_MAX))
        self._set("base_seq", _uint("base_seq", self.base_seq, U64_MAX))
        self._set("sample_count", _uint("sample_count", self.sample_count, U64_MAX))
        self._set("age", _nonneg_float("age", self.age))
        self._set("payload", _payload("payload", self.payload))

    def _pack_header(self) -> bytes:
        return self._S.pack(self.round, self.base_seq, self.sample_count, self.age)

    def _payload_bytes(self) -> bytes:
        return self.payload

    @classmethod
    def _parse(cls, header: bytes, payload: bytes) -> Self:
        return cls(*cls._S.unpack(header), payload)


@dataclass(frozen=True)
class Ping(_U64Message):
    """Liveness probe; the peer answers with a Pong carrying the same nonce."""

    nonce: int

    TYPE: ClassVar[int] = 7


@dataclass(frozen=True)
class Pong(_U64Message):
    """Answer to a Ping, with its nonce."""

    nonce: int

    TYPE: ClassVar[int] = 8


@dataclass(frozen=True)
class Error(Message):
    """Why the sender is about to close the connection or refused a message. ``text`` is for logs:
    at most 1024 bytes of UTF-8 and no control characters, so that it cannot forge log lines."""

    code: int
    text: str = ""

    TYPE: ClassVar[int] = 9
    _S: ClassVar[struct.Struct] = struct.Struct("<H")

    def __post_init__(self) -> None:
        self._set("code", _uint("code", self.code, U16_MAX))
        if not isinstance(self.text, str):
            raise BadMessage(f"text must be a str, got {type(self.text).__name__}")
        try:
            raw = self.text.encode("utf-8")
        except UnicodeEncodeError:
            raise BadMessage("text is not encodable as UTF-8 (lone surrogate)") from None
        if len(raw) > MAX_ERROR_TEXT:
            raise BadMessage(f"text is {len(raw)} bytes of UTF-8, at most {MAX_ERROR_TEXT}")
        if any(ch < " " or "\x7f" <= ch <= "\x9f" for ch in self.text):
            raise BadMessage("text holds a control character")

    def _pack_header(self) -> bytes:
        return self._S.pack(self.code) + self.text.encode("utf-8")

    @classmethod
    def _parse(cls, header: bytes, payload: bytes) -> Self:
        if len(header) < cls._S.size:
            raise BadMessage(f"Error header of {len(header)} bytes is shorter than {cls._S.size}")
        (code,) = cls._S.unpack_from(header)
        try:
            text = bytes(header[cls._S.size :]).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BadMessage(f"Error text is not valid UTF-8: {exc.reason}") from None
        return cls(code, text)


_TYPES: Final[dict[int, type[Message]]] = {
    cls.TYPE: cls
    for cls in (Hello, ModelDelta, NeedFull, Ack, GatewayRound, GatewayUpdate, Ping, Pong, Error, PullRequest)
}
# Largest header each variable-length type can have: a frame claiming more is refused from its prefix.
_MAX_HEADER: Final[dict[int, int]] = {
    Hello.TYPE: Hello._FIXED.size + MAX_CAPABILITIES * 33,
    Error.TYPE: Error._S.size + MAX_ERROR_TEXT,
}
_MIN_HEADER: Final[dict[int, int]] = {Hello.TYPE: Hello._FIXED.size, Error.TYPE: Error._S.size}


def encode(message: Message) -> bytes:
    """The frame for a message. Messages validate themselves when built, so any message encodes."""
    if not isinstance(message, Message) or type(message) not in _TYPES.values():
        raise TypeError(f"not a gossipfl wire message: {type(message).__name__}")
    header = message._pack_header()
    payload = message._payload_bytes()
    return b"".join(
        [_PREFIX.pack(MAGIC, PROTOCOL_VERSION, message.TYPE, len(header), len(payload)), header, payload]
    )


# ------------------------------------------------------------------------------------------------ limits

_DEFAULT_MAX_ELEMENTS: Final = 1 << 24


@dataclass(frozen=True)
class Limits:
    """What a decoder accepts. Defaults fit a model of up to 16.7 M parameters coded by any scheme;
    a daemon should use :meth:`for_model` with its actual model size, which tightens every bound.

    ``max_buffered`` bounds the decoder's buffer: one whole frame plus one read from the socket, as
    long as the caller drains messages after each feed."""

    max_header_size: int = 4096
    max_payload_size: int = codec.encoded_size_bound(_DEFAULT_MAX_ELEMENTS)
    max_element_count: int = _DEFAULT_MAX_ELEMENTS
    max_frame_size: int = PREFIX_SIZE + 4096 + codec.encoded_size_bound(_DEFAULT_MAX_ELEMENTS)
    max_buffered: int = PREFIX_SIZE + 4096 + codec.encoded_size_bound(_DEFAULT_MAX_ELEMENTS) + (1 << 20)

    def __post_init__(self) -> None:
        for name in (
            "max_header_size",
            "max_payload_size",
            "max_element_count",
            "max_frame_size",
            "max_buffered",
        ):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"Limits.{name} must be a non-negative integer, got {v!r}")
        if self.max_frame_size < PREFIX_SIZE:
            raise ValueError(f"Limits.max_frame_size must be at least {PREFIX_SIZE}")
        if self.max_buffered < self.max_frame_size:
            raise ValueError("Limits.max_buffered must be at least max_frame_size")

    @classmethod
    def for_model(
        cls, element_count: int, *, max_header_size: int = 4096, read_size: int = 1 << 20
    ) -> Limits:
        """Limits for peers sharing a model of ``element_count`` parameters: no legitimate payload can be
        larger than the codec's worst case for that count, so nothing larger is ever buffered."""
        payload = codec.encoded_size_bound(element_count)
        frame = PREFIX_SIZE + max_header_size + payload
        return cls(max_header_size, payload, element_count, frame, frame + read_size)


# ----------------------------------------------------------------------------------------------- decoder


@dataclass(frozen=True)
class _Prefix:
    type: int
    hlen: int
    plen: int

    @property
    def size(self) -> int:
        return PREFIX_SIZE + self.hlen + self.plen


class FrameDecoder:
    """Turns a byte stream into messages. Feed it bytes as they arrive, then take messages until
    :meth:`next_message` returns None (or iterate). A protocol error is raised once found and again on
    every later call: after a peer sent garbage there is no reliable frame boundary to resume from.

    Memory is bounded: a frame's prefix is checked against :class:`Limits` as soon as its 16 bytes are
    in, and :meth:`feed` refuses to hold more than ``limits.max_buffered`` bytes.
    """

    def __init__(self, limits: Limits | None = None) -> None:
        self.limits = limits or Limits()
        self._buf = bytearray()
        self._prefix: _Prefix | None = None
        self._error: ProtocolError | None = None
        self._eof = False

    @property
    def failed(self) -> bool:
        return self._error is not None

    @property
    def buffered(self) -> int:
        """Bytes held that are not yet part of a returned message."""
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        self._raise_if_failed()
        if self._eof:
            raise RuntimeError("feed() after feed_eof()")
        if len(self._buf) + len(data) > self.limits.max_buffered:
            self._fail(
                BufferFull(
                    f"{len(self._buf) + len(data)} bytes would be buffered, "
                    f"the limit is {self.limits.max_buffered}; "
                    "call next_message() until it returns None after each feed()"
                )
            )
        self._buf += data
        if self._prefix is None and len(self._buf) >= PREFIX_SIZE:
            self._read_prefix()

    def feed_eof(self) -> None:
        """The peer closed the stream. Raises TruncatedFrame if it did so inside a frame."""
        self._raise_if_failed()
        self._eof = True
        if self._buf and self._complete_frame_size() is None:
            self._fail(TruncatedFrame(self._truncation_text()))

    def next_message(self) -> Message | None:
        """The next whole message, or None if more bytes are needed."""
        self._raise_if_failed()
        size = self._complete_frame_size()
        if size is None:
            if self._eof and self._buf:
                self._fail(TruncatedFrame(self._truncation_text()))
            return None
        prefix = self._prefix
        assert prefix is not None
        header = bytes(self._buf[PREFIX_SIZE : PREFIX_SIZE + prefix.hlen])
        with memoryview(self._buf) as view:
            payload = bytes(view[PREFIX_SIZE + prefix.hlen : size])
        try:
            message = self._parse(prefix, header, payload)
        except ProtocolError as exc:
            self._fail(exc)
        except (struct.error, ValueError, TypeError) as exc:  # defensive: a parse bug must not escape
            self._fail(BadMessage(f"malformed {self._type_name(prefix.type)} header: {exc}"))
        del self._buf[:size]
        self._prefix = None  # the next prefix is read by the next call: this message is delivered first
        return message

    def __iter__(self) -> Iterator[Message]:
        while (message := self.next_message()) is not None:
            yield message

    # -- internals

    def _complete_frame_size(self) -> int | None:
        if self._prefix is None and len(self._buf) >= PREFIX_SIZE:
            self._read_prefix()
        if self._prefix is None:
            return None
        size = self._prefix.size
        return size if len(self._buf) >= size else None

    def _read_prefix(self) -> None:
        magic, version, mtype, hlen, plen = _PREFIX.unpack_from(self._buf)
        lim = self.limits
        if magic != MAGIC:
            self._fail(ProtocolError(f"not a gossipfl frame: magic {bytes(magic)!r}, expected {MAGIC!r}"))
        if version != PROTOCOL_VERSION:
            self._fail(
                UnsupportedVersion(
                    f"frame version {version} is not supported (this build speaks {PROTOCOL_VERSION})"
                )
            )
        cls = _TYPES.get(mtype)
        if cls is None:
            self._fail(UnknownMessageType(f"unknown message type {mtype}"))
        assert cls is not None
        name = cls.__name__
        if hlen > lim.max_header_size:
            self._fail(
                FrameTooLarge(f"{name} header of {hlen} bytes exceeds the limit {lim.max_header_size}")
            )
        if plen > lim.max_payload_size:
            self._fail(
                FrameTooLarge(f"{name} payload of {plen} bytes exceeds the limit {lim.max_payload_size}")
            )
        if PREFIX_SIZE + hlen + plen > lim.max_frame_size:
            self._fail(
                FrameTooLarge(
                    f"{name} frame of {PREFIX_SIZE + hlen + plen} bytes "
                    f"exceeds the limit {lim.max_frame_size}"
                )
            )
        if cls.HEADER_SIZE is not None:
            if hlen != cls.HEADER_SIZE:
                self._fail(
                    BadMessage(f"{name} header must be {cls.HEADER_SIZE} bytes, the frame says {hlen}")
                )
        elif not _MIN_HEADER[mtype] <= hlen <= _MAX_HEADER[mtype]:
            self._fail(
                BadMessage(
                    f"{name} header must be {_MIN_HEADER[mtype]}..{_MAX_HEADER[mtype]} bytes, "
                    f"the frame says {hlen}"
                )
            )
        if cls.HAS_PAYLOAD:
            if plen == 0:
                self._fail(BadMessage(f"{name} frame has no payload"))
        elif plen != 0:
            self._fail(BadMessage(f"{name} frame carries a {plen}-byte payload; it takes none"))
        self._prefix = _Prefix(mtype, hlen, plen)

    def _parse(self, prefix: _Prefix, header: bytes, payload: bytes) -> Message:
        cls = _TYPES[prefix.type]
        message = cls._parse(header, payload)
        if cls.HAS_PAYLOAD:
            self._check_payload(cls.__name__, payload)
        return message

    def _check_payload(self, name: str, payload: bytes) -> None:
        """Cheap refusals before the payload goes anywhere: not a codec payload, or too many elements,
        or more bytes than any coding of that many elements needs. The full check (hash, sizes, values)
        happens in ``codec.decode_delta`` with the receiver's own model size."""
        try:
            info = codec.read_header(payload)
        except CodecError as exc:
            raise BadPayload(f"{name} payload: {exc}") from exc
        if info.count > self.limits.max_element_count:
            raise BadPayload(
                f"{name} payload has {info.count} elements, the limit is {self.limits.max_element_count}"
            )
        bound = codec.encoded_size_bound(info.count)
        if len(payload) > bound:
            raise BadPayload(
                f"{name} payload of {len(payload)} bytes is larger than {info.count} elements need"
            )

    def _truncation_text(self) -> str:
        if self._prefix is None:
            return f"stream ended inside a frame prefix ({len(self._buf)} of {PREFIX_SIZE} bytes)"
        name = self._type_name(self._prefix.type)
        return f"stream ended inside a {name} frame ({len(self._buf)} of {self._prefix.size} bytes)"

    @staticmethod
    def _type_name(mtype: int) -> str:
        cls = _TYPES.get(mtype)
        return cls.__name__ if cls else f"type {mtype}"

    def _fail(self, exc: ProtocolError) -> NoReturn:
        self._error = exc
        self._buf = bytearray()
        self._prefix = None
        raise exc

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error
