"""Coding of model deltas for the wire: lossy schemes, blosc2 compression, a hash, error feedback.

Peers swap the *difference* between a model and a reference that both ends hold, so what is sent is
small and compressible, and lossy coding is safe: with error feedback (CHOCO-Gossip) the sender moves its
copy of the reference by exactly what the receiver decodes, so whatever one message loses is carried by a
later one instead of being lost for good.

Every payload is untrusted on the receiving side, even from an authenticated peer (a buggy or compromised
device, a corrupted buffer), so decoding is written as a validator first and a decoder second:

* only one-shot chunk compression and decompression are used (C-Blosc2's ``blosc2_compress_ctx`` and
  ``blosc2_decompress_ctx``, as python-blosc2's ``compress2``/``decompress2`` call them; see
  ``gossipfl/_blosc.py``); frames, the pickle-based ``pack``/``unpack`` family and ``unpack_tensor``
  (which trusts a dtype and a shape stored in the frame) are never used;
* a SHA-256 digest (truncated to 16 bytes) of the whole payload is checked before any field is used,
  because blosc2 chunks carry no checksum and most flipped bytes decode silently to wrong numbers;
* every size is derived from the header *and* from the element count the caller expects, and checked
  against ``blosc2_cbuffer_sizes`` and against our own reading of each blosc2 chunk header before
  anything is allocated or decompressed; decompression writes into preallocated arrays;
* the decoded vector must be finite; every failure raises :class:`~gossipfl.errors.CodecError` naming
  the problem.

The payload layout and the reasons behind each choice are in ``docs/protocol.md``. Public API::

    CodecConfig(scheme="int8", topk_fraction=0.01, topk_values="int8", int8_block=32768,
                blosc_codec="zstd", shuffle="auto", clevel=1, nthreads=2, chunk_bytes=1 << 26)
    encode_delta(delta, config=CodecConfig()) -> bytes
    decode_delta(buf, expected_count, *, max_count=DEFAULT_MAX_COUNT, nthreads=2) -> np.ndarray
    read_header(buf) -> PayloadHeader          # cheap peek, no hash check, nothing allocated
    encoded_size_bound(count) -> int           # largest payload any config can make for count values
    Reference(count) / .encode_towards(x, config) / .apply(payload) / .reset() / .copy()
"""

from __future__ import annotations

import hashlib
import hmac
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar, Final

import numpy as np

from gossipfl import _blosc
from gossipfl.errors import CodecError, ConfigError

__all__ = [
    "CODEC_VERSION",
    "DEFAULT_MAX_COUNT",
    "CodecConfig",
    "PayloadHeader",
    "Reference",
    "decode_delta",
    "encode_delta",
    "encoded_size_bound",
    "read_header",
]

CODEC_VERSION: Final = 1
MAGIC: Final = b"GFLD"

#: Default ceiling on the element count a decoder accepts (1 GiB of float32), whatever the caller
#: expects: a wrong expected count from a caller should not turn into a multi-gigabyte allocation.
DEFAULT_MAX_COUNT: Final = 1 << 28

# magic, version, scheme, value dtype, chunk size as log2, element count, kept entries, int8 block size,
# reserved (must be 0)
_HEADER: Final = struct.Struct("<4sBBBBQQII")
HEADER_SIZE: Final = _HEADER.size  # 32
DIGEST_SIZE: Final = 16
_TABLE_ENTRY: Final = 4  # u32 compressed size of each blosc2 chunk

_CHUNK_LOG2_MIN: Final = 12  # 4 KiB: smaller chunks only add overhead and table entries
_CHUNK_LOG2_MAX: Final = 30  # 1 GiB: blosc2 chunks are limited to just under 2 GiB
_BLOCK_MIN: Final = 64  # keeps the scale overhead of int8 at most 1/16 of the values
_BLOCK_MAX: Final = 1 << 24
_TOPK_MAX_COUNT: Final = 1 << 32  # gaps are u32, so indices must fit in u32

_BLOSC_OVERHEAD: Final = 32  # blosc2 falls back to a memcpy chunk: nbytes + 32 bytes at most
_TILE: Final = 1 << 16  # elements per step of the tiled numpy loops (256 KiB of float32 fits in L2)

_F32_MAX: Final = float(np.finfo(np.float32).max)
# Largest int8 scale for which 127 * scale is still finite in float32, so decoded values cannot overflow.
_SCALE_MAX: Final = np.float32(_F32_MAX / 127.0)
with np.errstate(over="ignore"):
    while not np.isfinite(np.float32(127.0) * _SCALE_MAX):  # pragma: no cover - depends on rounding
        _SCALE_MAX = np.nextafter(_SCALE_MAX, np.float32(0))
# Blocks whose largest magnitude is below this are sent as zeros: their scale would be a subnormal
# float32, whose reciprocal overflows. The error is below 1.5e-36, far below anything a model can use.
_TINY_AMAX: Final = np.float32(127.0) * np.float32(np.finfo(np.float32).tiny)

_SCHEMES: Final = {"float32": 1, "float16": 2, "int8": 3, "topk": 4}
_SCHEME_NAMES: Final = {v: k for k, v in _SCHEMES.items()}
_DTYPES: Final = {"float32": 1, "float16": 2, "int8": 3}
_DTYPE_NAMES: Final = {v: k for k, v in _DTYPES.items()}
# Which value dtypes each scheme may carry; anything else in a header is refused.
_SCHEME_DTYPES: Final = {
    "float32": ("float32",),
    "float16": ("float16",),
    "int8": ("int8",),
    "topk": ("int8", "float16"),
}

_CODECS: Final = {
    "zstd": _blosc.ZSTD,
    "lz4": _blosc.LZ4,
    "lz4hc": _blosc.LZ4HC,
    "blosclz": _blosc.BLOSCLZ,
}
_SHUFFLES: Final = ("auto", "shuffle", "bitshuffle", "none")

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
class CodecConfig:
    """How the sender codes a delta. The receiver needs none of this: payloads describe themselves.

    Defaults are the measured best on deltas drawn from N(0, 1e-3) on a 2-core machine (see
    ``bench/codec.py`` and docs/protocol.md): ZSTD at level 1 compresses these barely-compressible
    numbers as well as level 9 at 10-100x the speed; byte shuffle beats bitshuffle for float16/float32
    and for u32 gaps, and does nothing for 1-byte values (``auto`` picks per section).

    ``int8_block`` trades size against fidelity: a larger block has a larger max-abs and so a coarser step.
    On Gaussian deltas block 256 gives 4.2x, 32768 gives 4.56x (the 4.5x goal). Models whose layers
    have very different scales should use smaller blocks (a layer with tiny updates that shares a block
    with a layer with large ones is quantized to zero and only moves through error feedback).
    """

    scheme: str = "int8"
    topk_fraction: float = 0.01
    topk_values: str = "int8"
    int8_block: int = 1 << 15
    blosc_codec: str = "zstd"
    shuffle: str = "auto"
    clevel: int = 1
    nthreads: int = 2
    chunk_bytes: int = 1 << 26

    def __post_init__(self) -> None:
        if self.scheme not in _SCHEMES:
            raise ConfigError(f"codec scheme {self.scheme!r} is not one of {sorted(_SCHEMES)}")
        frac = self.topk_fraction
        if not isinstance(frac, (int, float, np.floating)) or isinstance(frac, bool) or not 0.0 < frac <= 1.0:
            raise ConfigError(f"codec topk_fraction {frac!r} must be a number in (0, 1]")
        if self.topk_values not in _SCHEME_DTYPES["topk"]:
            raise ConfigError(f"codec topk_values {self.topk_values!r} must be 'int8' or 'float16'")
        if not _is_pow2_in(self.int8_block, _BLOCK_MIN, _BLOCK_MAX):
            raise ConfigError(
                f"codec int8_block {self.int8_block!r} must be a power of two in [{_BLOCK_MIN}, {_BLOCK_MAX}]"
            )
        if self.blosc_codec not in _CODECS:
            raise ConfigError(f"codec blosc_codec {self.blosc_codec!r} is not one of {sorted(_CODECS)}")
        if self.shuffle not in _SHUFFLES:
            raise ConfigError(f"codec shuffle {self.shuffle!r} is not one of {list(_SHUFFLES)}")
        if not _is_int(self.clevel) or not 0 <= self.clevel <= 9:
            raise ConfigError(f"codec clevel {self.clevel!r} must be an integer in [0, 9]")
        if not _is_int(self.nthreads) or not 1 <= self.nthreads <= 256:
            raise ConfigError(f"codec nthreads {self.nthreads!r} must be an integer in [1, 256]")
        if not _is_pow2_in(self.chunk_bytes, 1 << _CHUNK_LOG2_MIN, 1 << _CHUNK_LOG2_MAX):
            raise ConfigError(
                f"codec chunk_bytes {self.chunk_bytes!r} must be a power of two in "
                f"[{1 << _CHUNK_LOG2_MIN}, {1 << _CHUNK_LOG2_MAX}]"
            )
        # numpy scalars from a config loader become plain Python numbers
        for name in ("int8_block", "clevel", "nthreads", "chunk_bytes"):
            object.__setattr__(self, name, int(getattr(self, name)))
        object.__setattr__(self, "topk_fraction", float(frac))


@dataclass(frozen=True)
class PayloadHeader:
    """The fixed header of a payload, as read (and range-checked) from its first 32 bytes.

    ``k`` is the number of kept entries of a ``topk`` payload (0 for dense schemes); ``block`` the int8
    block size where values are int8 (0 otherwise).
    """

    scheme: str
    value_dtype: str
    count: int
    k: int
    block: int
    chunk_bytes: int

    def sections(self) -> list[_Section]:
        """The arrays the body holds, in order. Sizes follow from the header alone, which is what lets
        the decoder check every length before allocating anything."""
        n, k, b = self.count, self.k, self.block
        if self.scheme == "float32":
            return [_Section("values", np.dtype(np.float32), n)]
        if self.scheme == "float16":
            return [_Section("values", np.dtype(np.float16), n)]
        if self.scheme == "int8":
            return [_Section("scales", np.dtype(np.float32), _ceil_div(n, b)), _Section("values", _I8, n)]
        if self.value_dtype == "int8":
            return [
                _Section("gaps", np.dtype(np.uint32), k),
                _Section("scales", np.dtype(np.float32), _ceil_div(k, b)),
                _Section("values", _I8, k),
            ]
        return [_Section("gaps", np.dtype(np.uint32), k), _Section("values", np.dtype(np.float16), k)]


@dataclass(frozen=True)
class _Section:
    name: str
    dtype: np.dtype
    count: int

    @property
    def nbytes(self) -> int:
        return self.count * self.dtype.itemsize


_I8: Final = np.dtype(np.int8)


# --------------------------------------------------------------------------------------------- encoding


def encode_delta(delta: np.ndarray, config: CodecConfig | None = None) -> bytes:
    """Code a delta for the wire.

    Refuses non-finite values (``CodecError``): a NaN in a delta means training diverged, and sending it
    would only make every peer refuse it. Wrong dtype or shape is a programming error (TypeError/ValueError).
    """
    return _encode(delta, config or CodecConfig())[0]


def _encode(delta: np.ndarray, config: CodecConfig) -> tuple[bytes, PayloadHeader, list[np.ndarray]]:
    _check_vector(delta, "delta")
    n = int(delta.size)
    if config.scheme == "topk" and n > _TOPK_MAX_COUNT:
        raise CodecError(f"topk can code at most {_TOPK_MAX_COUNT} elements, got {n}")
    if not _all_finite(delta):
        bad = int(np.flatnonzero(~np.isfinite(delta))[0])
        raise CodecError(
            f"delta holds a non-finite value at index {bad} ({float(delta[bad])!r}); refusing to send it"
        )

    scheme = config.scheme
    k = 0
    block = 0
    arrays: list[np.ndarray]
    if scheme == "float32":
        value_dtype = "float32"
        arrays = [delta]
    elif scheme == "float16":
        value_dtype = "float16"
        arrays = [_to_float16(delta)]
    elif scheme == "int8":
        value_dtype = "int8"
        block = config.int8_block
        arrays = list(_quantize_int8(delta, block))
    else:
        value_dtype = config.topk_values
        k = _topk_count(n, config.topk_fraction)
        idx = _topk_indices(delta, k)
        gaps = np.empty(k, np.uint32)
        if k:
            gaps[0] = idx[0]
            np.subtract(idx[1:], idx[:-1], out=gaps[1:], casting="unsafe")
        kept = delta[idx]
        if value_dtype == "int8":
            block = config.int8_block
            arrays = [gaps, *_quantize_int8(kept, block)]
        else:
            arrays = [gaps, _to_float16(kept)]

    header = PayloadHeader(scheme, value_dtype, n, k, block, config.chunk_bytes)
    cparams = _cparams(config)
    chunks: list[bytes] = []
    for arr in arrays:
        chunks.extend(_compress(arr, cparams, config.chunk_bytes, config.shuffle))
    head = _HEADER.pack(
        MAGIC,
        CODEC_VERSION,
        _SCHEMES[scheme],
        _DTYPES[value_dtype],
        config.chunk_bytes.bit_length() - 1,
        n,
        k,
        block,
        0,
    )
    table = struct.pack(f"<{len(chunks)}I", *(len(c) for c in chunks))
    hasher = hashlib.sha256(head)
    hasher.update(table)
    for c in chunks:
        hasher.update(c)
    payload = b"".join([head, table, *chunks, hasher.digest()[:DIGEST_SIZE]])
    return payload, header, arrays


def _cparams(config: CodecConfig) -> dict[str, int]:
    return {"codec": _CODECS[config.blosc_codec], "clevel": config.clevel, "nthreads": config.nthreads}


def _compress(arr: np.ndarray, cparams: dict[str, int], chunk_bytes: int, shuffle: str) -> list[bytes]:
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


def _topk_count(n: int, fraction: float) -> int:
    if n == 0:
        return 0
    return min(n, max(1, math.floor(fraction * n + 0.5)))


def _topk_indices(x: np.ndarray, k: int) -> np.ndarray:
    """Sorted indices of the k entries of largest magnitude (ties broken arbitrarily but identically
    for a given input, which is all error feedback needs)."""
    n = x.size
    if k == 0:
        return np.empty(0, np.int64)
    if k == n:
        return np.arange(n, dtype=np.int64)
    idx = np.argpartition(np.abs(x), n - k)[n - k :]
    idx.sort()
    return idx


def _block_scales(x: np.ndarray, block: int) -> np.ndarray:
    """One float32 scale per block = max |x| / 127, from two row reductions (no full-size temporary)."""
    n = x.size
    nfull = n // block
    parts = []
    if nfull:
        rows = x[: nfull * block].reshape(nfull, block)
        parts.append(np.maximum(rows.max(axis=1), -rows.min(axis=1)))
    if n % block:
        tail = x[nfull * block :]
        parts.append(np.array([max(tail.max(), -tail.min())], np.float32))
    amax = np.concatenate(parts) if parts else np.empty(0, np.float32)
    scales = (amax.astype(np.float64) / 127.0).astype(np.float32)
    scales[amax < _TINY_AMAX] = 0
    np.minimum(scales, _SCALE_MAX, out=scales)
    return scales


def _quantize_int8(x: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Block-wise int8: q = round(x / scale), |x - q * scale| <= scale / 2 (plus float32 rounding).

    Runs in tiles of _TILE elements so that the float temporaries stay in cache: a fresh 4 MB temporary
    per pass costs more in page faults than the arithmetic itself."""
    n = x.size
    scales = _block_scales(x, block)
    divisor = np.where(scales > 0, scales, np.float32(1)).astype(np.float32)
    q = np.empty(n, np.int8)
    buf = np.empty(min(n, _TILE), np.float32)
    for start in range(0, n, _TILE):
        stop = min(n, start + _TILE)
        m = stop - start
        t = buf[:m]
        _per_block(np.divide, x[start:stop], divisor, block, start, t)
        np.rint(t, out=t)
        np.clip(t, -127, 127, out=t)
        np.copyto(q[start:stop], t, casting="unsafe")
    return scales, q


def _dequantize_int8(scales: np.ndarray, q: np.ndarray, block: int) -> np.ndarray:
    """The reconstruction both ends compute, bit for bit: float32(q) * scale."""
    n = q.size
    out = np.empty(n, np.float32)
    for start in range(0, n, _TILE):
        stop = min(n, start + _TILE)
        t = out[start:stop]
        np.copyto(t, q[start:stop], casting="unsafe")
        _per_block(np.multiply, t, scales, block, start, t)
    return out


def _per_block(
    op: Callable[..., object], a: np.ndarray, per_block: np.ndarray, block: int, start: int, out: np.ndarray
) -> None:
    """out = op(a, per_block[block of each element]) for a tile a = x[start:start+len(a)].

    Blocks and tiles are both powers of two, so a tile is either inside one block or made of whole
    blocks plus, at the very end of the vector, one partial block."""
    m = a.size
    if block >= _TILE:
        op(a, per_block[start // block], out=out)
        return
    b0 = start // block
    nfull = m // block
    if nfull:
        op(
            a[: nfull * block].reshape(nfull, block),
            per_block[b0 : b0 + nfull, None],
            out=out[: nfull * block].reshape(nfull, block),
        )
    if m % block:
        op(a[nfull * block :], per_block[b0 + nfull], out=out[nfull * block :])


_F16_MAX_BITS: Final = np.uint32(0x477FE000)  # 65504.0f, the largest finite float16
_F16_MIN_NORMAL_BITS: Final = np.uint32(0x38800000)  # 2**-14 as float32 bits
_F16_BIAS_RNE: Final = np.uint32(0xC8000FFF)  # ((15 - 127) << 23) + 0xFFF, modulo 2**32
_HALF_BITS: Final = np.uint32(0x3F000000)  # 0.5f: aligns subnormal float16 mantissas by addition


def _to_float16(x: np.ndarray) -> np.ndarray:
    """float32 -> float16, round to nearest even, saturating at +-65504 instead of overflowing to Inf.

    numpy's own cast runs about 6 ms per million values here; this integer formulation (F. Giesen's
    float_to_half_fast3_rtne) runs in cache-sized tiles and is several times faster. It has been checked
    against numpy's cast over every finite float32 of magnitude <= 65504. Saturation rather than Inf keeps
    the payload finite; with error feedback the clipped excess is sent in later messages.
    """
    n = x.size
    out = np.empty(n, np.uint16)
    t = min(n, _TILE)
    a = np.empty(t, np.uint32)
    r = np.empty(t, np.uint32)
    s = np.empty(t, np.uint32)
    small = np.empty(t, np.bool_)
    u_all = x.view(np.uint32)
    for start in range(0, n, _TILE):
        stop = min(n, start + _TILE)
        m = stop - start
        u, av, rv, sv, sm = u_all[start:stop], a[:m], r[:m], s[:m], small[:m]
        np.bitwise_and(u, np.uint32(0x7FFFFFFF), out=av)
        np.minimum(av, _F16_MAX_BITS, out=av)
        np.less(av, _F16_MIN_NORMAL_BITS, out=sm)
        # normal results: rebias the exponent and round the 13 dropped bits to nearest even
        np.right_shift(av, 13, out=rv)
        np.bitwise_and(rv, 1, out=rv)
        np.add(rv, av, out=rv)
        np.add(rv, _F16_BIAS_RNE, out=rv)
        np.right_shift(rv, 13, out=rv)
        # subnormal results: float addition of 0.5 rounds the mantissa into place
        np.add(av.view(np.float32), np.float32(0.5), out=sv.view(np.float32))
        np.subtract(sv, _HALF_BITS, out=sv)
        np.copyto(rv, sv, where=sm)
        # sign
        np.right_shift(u, 16, out=sv)
        np.bitwise_and(sv, 0x8000, out=sv)
        np.bitwise_or(rv, sv, out=rv)
        np.copyto(out[start:stop], rv, casting="unsafe")
    return out.view(np.float16)


def _from_float16(h: np.ndarray) -> np.ndarray:
    """float16 -> float32, exact for every finite float16 (Inf/NaN are refused before this is called).

    The float16 bits shifted into a float32's place and multiplied by 2**112 give the exact value for
    normal and subnormal inputs alike; in tiles this is several times faster than numpy's cast."""
    n = h.size
    out = np.empty(n, np.float32)
    bits = h.view(np.uint16)
    t = np.empty(min(n, _TILE), np.uint32)
    o_bits = out.view(np.uint32)
    for start in range(0, n, _TILE):
        stop = min(n, start + _TILE)
        hb, tv, ov = bits[start:stop], t[: stop - start], o_bits[start:stop]
        np.bitwise_and(hb, np.uint16(0x7FFF), out=tv, casting="unsafe")
        np.left_shift(tv, 13, out=tv)
        np.multiply(tv.view(np.float32), np.float32(2.0**112), out=out[start:stop])
        np.bitwise_and(hb, np.uint16(0x8000), out=tv, casting="unsafe")
        np.left_shift(tv, 16, out=tv)
        np.bitwise_or(ov, tv, out=ov)
    return out


# --------------------------------------------------------------------------------------------- decoding


def read_header(buf: bytes | bytearray | memoryview) -> PayloadHeader:
    """Read and range-check the fixed header, without checking the hash or touching the body.

    For cheap early refusals (the wire layer refuses an element count above its limit before the
    message goes anywhere). Everything it checks, :func:`decode_delta` checks again."""
    mv = _bytes_view(buf)
    if len(mv) < HEADER_SIZE + DIGEST_SIZE:
        raise CodecError(
            f"payload too short: {len(mv)} bytes, a delta payload has at least {HEADER_SIZE + DIGEST_SIZE}"
        )
    return _parse_header(mv)


def _parse_header(mv: memoryview) -> PayloadHeader:
    magic, version, scheme_id, dtype_id, chunk_log2, count, k, block, reserved = _HEADER.unpack_from(mv)
    if magic != MAGIC:
        raise CodecError(f"not a gossipfl delta payload: magic {bytes(magic)!r}, expected {MAGIC!r}")
    if version != CODEC_VERSION:
        raise CodecError(f"unsupported codec version {version} (this build reads version {CODEC_VERSION})")
    if reserved != 0:
        raise CodecError(f"reserved header field is {reserved}, must be 0")
    scheme = _SCHEME_NAMES.get(scheme_id)
    if scheme is None:
        raise CodecError(f"unknown codec scheme id {scheme_id}")
    value_dtype = _DTYPE_NAMES.get(dtype_id)
    if value_dtype not in _SCHEME_DTYPES[scheme]:
        raise CodecError(f"value dtype id {dtype_id} is not allowed for scheme {scheme}")
    if not _CHUNK_LOG2_MIN <= chunk_log2 <= _CHUNK_LOG2_MAX:
        raise CodecError(
            f"chunk size 2**{chunk_log2} is outside [2**{_CHUNK_LOG2_MIN}, 2**{_CHUNK_LOG2_MAX}]"
        )
    if scheme == "topk":
        if count > _TOPK_MAX_COUNT:
            raise CodecError(f"topk payload claims {count} elements, more than {_TOPK_MAX_COUNT}")
        if not (k <= count and (k >= 1 or count == 0)):
            raise CodecError(f"topk payload keeps {k} entries of {count}; must be in [1, {count}]")
    elif k != 0:
        raise CodecError(f"{scheme} payload has a kept-entry count ({k}); only topk has one")
    if value_dtype == "int8":
        if not _is_pow2_in(block, _BLOCK_MIN, _BLOCK_MAX):
            raise CodecError(f"int8 block size {block} is not a power of two in [{_BLOCK_MIN}, {_BLOCK_MAX}]")
    elif block != 0:
        raise CodecError(f"{scheme}/{value_dtype} payload has an int8 block size ({block}); must be 0")
    return PayloadHeader(scheme, value_dtype, count, k, block, 1 << chunk_log2)


def decode_delta(
    buf: bytes | bytearray | memoryview,
    expected_count: int,
    *,
    max_count: int = DEFAULT_MAX_COUNT,
    nthreads: int = 2,
) -> np.ndarray:
    """Check and decode a payload into a new float32 vector of ``expected_count`` elements.

    ``expected_count`` is the caller's own model size, never a number from the payload: a payload for
    another model, or one that claims a huge count, is refused before anything is allocated. Raises
    ``CodecError`` for anything wrong with the payload; bad arguments raise ``ValueError``.
    """
    return _decode(buf, expected_count, max_count, nthreads)[0]


def _decode(
    buf: bytes | bytearray | memoryview, expected_count: int, max_count: int, nthreads: int
) -> tuple[np.ndarray, PayloadHeader]:
    if not _is_int(expected_count) or expected_count < 0:
        raise ValueError(f"expected_count must be a non-negative integer, got {expected_count!r}")
    if not _is_int(max_count) or max_count < 0:
        raise ValueError(f"max_count must be a non-negative integer, got {max_count!r}")
    expected_count, max_count = int(expected_count), int(max_count)
    if expected_count > max_count:
        raise ValueError(f"expected_count {expected_count} is above max_count {max_count}")
    mv = _bytes_view(buf)
    total = len(mv)
    if total < HEADER_SIZE + DIGEST_SIZE:
        raise CodecError(
            f"payload too short: {total} bytes, a delta payload has at least {HEADER_SIZE + DIGEST_SIZE}"
        )
    magic, version = struct.unpack_from("<4sB", mv)
    if magic != MAGIC:
        raise CodecError(f"not a gossipfl delta payload: magic {bytes(magic)!r}, expected {MAGIC!r}")
    if version != CODEC_VERSION:
        raise CodecError(f"unsupported codec version {version} (this build reads version {CODEC_VERSION})")
    digest = hashlib.sha256(mv[: total - DIGEST_SIZE]).digest()[:DIGEST_SIZE]
    if not hmac.compare_digest(digest, mv[total - DIGEST_SIZE :]):
        raise CodecError("payload hash mismatch: the payload was corrupted or truncated")

    header = _parse_header(mv)
    if header.count != expected_count:
        raise CodecError(f"payload has {header.count} elements, the model has {expected_count}")

    sections = header.sections()
    cb = header.chunk_bytes
    nchunks = [_ceil_div(s.nbytes, cb) for s in sections]
    ntable = sum(nchunks)
    body_start = HEADER_SIZE + _TABLE_ENTRY * ntable
    if body_start + DIGEST_SIZE > total:
        raise CodecError(
            f"payload too short for its chunk table: {total} bytes, table needs {ntable} entries"
        )
    sizes = struct.unpack_from(f"<{ntable}I", mv, HEADER_SIZE)
    if body_start + sum(sizes) + DIGEST_SIZE != total:
        raise CodecError(
            f"chunk sizes add up to {sum(sizes)} bytes "
            f"but the payload holds {total - body_start - DIGEST_SIZE}"
        )

    # Everything is consistent: allocate exactly what the header and the expected count imply.
    arrays: list[np.ndarray] = []
    pos = body_start
    it = iter(sizes)
    for sec, nch in zip(sections, nchunks, strict=True):
        arr = np.empty(sec.count, sec.dtype)
        raw = arr.view(np.uint8)
        for i in range(nch):
            csize = next(it)
            lo = i * cb
            hi = min(sec.nbytes, lo + cb)
            _decompress_chunk(mv[pos : pos + csize], raw[lo:hi], sec, nthreads)
            pos += csize
        arrays.append(arr)
    _check_sections(header, arrays)
    return _reconstruct(header, arrays), header


def _decompress_chunk(chunk: memoryview, dst: np.ndarray, sec: _Section, nthreads: int) -> None:
    nbytes = dst.size
    where = f"{sec.name} chunk"
    if len(chunk) < 32:
        raise CodecError(f"{where}: {len(chunk)} bytes is shorter than a blosc2 header (32)")
    if len(chunk) > nbytes + _BLOSC_OVERHEAD:
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


def _check_blosc_header(chunk: memoryview, sec: _Section, where: str) -> None:
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


def _check_sections(header: PayloadHeader, arrays: list[np.ndarray]) -> None:
    """Content checks that blosc2 cannot make: finite values, ranges, index order."""
    by_name = {}
    for sec, arr in zip(header.sections(), arrays, strict=True):
        by_name[sec.name] = arr
    scales = by_name.get("scales")
    if scales is not None and scales.size:
        # NaN fails both comparisons; the upper bound makes 127 * scale finite.
        ok = (scales >= 0) & (scales <= _SCALE_MAX)
        if not ok.all():
            bad = int(np.flatnonzero(~ok)[0])
            raise CodecError(
                f"int8 scale {float(scales[bad])!r} of block {bad} is negative, non-finite or too large"
            )
    values = by_name["values"]
    if values.dtype == _I8:
        if values.size and values.min() < -127:
            raise CodecError("int8 value -128 is outside the coded range [-127, 127]")
    elif values.dtype == np.float16:
        bits = values.view(np.uint16)
        nonfinite = (bits & np.uint16(0x7C00)) == np.uint16(0x7C00)
        if nonfinite.any():
            raise CodecError(f"float16 value at position {int(np.flatnonzero(nonfinite)[0])} is Inf or NaN")
    gaps = by_name.get("gaps")
    if gaps is not None and gaps.size:
        if gaps.size > 1 and gaps[1:].min() == 0:
            raise CodecError("topk indices are not strictly increasing (a gap of 0)")
        last = int(gaps.sum(dtype=np.uint64))
        if last >= header.count:
            raise CodecError(f"topk index {last} is out of range for {header.count} elements")


def _reconstruct(header: PayloadHeader, arrays: list[np.ndarray]) -> np.ndarray:
    """The dense float32 delta a payload stands for. The sender calls this on the arrays it compressed
    and the receiver on the arrays it decompressed, which is what keeps both references bit-identical."""
    if header.scheme == "float32":
        out = arrays[0]
        if not _all_finite(out):
            bad = int(np.flatnonzero(~np.isfinite(out))[0])
            raise CodecError(f"float32 value at position {bad} is Inf or NaN")
        return out
    if header.scheme == "float16":
        return _from_float16(arrays[0])
    if header.scheme == "int8":
        return _dequantize_int8(arrays[0], arrays[1], header.block)
    gaps = arrays[0]
    if header.value_dtype == "int8":
        kept = _dequantize_int8(arrays[1], arrays[2], header.block)
    else:
        kept = _from_float16(arrays[1])
    out = np.zeros(header.count, np.float32)
    if gaps.size:
        out[np.cumsum(gaps, dtype=np.int64)] = kept
    return out


# ------------------------------------------------------------------------------------- error feedback


@dataclass(eq=False)
class Reference:
    """The public copy of a vector that a sender and its receiver both hold, with a sequence number.

    The sender calls :meth:`encode_towards` with its current vector; the receiver calls :meth:`apply` with
    the payload. Both add the very same float32 array (the sender computes it from the arrays it
    compressed, through the same function the receiver's decoder ends with), so the two references stay
    bit-identical and the sender's error ``x - values`` is what the next message carries: lossy coding
    delays information, it does not drop it (CHOCO-Gossip, Koloskova et al. 2019).

    ``seq`` counts applied payloads by default; callers that number messages themselves (the gossip layer's
    base/new sequence numbers) pass ``new_seq``. A reference at seq 0 is all zeros, which is what a delta
    with ``base_seq == 0`` (a full model) is coded against.
    """

    count: int
    seq: int = 0
    _values: np.ndarray = field(init=False, repr=False)

    _MAX_SEQ: ClassVar[int] = (1 << 64) - 1

    def __post_init__(self) -> None:
        if not _is_int(self.count) or self.count < 0:
            raise ValueError(f"count must be a non-negative integer, got {self.count!r}")
        if not _is_int(self.seq) or not 0 <= self.seq <= self._MAX_SEQ:
            raise ValueError(f"seq must be an integer in [0, 2**64), got {self.seq!r}")
        self.count, self.seq = int(self.count), int(self.seq)
        self._values = np.zeros(self.count, np.float32)

    @classmethod
    def from_values(cls, values: np.ndarray, seq: int) -> Reference:
        """A reference that starts from a known vector (for example one restored from a checkpoint)."""
        _check_vector(values, "values")
        ref = cls(int(values.size), seq)
        ref._values[:] = values
        return ref

    @property
    def values(self) -> np.ndarray:
        """Read-only view: the reference must only move through payloads, or the ends drift apart."""
        view = self._values.view()
        view.flags.writeable = False
        return view

    def encode_towards(
        self, x: np.ndarray, config: CodecConfig | None = None, *, new_seq: int | None = None
    ) -> bytes:
        """Code ``x - values`` and move the reference by exactly what the receiver will decode."""
        _check_vector(x, "x")
        if x.size != self.count:
            raise ValueError(f"x has {x.size} elements, the reference has {self.count}")
        seq = self._next_seq(new_seq)
        delta = x - self._values
        payload, header, arrays = _encode(delta, config or CodecConfig())
        decoded = _reconstruct(header, arrays)
        np.add(self._values, decoded, out=self._values)
        self.seq = seq
        return payload

    def apply(
        self,
        payload: bytes | bytearray | memoryview,
        *,
        new_seq: int | None = None,
        max_count: int = DEFAULT_MAX_COUNT,
    ) -> np.ndarray:
        """Decode a payload and add it; returns the decoded delta. On any error nothing changes."""
        seq = self._next_seq(new_seq)
        decoded = decode_delta(payload, self.count, max_count=max(max_count, self.count))
        np.add(self._values, decoded, out=self._values)
        self.seq = seq
        return decoded

    def reset(self, seq: int = 0) -> None:
        """Back to all zeros, for a peer that lost the reference (it answered need-full)."""
        self._values[:] = 0
        self.seq = seq

    def copy(self) -> Reference:
        return Reference.from_values(self._values, self.seq)

    def _next_seq(self, new_seq: int | None) -> int:
        seq = self.seq + 1 if new_seq is None else new_seq
        if not _is_int(seq) or not 0 <= seq <= self._MAX_SEQ:
            raise ValueError(f"sequence number must be an integer in [0, 2**64), got {seq!r}")
        return int(seq)


# ---------------------------------------------------------------------------------------------- helpers


def encoded_size_bound(count: int) -> int:
    """The largest payload any configuration can produce for ``count`` elements.

    Worst case is topk keeping everything: 4 bytes of gap and 2 of float16 value an element, or 4 + 1 and
    a 4-byte scale per (at least 64-element) block, hence ``6 n + 4``; all in 4 KiB chunks that blosc2
    could not compress (32 bytes of header each, plus a 4-byte table entry)."""
    if not _is_int(count) or count < 0:
        raise ValueError(f"count must be a non-negative integer, got {count!r}")
    body = 6 * int(count) + 4
    chunks = body // (1 << _CHUNK_LOG2_MIN) + 3
    return HEADER_SIZE + DIGEST_SIZE + body + chunks * (_BLOSC_OVERHEAD + _TABLE_ENTRY)


def _check_vector(v: object, name: str) -> None:
    if not isinstance(v, np.ndarray):
        raise TypeError(f"{name} must be a numpy array, got {type(v).__name__}")
    if v.dtype != np.float32:
        raise TypeError(f"{name} must be float32, got {v.dtype}")
    if v.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {v.shape}")
    if not v.flags.c_contiguous:
        raise ValueError(f"{name} must be contiguous")


def _all_finite(x: np.ndarray) -> bool:
    """One fast reduction instead of a full boolean temporary: NaN and Inf survive any sum, so a finite
    sum proves every term finite. Only an overflowing sum of finite values needs the exact check."""
    if x.size == 0:
        return True
    with np.errstate(over="ignore", invalid="ignore"):
        if np.isfinite(np.add.reduce(x)):
            return True
    return bool(np.isfinite(x).all())


def _bytes_view(buf: object) -> memoryview:
    try:
        mv = memoryview(buf)  # type: ignore[arg-type]
    except TypeError as exc:
        raise CodecError(f"payload must be bytes-like, got {type(buf).__name__}") from exc
    if mv.ndim != 1 or mv.itemsize != 1 or not mv.c_contiguous:
        try:
            mv = mv.cast("B")
        except TypeError as exc:
            raise CodecError("payload must be a contiguous byte buffer") from exc
    return mv


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _is_int(v: object) -> bool:
    """Python or numpy integers (a model size often comes from numpy), never bools."""
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _is_pow2_in(v: object, lo: int, hi: int) -> bool:
    return _is_int(v) and lo <= v <= hi and v & (v - 1) == 0  # type: ignore[operator]
