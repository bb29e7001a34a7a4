"""Framing of the peer-to-peer wire protocol: a message to bytes, and a sans-I/O frame decoder with limits.

Like h11, nothing here reads a socket or a clock: :func:`encode` turns a message (``messages``) into bytes,
and a :class:`FrameDecoder` is fed whatever bytes arrived and hands back whole messages. The daemon owns
the sockets, timeouts and TLS; tests and simulators drive the same code with plain byte strings.

Frame (all integers little-endian)::

    0   2  magic      b"GF"
    2   1  version    framing/protocol version, 1
    3   1  type       message type id
    4   4  hlen       header length (u32)
    8   8  plen       payload length (u64)
    16  hlen          header: the message's fields, struct-packed
    ..  plen          payload: a codec payload (gossipfl.protocol.codec) for delta-carrying messages, else empty

Every length is checked against :class:`Limits` as soon as the 16-byte prefix has arrived, so a frame
that would be too large is refused before its bytes are waited for or buffered. See ``docs/protocol.md``.

Public API::

    encode(message) -> bytes
    Limits(max_frame_size, max_header_size, max_payload_size, max_element_count, max_buffered)
    Limits.for_model(element_count) -> Limits
    FrameDecoder(limits).feed(data) / .feed_eof() / .next_message() -> Message | None / iteration
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final, NoReturn

from gossipfl.errors import (
    BadMessage,
    BadPayload,
    BufferFull,
    CodecError,
    FrameTooLarge,
    ProtocolError,
    TruncatedFrame,
    UnknownMessageType,
    UnsupportedVersion,
)
from gossipfl.protocol import codec
from gossipfl.protocol.messages import MAX_HEADER, MESSAGE_TYPES, MIN_HEADER, PROTOCOL_VERSION, Message

__all__ = [
    "MAGIC",
    "PREFIX_SIZE",
    "BadPayload",
    "BufferFull",
    "FrameDecoder",
    "FrameTooLarge",
    "Limits",
    "TruncatedFrame",
    "UnknownMessageType",
    "UnsupportedVersion",
    "encode",
]

MAGIC: Final = b"GF"
_PREFIX: Final = struct.Struct("<2sBBIQ")
PREFIX_SIZE: Final = _PREFIX.size  # 16


def encode(message: Message) -> bytes:
    """The frame for a message. Messages validate themselves when built, so any message encodes."""
    if not isinstance(message, Message) or type(message) not in MESSAGE_TYPES.values():
        raise TypeError(f"not a gossipfl wire message: {type(message).__name__}")
    header = message.pack_header()
    payload = message.payload_bytes()
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
        cls = MESSAGE_TYPES.get(mtype)
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
        elif not MIN_HEADER[mtype] <= hlen <= MAX_HEADER[mtype]:
            self._fail(
                BadMessage(
                    f"{name} header must be {MIN_HEADER[mtype]}..{MAX_HEADER[mtype]} bytes, "
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
        cls = MESSAGE_TYPES[prefix.type]
        message = cls.parse(header, payload)
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
        cls = MESSAGE_TYPES.get(mtype)
        return cls.__name__ if cls else f"type {mtype}"

    def _fail(self, exc: ProtocolError) -> NoReturn:
        self._error = exc
        self._buf = bytearray()
        self._prefix = None
        raise exc

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error
