"""blosc2 chunks of a payload: compressing a section, and checking and decompressing an untrusted chunk.

Split from ``codec`` (the payload layout around the chunks). Only one-shot chunk compression and
decompression are used, through ``_blosc``; before a received chunk reaches blosc2 its sizes are checked
against what the payload header implies and its own header is read here, so that no blosc2 feature we
never produce (user-defined codecs or filters, dictionaries, lazy or uninitialized special chunks) is
ever decoded. Every refusal is a ``CodecError`` naming the section.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

import numpy as np

from gossipfl.errors import CodecError
from gossipfl.protocol import _blosc

BLOSC_OVERHEAD: Final = 32  # blosc2 falls back to a memcpy chunk: nbytes + 32 bytes at most

CODECS: Final = {
    "zstd": _blosc.ZSTD,
    "lz4": _blosc.LZ4,
    "lz4hc": _blosc.LZ4HC,
    "blosclz": _blosc.BLOSCLZ,
}
SHUFFLES: Final = ("auto", "shuffle", "bitshuffle", "none")

# What we accept inside a blosc2 chunk header (see docs/protocol.md). Anything else is refused before
# blosc2 sees the chunk: user-defined codecs/filters, dictionaries, lazy chunks, and above all the
# "uninitialized" special chunk, which would hand back whatever memory the destination held.
_BLOSC_VERSIONS: Final = frozenset({2, 3, 4, 5})
_BLOSC_FILTERS: Final = frozenset({0, 1, 2})  # none, shuffle, bitshuffle
# flags bits 5-7 (compressor format) -> codec ids allowed in the codec byte
_BLOSC_FORMATS: Final = {0: {0}, 1: {1, 2}, 4: {5}}  # blosclz, lz4/lz4hc, zstd
_BLOSC_CODECS: Final = frozenset({0, 1, 2, 5})
_BLOSC2_FLAGS_OK: Final = frozenset({0x00, 0x10})  # nothing special, or a run of zeros


@dataclass(frozen=True)
class Section:
    name: str
    dtype: np.dtype
    count: int

    @property
    def nbytes(self) -> int:
        return self.count * self.dtype.itemsize


def compress(arr: np.ndarray, cparams: dict[str, int], chunk_bytes: int, shuffle: str) -> list[bytes]:
    """Split one section into blosc2 chunks: one chunk holds at most ~2 GiB, and smaller
    chunks bound the memory a single call needs."""
    size = arr.itemsize
    if shuffle == "auto":
        filt = _blosc.SHUFFLE if size > 1 else _blosc.NOFILTER
    else:
        filt = {
            "shuffle": _blosc.SHUFFLE,
            "bitshuffle": _blosc.BITSHUFFLE,
            "none": _blosc.NOFILTER,
        }[shuffle]
    raw = memoryview(arr.view(np.uint8))
    backend = _blosc.BACKEND
    return [
        backend.compress(raw[i : i + chunk_bytes], typesize=size, filt=filt, **cparams)
        for i in range(0, len(raw), chunk_bytes)
    ]


def decompress_chunk(chunk: memoryview, dst: np.ndarray, sec: Section, nthreads: int) -> None:
    nbytes = dst.size
    where = f"{sec.name} chunk"
    if len(chunk) < 32:
        raise CodecError(f"{where}: {len(chunk)} bytes is shorter than a blosc2 header (32)")
    if len(chunk) > nbytes + BLOSC_OVERHEAD:
        raise CodecError(f"{where}: {len(chunk)} bytes for {nbytes} bytes of data is more than blosc2 makes")
    try:
        c_nbytes, c_cbytes, _ = _blosc.BACKEND.cbuffer_sizes(chunk)
    except (ValueError, RuntimeError, TypeError) as exc:
        raise CodecError(f"{where}: blosc2 header unreadable: {exc}") from exc
    if c_nbytes != nbytes:
        raise CodecError(f"{where}: blosc2 header says {c_nbytes} bytes uncompressed, expected {nbytes}")
    if c_cbytes != len(chunk):
        raise CodecError(
            f"{where}: blosc2 header says {c_cbytes} bytes compressed, the chunk has {len(chunk)}"
        )
    _check_blosc_header(chunk, sec, where)
    try:
        _blosc.BACKEND.decompress_into(chunk, dst, nthreads)
    except (ValueError, RuntimeError, TypeError) as exc:
        raise CodecError(f"{where}: blosc2 could not decompress it: {exc}") from exc


def _check_blosc_header(chunk: memoryview, sec: Section, where: str) -> None:
    """Refuse any blosc2 feature we never produce before the chunk reaches blosc2's decoder."""
    version, _versionlz, flags, typesize, c_nbytes, blocksize, _cb = struct.unpack_from("<BBBBiii", chunk)
    if version not in _BLOSC_VERSIONS:
        raise CodecError(f"{where}: blosc2 format version {version} is not accepted")
    if flags & 0x05 != 0x05:
        raise CodecError(f"{where}: blosc2 chunk without the extended header (flags {flags:#04x})")
    if flags & 0x08:
        raise CodecError(f"{where}: blosc2 delta flag is set (flags {flags:#04x})")
    if typesize != sec.dtype.itemsize:
        raise CodecError(f"{where}: blosc2 typesize {typesize}, expected {sec.dtype.itemsize}")
    if not 0 < blocksize <= c_nbytes:
        raise CodecError(f"{where}: blosc2 block size {blocksize} for {c_nbytes} bytes")
    filters = bytes(chunk[16:22])
    codec_id, codec_meta = chunk[22], chunk[23]
    filters_meta = bytes(chunk[24:30])
    reserved, b2flags = chunk[30], chunk[31]
    if any(f not in _BLOSC_FILTERS for f in filters) or any(filters_meta):
        raise CodecError(
            f"{where}: blosc2 filter pipeline {filters.hex()} (meta {filters_meta.hex()}) is not accepted"
        )
    # A memcpyed chunk (flags bit 1) stores raw bytes and leaves the format bits at 0.
    allowed = _BLOSC_CODECS if flags & 0x02 else _BLOSC_FORMATS.get(flags >> 5)
    if allowed is None or codec_id not in allowed:
        raise CodecError(f"{where}: blosc2 codec {codec_id} (format {flags >> 5}) is not accepted")
    if codec_meta != 0:
        raise CodecError(f"{where}: blosc2 codec metadata {codec_meta} is not accepted")
    if reserved != 0 or b2flags not in _BLOSC2_FLAGS_OK:
        raise CodecError(f"{where}: blosc2 flags {b2flags:#04x} (reserved byte {reserved}) are not accepted")
