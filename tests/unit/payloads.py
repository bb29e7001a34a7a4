"""Tampering with codec payloads in tests: re-signing, rewriting header fields, finding the blosc2 chunks."""

from __future__ import annotations

import hashlib
import struct

from gossipfl.protocol import codec
from gossipfl.protocol.codec import read_header


def resign(buf: bytes | bytearray) -> bytes:
    """Recompute the digest of a tampered payload, to reach the checks that come after the hash."""
    body = bytes(buf[: -codec.DIGEST_SIZE])
    return body + hashlib.sha256(body).digest()[: codec.DIGEST_SIZE]


def set_header(buf: bytes, **fields: int) -> bytes:
    """Rewrite fields of the fixed header (and re-sign)."""
    names = ("magic", "version", "scheme", "dtype", "chunk_log2", "count", "k", "block", "reserved")
    values = dict(zip(names, codec._HEADER.unpack_from(buf), strict=True))
    values.update(fields)
    head = codec._HEADER.pack(*(values[n] for n in names))
    return resign(head + buf[codec.HEADER_SIZE :])


def chunk_offsets(buf: bytes) -> list[tuple[int, int]]:
    """(offset, size) of every blosc2 chunk in a payload, from its table."""
    header = read_header(buf)
    n = sum(-(-s.nbytes // header.chunk_bytes) for s in header.sections())
    sizes = struct.unpack_from(f"<{n}I", buf, codec.HEADER_SIZE)
    pos = codec.HEADER_SIZE + 4 * n
    out = []
    for s in sizes:
        out.append((pos, s))
        pos += s
    return out
