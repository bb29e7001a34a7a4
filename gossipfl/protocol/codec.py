"""The payload format of model deltas on the wire: header, sections, blosc2 chunks, a hash; encode and decode.

Peers swap the *difference* between a model and a reference that both ends hold, so what is sent is
small and compressible, and lossy coding is safe: with error feedback (CHOCO-Gossip) the sender moves its
copy of the reference by exactly what the receiver decodes, so whatever one message loses is carried by a
later one instead of being lost for good.

Every payload is untrusted on the receiving side, even from an authenticated peer (a buggy or compromised
device, a corrupted buffer), so decoding is written as a validator first and a decoder second:

* only one-shot chunk compression and decompression are used (C-Blosc2's ``blosc2_compress_ctx`` and
  ``blosc2_decompress_ctx``, as python-blosc2's ``compress2``/``decompress2`` call them; see
  ``gossipfl/protocol/_blosc.py``); frames, the pickle-based ``pack``/``unpack`` family and ``unpack_tensor``
  (which trusts a dtype and a shape stored in the frame) are never used;
* a SHA-256 digest (truncated to 16 bytes) of the whole payload is checked before any field is used,
  because blosc2 chunks carry no checksum and most flipped bytes decode silently to wrong numbers;
* every size is derived from the header *and* from the element count the caller expects, and checked
  against ``blosc2_cbuffer_sizes`` and against our own reading of each blosc2 chunk header before
  anything is allocated or decompressed; decompression writes into preallocated arrays;
* the decoded vector must be finite; every failure raises :class:`~gossipfl.errors.CodecError` naming
  the problem.

The schemes' arithmetic (top-k, block-wise int8, float16) is in ``quantize``, the blosc2 chunks (compression,
and the checks of an untrusted chunk) in ``chunks``, and error feedback's ``Reference`` in ``feedback``.
The payload layout and the reasons behind each choice are in ``docs/protocol.md``. Public API::

    CodecConfig(scheme="int8", topk_fraction=0.01, topk_values="int8", int8_block=32768,
                blosc_codec="zstd", shuffle="auto", clevel=1, nthreads=2, chunk_bytes=1 << 26)
    encode_delta(delta, config=CodecConfig()) -> bytes
    decode_delta(buf, expected_count, *, max_count=DEFAULT_MAX_COUNT, nthreads=2) -> np.ndarray
    read_header(buf) -> PayloadHeader          # cheap peek, no hash check, nothing allocated
    encoded_size_bound(count) -> int           # largest payload any config can make for count values
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from dataclasses import dataclass
from typing import Final

import numpy as np

from gossipfl.errors import CodecError, ConfigError
from gossipfl.protocol.chunks import BLOSC_OVERHEAD, CODECS, SHUFFLES, Section, compress, decompress_chunk
from gossipfl.protocol.quantize import (
    SCALE_MAX,
    dequantize_int8,
    from_float16,
    quantize_int8,
    to_float16,
    topk_count,
    topk_indices,
)

__all__ = [
    "CODEC_VERSION",
    "DEFAULT_MAX_COUNT",
    "CodecConfig",
    "PayloadHeader",
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
        if self.blosc_codec not in CODECS:
            raise ConfigError(f"codec blosc_codec {self.blosc_codec!r} is not one of {sorted(CODECS)}")
        if self.shuffle not in SHUFFLES:
            raise ConfigError(f"codec shuffle {self.shuffle!r} is not one of {list(SHUFFLES)}")
        if not is_int(self.clevel) or not 0 <= self.clevel <= 9:
            raise ConfigError(f"codec clevel {self.clevel!r} must be an integer in [0, 9]")
        if not is_int(self.nthreads) or not 1 <= self.nthreads <= 256:
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

    def sections(self) -> list[Section]:
        """The arrays the body holds, in order. Sizes follow from the header alone, which is what lets
        the decoder check every length before allocating anything."""
        n, k, b = self.count, self.k, self.block
        if self.scheme == "float32":
            return [Section("values", np.dtype(np.float32), n)]
        if self.scheme == "float16":
            return [Section("values", np.dtype(np.float16), n)]
        if self.scheme == "int8":
            return [Section("scales", np.dtype(np.float32), _ceil_div(n, b)), Section("values", _I8, n)]
        if self.value_dtype == "int8":
            return [
                Section("gaps", np.dtype(np.uint32), k),
                Section("scales", np.dtype(np.float32), _ceil_div(k, b)),
                Section("values", _I8, k),
            ]
        return [Section("gaps", np.dtype(np.uint32), k), Section("values", np.dtype(np.float16), k)]


_I8: Final = np.dtype(np.int8)


# --------------------------------------------------------------------------------------------- encoding


def encode_delta(delta: np.ndarray, config: CodecConfig | None = None) -> bytes:
    """Code a delta for the wire.

    Refuses non-finite values (``CodecError``): a NaN in a delta means training diverged, and sending it
    would only make every peer refuse it. Wrong dtype or shape is a programming error (TypeError/ValueError).
    """
    return encode_parts(delta, config or CodecConfig())[0]


def encode_parts(delta: np.ndarray, config: CodecConfig) -> tuple[bytes, PayloadHeader, list[np.ndarray]]:
    """The payload, its header and the arrays it holds, which ``reconstruct`` turns into what the receiver
    will decode (``feedback.Reference`` moves by exactly that)."""
    check_vector(delta, "delta")
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
        arrays = [to_float16(delta)]
    elif scheme == "int8":
        value_dtype = "int8"
        block = config.int8_block
        arrays = list(quantize_int8(delta, block))
    else:
        value_dtype = config.topk_values
        k = topk_count(n, config.topk_fraction)
        idx = topk_indices(delta, k)
        gaps = np.empty(k, np.uint32)
        if k:
            gaps[0] = idx[0]
            np.subtract(idx[1:], idx[:-1], out=gaps[1:], casting="unsafe")
        kept = delta[idx]
        if value_dtype == "int8":
            block = config.int8_block
            arrays = [gaps, *quantize_int8(kept, block)]
        else:
            arrays = [gaps, to_float16(kept)]

    header = PayloadHeader(scheme, value_dtype, n, k, block, config.chunk_bytes)
    cparams = _cparams(config)
    chunks: list[bytes] = []
    for arr in arrays:
        chunks.extend(compress(arr, cparams, config.chunk_bytes, config.shuffle))
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
    return {"codec": CODECS[config.blosc_codec], "clevel": config.clevel, "nthreads": config.nthreads}


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
    if not is_int(expected_count) or expected_count < 0:
        raise ValueError(f"expected_count must be a non-negative integer, got {expected_count!r}")
    if not is_int(max_count) or max_count < 0:
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
            decompress_chunk(mv[pos : pos + csize], raw[lo:hi], sec, nthreads)
            pos += csize
        arrays.append(arr)
    _check_sections(header, arrays)
    return reconstruct(header, arrays), header


def _check_sections(header: PayloadHeader, arrays: list[np.ndarray]) -> None:
    """Content checks that blosc2 cannot make: finite values, ranges, index order."""
    by_name = {}
    for sec, arr in zip(header.sections(), arrays, strict=True):
        by_name[sec.name] = arr
    scales = by_name.get("scales")
    if scales is not None and scales.size:
        # NaN fails both comparisons; the upper bound makes 127 * scale finite.
        ok = (scales >= 0) & (scales <= SCALE_MAX)
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


def reconstruct(header: PayloadHeader, arrays: list[np.ndarray]) -> np.ndarray:
    """The dense float32 delta a payload stands for. The sender calls this on the arrays it compressed
    and the receiver on the arrays it decompressed, which is what keeps both references bit-identical."""
    if header.scheme == "float32":
        out = arrays[0]
        if not _all_finite(out):
            bad = int(np.flatnonzero(~np.isfinite(out))[0])
            raise CodecError(f"float32 value at position {bad} is Inf or NaN")
        return out
    if header.scheme == "float16":
        return from_float16(arrays[0])
    if header.scheme == "int8":
        return dequantize_int8(arrays[0], arrays[1], header.block)
    gaps = arrays[0]
    if header.value_dtype == "int8":
        kept = dequantize_int8(arrays[1], arrays[2], header.block)
    else:
        kept = from_float16(arrays[1])
    out = np.zeros(header.count, np.float32)
    if gaps.size:
        out[np.cumsum(gaps, dtype=np.int64)] = kept
    return out


# ---------------------------------------------------------------------------------------------- helpers


def encoded_size_bound(count: int) -> int:
    """The largest payload any configuration can produce for ``count`` elements.

    Worst case is topk keeping everything: 4 bytes of gap and 2 of float16 value an element, or 4 + 1 and
    a 4-byte scale per (at least 64-element) block, hence ``6 n + 4``; all in 4 KiB chunks that blosc2
    could not compress (32 bytes of header each, plus a 4-byte table entry)."""
    if not is_int(count) or count < 0:
        raise ValueError(f"count must be a non-negative integer, got {count!r}")
    body = 6 * int(count) + 4
    chunks = body // (1 << _CHUNK_LOG2_MIN) + 3
    return HEADER_SIZE + DIGEST_SIZE + body + chunks * (BLOSC_OVERHEAD + _TABLE_ENTRY)


def check_vector(v: object, name: str) -> None:
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


def is_int(v: object) -> bool:
    """Python or numpy integers (a model size often comes from numpy), never bools."""
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _is_pow2_in(v: object, lo: int, hi: int) -> bool:
    return is_int(v) and lo <= v <= hi and v & (v - 1) == 0  # type: ignore[operator]
