"""The lossy schemes' arithmetic: top-k selection, block-wise int8 and saturating float16, in tiled numpy.

Split from ``codec`` (which frames what these produce into a payload): the functions here only turn a
float32 vector into the arrays a scheme sends and back, bit for bit the same on both ends. The sender
reconstructs from the arrays it compressed and the receiver from the arrays it decompressed, through the
same functions, which is what keeps error feedback's two references identical (``feedback.Reference``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Final

import numpy as np

TILE: Final = 1 << 16  # elements per step of the tiled numpy loops (256 KiB of float32 fits in L2)

F32_MAX: Final = float(np.finfo(np.float32).max)
# Largest int8 scale for which 127 * scale is still finite in float32, so decoded values cannot overflow.
SCALE_MAX: Final = np.float32(F32_MAX / 127.0)
with np.errstate(over="ignore"):
    while not np.isfinite(np.float32(127.0) * SCALE_MAX):  # pragma: no cover - depends on rounding
        SCALE_MAX = np.nextafter(SCALE_MAX, np.float32(0))
# Blocks whose largest magnitude is below this are sent as zeros: their scale would be a subnormal
# float32, whose reciprocal overflows. The error is below 1.5e-36, far below anything a model can use.
TINY_AMAX: Final = np.float32(127.0) * np.float32(np.finfo(np.float32).tiny)


def topk_count(n: int, fraction: float) -> int:
    if n == 0:
        return 0
    return min(n, max(1, math.floor(fraction * n + 0.5)))


def topk_indices(x: np.ndarray, k: int) -> np.ndarray:
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
    scales[amax < TINY_AMAX] = 0
    np.minimum(scales, SCALE_MAX, out=scales)
    return scales


def quantize_int8(x: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Block-wise int8: q = round(x / scale), |x - q * scale| <= scale / 2 (plus float32 rounding).

    Runs in tiles of TILE elements so that the float temporaries stay in cache: a fresh 4 MB temporary
    per pass costs more in page faults than the arithmetic itself."""
    n = x.size
    scales = _block_scales(x, block)
    divisor = np.where(scales > 0, scales, np.float32(1)).astype(np.float32)
    q = np.empty(n, np.int8)
    buf = np.empty(min(n, TILE), np.float32)
    for start in range(0, n, TILE):
        stop = min(n, start + TILE)
        m = stop - start
        t = buf[:m]
        _per_block(np.divide, x[start:stop], divisor, block, start, t)
        np.rint(t, out=t)
        np.clip(t, -127, 127, out=t)
        np.copyto(q[start:stop], t, casting="unsafe")
    return scales, q


def dequantize_int8(scales: np.ndarray, q: np.ndarray, block: int) -> np.ndarray:
    """The reconstruction both ends compute, bit for bit: float32(q) * scale."""
    n = q.size
    out = np.empty(n, np.float32)
    for start in range(0, n, TILE):
        stop = min(n, start + TILE)
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
    if block >= TILE:
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


def to_float16(x: np.ndarray) -> np.ndarray:
    """float32 -> float16, round to nearest even, saturating at +-65504 instead of overflowing to Inf.

    numpy's own cast runs about 6 ms per million values here; this integer formulation (F. Giesen's
    float_to_half_fast3_rtne) runs in cache-sized tiles and is several times faster. It has been checked
    against numpy's cast over every finite float32 of magnitude <= 65504. Saturation rather than Inf keeps
    the payload finite; with error feedback the clipped excess is sent in later messages.
    """
    n = x.size
    out = np.empty(n, np.uint16)
    t = min(n, TILE)
    a = np.empty(t, np.uint32)
    r = np.empty(t, np.uint32)
    s = np.empty(t, np.uint32)
    small = np.empty(t, np.bool_)
    u_all = x.view(np.uint32)
    for start in range(0, n, TILE):
        stop = min(n, start + TILE)
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


def from_float16(h: np.ndarray) -> np.ndarray:
    """float16 -> float32, exact for every finite float16 (Inf/NaN are refused before this is called).

    The float16 bits shifted into a float32's place and multiplied by 2**112 give the exact value for
    normal and subnormal inputs alike; in tiles this is several times faster than numpy's cast."""
    n = h.size
    out = np.empty(n, np.float32)
    bits = h.view(np.uint16)
    t = np.empty(min(n, TILE), np.uint32)
    o_bits = out.view(np.uint32)
    for start in range(0, n, TILE):
        stop = min(n, start + TILE)
        hb, tv, ov = bits[start:stop], t[: stop - start], o_bits[start:stop]
        np.bitwise_and(hb, np.uint16(0x7FFF), out=tv, casting="unsafe")
        np.left_shift(tv, 13, out=tv)
        np.multiply(tv.view(np.float32), np.float32(2.0**112), out=out[start:stop])
        np.bitwise_and(hb, np.uint16(0x8000), out=tv, casting="unsafe")
        np.left_shift(tv, 16, out=tv)
        np.bitwise_or(ov, tv, out=ov)
    return out
