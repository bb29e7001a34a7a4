"""The peer-to-peer wire protocol's messages: frozen dataclasses that validate every field, and their error codes.

A message is valid whether it was built locally or parsed from the wire: each ``__post_init__`` checks and
normalizes every field, and :class:`BadMessage` (also a ``ValueError``) refuses anything else. Framing (the
16-byte prefix, limits, the sans-I/O decoder) is in ``framing``.

Headers are fixed-layout ``struct`` records, not JSON: every field has one width and one encoding, the
length of the header is known from the type (or bounded, for the two with strings), and a parser cannot
meet duplicate keys, big-number precision loss or type confusion. Extending a message means a new protocol
version. See ``docs/protocol.md`` for the message fields and the reasoning.

Public API::

    Hello, ModelDelta, NeedFull, Ack, PullRequest, GatewayRound, GatewayUpdate, Ping, Pong, Error  (frozen dataclasses)
    ErrorCode, PROTOCOL_VERSION, MESSAGE_TYPES (type id -> class)
"""

from __future__ import annotations

import dataclasses
import enum
import math
import operator
import re
import struct
from dataclasses import dataclass
from typing import ClassVar, Final, Self

from gossipfl.errors import BadMessage

__all__ = [
    "MESSAGE_TYPES",
    "PROTOCOL_VERSION",
    "Ack",
    "BadMessage",
    "Error",
    "ErrorCode",
    "GatewayRound",
    "GatewayUpdate",
    "Hello",
    "Message",
    "ModelDelta",
    "NeedFull",
    "Ping",
    "Pong",
    "PullRequest",
]

PROTOCOL_VERSION: Final = 1

U16_MAX: Final = (1 << 16) - 1
U32_MAX: Final = (1 << 32) - 1
U64_MAX: Final = (1 << 64) - 1
ID_SIZE: Final = 32  # SHA-256 of a certificate's public key; SHA-256 of a model's structure
MAX_CAPABILITIES: Final = 32
MAX_ERROR_TEXT: Final = 1024  # bytes of UTF-8
_CAPABILITY_RE: Final = re.compile(r"[a-z0-9][a-z0-9._+-]{0,31}")
_ROLES: Final = ("node", "gateway")


class ErrorCode(enum.IntEnum):
    """Codes for :class:`Error`. Unknown codes are still accepted on the wire (future versions)."""

    PROTOCOL = 1  # the peer sent something malformed
    FINGERPRINT_MISMATCH = 2  # different model structure; no parameters will be exchanged
    CODEC = 3  # a payload failed to decode (corrupt, wrong size, non-finite)
    REFUSED = 4  # policy: not on the allowlist, update norm too large, ...
    OVERLOADED = 5  # too many peers/connections; try later
    INTERNAL = 6  # the sender failed; not the receiver's fault
    PAUSED = 7  # its operator paused the node: not a failure of the link or of the peer; try much later


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

    def pack_header(self) -> bytes:
        raise NotImplementedError

    def payload_bytes(self) -> bytes:
        return b""

    @classmethod
    def parse(cls, header: bytes, payload: bytes) -> Self:
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

    def pack_header(self) -> bytes:
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
    def parse(cls, header: bytes, payload: bytes) -> Self:
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

    def pack_header(self) -> bytes:
        return self._S.pack(self.base_seq, self.new_seq, self.age, self.sample_count)

    def payload_bytes(self) -> bytes:
        return self.payload

    @classmethod
    def parse(cls, header: bytes, payload: bytes) -> Self:
        return cls(*cls._S.unpack(header), payload)


@dataclass(frozen=True)
class _U64Message(Message):
    """A message whose whole header is its one field, an unsigned 64-bit integer."""

    _S: ClassVar[struct.Struct] = struct.Struct("<Q")
    HEADER_SIZE: ClassVar[int | None] = _S.size

    def __post_init__(self) -> None:
        (only,) = dataclasses.fields(self)
        self._set(only.name, _uint(only.name, getattr(self, only.name), U64_MAX))

    def pack_header(self) -> bytes:
        (only,) = dataclasses.fields(self)
        return self._S.pack(getattr(self, only.name))

    @classmethod
    def parse(cls, header: bytes, payload: bytes) -> Self:
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

    def pack_header(self) -> bytes:
        return self._S.pack(self.round, self.base_seq, self.new_seq, self.age, self.deadline, self.epochs)

    def payload_bytes(self) -> bytes:
        return self.payload

    @classmethod
    def parse(cls, header: bytes, payload: bytes) -> Self:
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

    def pack_header(self) -> bytes:
        return self._S.pack(self.round, self.base_seq, self.sample_count, self.age)

    def payload_bytes(self) -> bytes:
        return self.payload

    @classmethod
    def parse(cls, header: bytes, payload: bytes) -> Self:
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

    def pack_header(self) -> bytes:
        return self._S.pack(self.code) + self.text.encode("utf-8")

    @classmethod
    def parse(cls, header: bytes, payload: bytes) -> Self:
        if len(header) < cls._S.size:
            raise BadMessage(f"Error header of {len(header)} bytes is shorter than {cls._S.size}")
        (code,) = cls._S.unpack_from(header)
        try:
            text = bytes(header[cls._S.size :]).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BadMessage(f"Error text is not valid UTF-8: {exc.reason}") from None
        return cls(code, text)


MESSAGE_TYPES: Final[dict[int, type[Message]]] = {
    cls.TYPE: cls
    for cls in (Hello, ModelDelta, NeedFull, Ack, GatewayRound, GatewayUpdate, Ping, Pong, Error, PullRequest)
}
# Largest header each variable-length type can have: a frame claiming more is refused from its prefix.
MAX_HEADER: Final[dict[int, int]] = {
    Hello.TYPE: Hello._FIXED.size + MAX_CAPABILITIES * 33,
    Error.TYPE: Error._S.size + MAX_ERROR_TEXT,
}
MIN_HEADER: Final[dict[int, int]] = {Hello.TYPE: Hello._FIXED.size, Error.TYPE: Error._S.size}
