"""Tests of gossipfl.protocol.codec, quantize, chunks and feedback: round trips with error bounds, refusals of bad
payloads, error feedback."""

from __future__ import annotations

import hashlib
import struct
import tracemalloc

import blosc2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from gossipfl.errors import CodecError, ConfigError
from gossipfl.protocol import codec, quantize
from gossipfl.protocol.codec import CodecConfig, decode_delta, encode_delta, read_header
from gossipfl.protocol.feedback import Reference

F16_MAX = 65504.0


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


def block_scales(x: np.ndarray, block: int) -> np.ndarray:
    """The int8 scale of each block as documented: float32(max |x| / 127)."""
    n = x.size
    nb = -(-n // block)
    amax = np.array([np.abs(x[i * block : (i + 1) * block]).max() for i in range(nb)], np.float32)
    return (amax.astype(np.float64) / 127).astype(np.float32)


# --------------------------------------------------------------------------------------- strategies

finite_f32 = st.floats(width=32, allow_nan=False, allow_infinity=False)
moderate_f32 = st.floats(
    min_value=-(2.0**100), max_value=2.0**100, width=32, allow_nan=False, allow_infinity=False
)


def vectors(elements: st.SearchStrategy[float] = moderate_f32, max_size: int = 3000) -> st.SearchStrategy:
    return hnp.arrays(np.float32, st.integers(0, max_size), elements=elements)


@st.composite
def gaussian_vectors(draw: st.DrawFn, max_size: int = 20000) -> np.ndarray:
    """Realistic deltas (hypothesis' float strategies are mostly edge cases, which the other tests cover)."""
    n = draw(st.integers(0, max_size))
    seed = draw(st.integers(0, 2**32 - 1))
    scale = draw(st.sampled_from([1e-6, 1e-3, 1.0, 1e3]))
    return np.random.default_rng(seed).normal(0, scale, n).astype(np.float32)


blosc_options = st.fixed_dictionaries(
    {
        "blosc_codec": st.sampled_from(["zstd", "lz4", "lz4hc", "blosclz"]),
        "shuffle": st.sampled_from(["auto", "shuffle", "bitshuffle", "none"]),
        "clevel": st.integers(0, 9),
        "chunk_bytes": st.sampled_from([4096, 8192, 1 << 26]),
        "nthreads": st.integers(1, 2),
    }
)

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ------------------------------------------------------------------------------------------ round trips


@SETTINGS
@given(x=st.one_of(vectors(finite_f32), gaussian_vectors()), opts=blosc_options)
def test_float32_round_trip_is_bit_exact(x: np.ndarray, opts: dict) -> None:
    buf = encode_delta(x, CodecConfig(scheme="float32", **opts))
    out = decode_delta(buf, x.size)
    assert out.dtype == np.float32 and out.shape == x.shape
    assert out.tobytes() == x.tobytes()  # bit-exact, signed zeros included


@SETTINGS
@given(x=st.one_of(vectors(finite_f32), gaussian_vectors()), opts=blosc_options)
def test_float16_error_is_half_an_ulp_and_large_values_saturate(x: np.ndarray, opts: dict) -> None:
    out = decode_delta(encode_delta(x, CodecConfig(scheme="float16", **opts)), x.size)
    xd = x.astype(np.float64)
    inside = np.abs(xd) <= F16_MAX
    # round to nearest: relative 2**-11 for normal float16, absolute 2**-25 in the subnormal range
    err = np.abs(out.astype(np.float64) - xd)
    assert np.all(err[inside] <= np.abs(xd[inside]) * 2.0**-11 + 2.0**-25)
    np.testing.assert_array_equal(out[~inside], np.sign(x[~inside]) * F16_MAX)


@SETTINGS
@given(
    x=st.one_of(vectors(), gaussian_vectors()),
    block=st.sampled_from([64, 256, 4096, 1 << 15, 1 << 16]),
    opts=blosc_options,
)
def test_int8_error_is_at_most_half_a_step_per_block(x: np.ndarray, block: int, opts: dict) -> None:
    out = decode_delta(encode_delta(x, CodecConfig(scheme="int8", int8_block=block, **opts)), x.size)
    assert out.dtype == np.float32 and out.shape == x.shape
    scales = block_scales(x, block)
    for b, s in enumerate(scales):
        xs = x[b * block : (b + 1) * block].astype(np.float64)
        err = np.abs(out[b * block : (b + 1) * block].astype(np.float64) - xs)
        if s < np.finfo(np.float32).tiny:  # a block of (nearly) zeros is sent as zeros
            assert np.all(out[b * block : (b + 1) * block] == 0)
            assert np.all(err < 1.5e-36)
        else:
            assert np.all(err <= s / 2 * (1 + 2**-18) + np.abs(xs) * 2**-22), (b, float(s), float(err.max()))


def kth_largest_magnitude(x: np.ndarray, k: int) -> float:
    return float(np.sort(np.abs(x))[x.size - k]) if k else np.inf


@SETTINGS
@given(
    x=st.one_of(vectors(), gaussian_vectors()),
    fraction=st.sampled_from([0.001, 0.01, 0.1, 0.5, 1.0]),
    values=st.sampled_from(["int8", "float16"]),
    block=st.sampled_from([64, 1 << 15]),
    opts=blosc_options,
)
def test_topk_keeps_the_largest_entries_and_zeroes_the_rest(
    x: np.ndarray, fraction: float, values: str, block: int, opts: dict
) -> None:
    if values == "float16":
        x = np.clip(x, -F16_MAX, F16_MAX)
    cfg = CodecConfig(scheme="topk", topk_fraction=fraction, topk_values=values, int8_block=block, **opts)
    buf = encode_delta(x, cfg)
    out = decode_delta(buf, x.size)
    k = read_header(buf).k
    assert k == (0 if x.size == 0 else min(x.size, max(1, int(np.floor(fraction * x.size + 0.5)))))
    t = kth_largest_magnitude(x, k)
    mag = np.abs(x.astype(np.float64))
    nonzero = out != 0
    assert nonzero.sum() <= k
    # nothing below the k-th largest magnitude is sent
    assert np.all(out[mag < t] == 0)
    # entries strictly above it are all sent, within the value coding's error
    must = mag > t
    err = np.abs(out.astype(np.float64) - x.astype(np.float64))
    if values == "float16":
        assert np.all(err[must] <= mag[must] * 2.0**-11 + 2.0**-25)
    elif must.any():
        step = float(np.abs(x[mag >= t]).max()) / 127  # the largest possible block scale
        assert np.all(err[must] <= step / 2 * (1 + 2**-18) + mag[must] * 2**-22)


def test_topk_picks_exact_largest_on_distinct_magnitudes() -> None:
    rng = np.random.default_rng(1)
    x = rng.permutation(np.arange(1, 10001, dtype=np.float32)) * rng.choice([-1, 1], 10000).astype(np.float32)
    out = decode_delta(
        encode_delta(x, CodecConfig(scheme="topk", topk_fraction=0.01, topk_values="float16")), x.size
    )
    kept = np.flatnonzero(out)
    assert kept.size == 100
    assert set(np.abs(x[kept]).astype(int)) == set(range(9901, 10001))
    np.testing.assert_allclose(out[kept], x[kept], rtol=2**-11)


@pytest.mark.parametrize("scheme", ["float32", "float16", "int8", "topk"])
def test_empty_and_tiny_vectors(scheme: str) -> None:
    for n in (0, 1, 2, 63, 64, 65):
        x = np.linspace(-1, 1, n, dtype=np.float32)
        out = decode_delta(encode_delta(x, CodecConfig(scheme=scheme, topk_fraction=1.0)), n)
        assert out.shape == (n,)
        np.testing.assert_allclose(out, x, atol=1 / 127)


def test_all_zero_delta_round_trips_as_zero() -> None:
    x = np.zeros(100_000, np.float32)
    for scheme in ("float32", "float16", "int8", "topk"):
        buf = encode_delta(x, CodecConfig(scheme=scheme))
        assert len(buf) < 1000
        assert not decode_delta(buf, x.size).any()


def test_large_vectors_are_split_into_several_chunks() -> None:
    x = np.random.default_rng(2).normal(0, 1, 50_000).astype(np.float32)
    for scheme in ("float32", "int8", "topk"):
        cfg = CodecConfig(scheme=scheme, chunk_bytes=4096, topk_fraction=0.5)
        buf = encode_delta(x, cfg)
        header = read_header(buf)
        assert header.chunk_bytes == 4096
        expected_chunks = sum(-(-s.nbytes // 4096) for s in header.sections())
        assert len(chunk_offsets(buf)) == expected_chunks > 10
        one_chunk = decode_delta(encode_delta(x, CodecConfig(scheme=scheme, topk_fraction=0.5)), x.size)
        np.testing.assert_array_equal(decode_delta(buf, x.size), one_chunk)


def test_extreme_magnitudes_stay_finite() -> None:
    big = np.float32(np.finfo(np.float32).max)
    x = np.array([big, -big, 1.0, 0.0, np.finfo(np.float32).smallest_subnormal], np.float32)
    for scheme in ("float32", "float16", "int8", "topk"):
        out = decode_delta(encode_delta(x, CodecConfig(scheme=scheme, topk_fraction=1.0)), x.size)
        assert np.isfinite(out).all()
        assert out[0] > 0 and out[1] < 0


def test_float16_conversion_matches_numpy_on_random_bit_patterns() -> None:
    rng = np.random.default_rng(3)
    bits = rng.integers(0, 2**32, 2_000_000, dtype=np.uint64).astype(np.uint32)
    x = bits.view(np.float32)
    x = x[np.isfinite(x) & (np.abs(x) <= F16_MAX)]
    edges = np.array(
        [0.0, -0.0, 2**-24, 2**-25, 2**-25 * 1.0001, 2**-14, 65504, -65504, 65519, 1 / 3], np.float32
    )
    x = np.concatenate([x, np.clip(edges, -F16_MAX, F16_MAX)])
    np.testing.assert_array_equal(quantize.to_float16(x).view(np.uint16), x.astype(np.float16).view(np.uint16))
    h = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16)
    h = h[np.isfinite(h)]
    np.testing.assert_array_equal(
        quantize.from_float16(h).view(np.uint32), h.astype(np.float32).view(np.uint32)
    )


def test_int8_payload_is_about_four_and_a_half_times_smaller() -> None:
    x = np.random.default_rng(4).normal(0, 1e-3, 1 << 18).astype(np.float32)
    assert len(encode_delta(x, CodecConfig(scheme="int8"))) * 4.4 < x.nbytes
    assert len(encode_delta(x, CodecConfig(scheme="topk", topk_fraction=0.01))) * 50 < x.nbytes


# --------------------------------------------------------------------------------------- encoder input


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_encoder_refuses_non_finite_values(bad: float) -> None:
    x = np.zeros(1000, np.float32)
    x[123] = bad
    for scheme in ("float32", "float16", "int8", "topk"):
        with pytest.raises(CodecError, match="index 123"):
            encode_delta(x, CodecConfig(scheme=scheme))


def test_encoder_refuses_wrong_arrays() -> None:
    with pytest.raises(TypeError, match="float32"):
        encode_delta(np.zeros(4, np.float64))
    with pytest.raises(ValueError, match="1-D"):
        encode_delta(np.zeros((2, 2), np.float32))
    with pytest.raises(ValueError, match="contiguous"):
        encode_delta(np.zeros(8, np.float32)[::2])
    with pytest.raises(TypeError, match="numpy array"):
        encode_delta([1.0, 2.0])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("scheme", "int4"),
        ("topk_fraction", 0.0),
        ("topk_fraction", 1.5),
        ("topk_values", "float32"),
        ("int8_block", 100),
        ("int8_block", 32),
        ("blosc_codec", "zlib"),
        ("shuffle", "delta"),
        ("clevel", 10),
        ("nthreads", 0),
        ("chunk_bytes", 1000),
        ("chunk_bytes", 1 << 31),
    ],
)
def test_config_refuses_bad_values_naming_the_key(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=field):
        CodecConfig(**{field: value})


# ------------------------------------------------------------------------------------- decoder refusals


@pytest.fixture(scope="module")
def payloads() -> dict[str, bytes]:
    x = np.random.default_rng(5).normal(0, 1, 3000).astype(np.float32)
    return {
        "float32": encode_delta(x, CodecConfig(scheme="float32")),
        "float16": encode_delta(x, CodecConfig(scheme="float16")),
        "int8": encode_delta(x, CodecConfig(scheme="int8", int8_block=256)),
        "topk-int8": encode_delta(x, CodecConfig(scheme="topk", topk_fraction=0.1, int8_block=64)),
        "topk-float16": encode_delta(x, CodecConfig(scheme="topk", topk_fraction=0.1, topk_values="float16")),
    }


def test_every_flipped_byte_is_detected(payloads: dict[str, bytes]) -> None:
    for name, buf in payloads.items():
        for pos in range(len(buf)):
            bad = bytearray(buf)
            bad[pos] ^= 1 << (pos % 8)
            with pytest.raises(CodecError) as info:
                decode_delta(bytes(bad), 3000)
            if pos >= 5:  # past the magic and version, only the hash can see it
                assert "hash mismatch" in str(info.value), (name, pos)


def test_truncation_and_extension_are_detected(payloads: dict[str, bytes]) -> None:
    buf = payloads["int8"]
    for cut in (0, 1, 10, 47, 48, len(buf) // 2, len(buf) - 1):
        with pytest.raises(CodecError):
            decode_delta(buf[:cut], 3000)
    with pytest.raises(CodecError, match="hash"):
        decode_delta(buf + b"\0", 3000)


def test_wrong_element_count_is_refused_before_allocation(payloads: dict[str, bytes]) -> None:
    with pytest.raises(CodecError, match="3000 elements, the model has 2999"):
        decode_delta(payloads["float32"], 2999)
    huge = set_header(payloads["float32"], count=1 << 40)
    tracemalloc.start()
    try:
        with pytest.raises(CodecError, match="the model has 3000"):
            decode_delta(huge, 3000)
        with pytest.raises(ValueError, match="max_count"):
            decode_delta(huge, 1 << 40)
        assert tracemalloc.get_traced_memory()[1] < 1 << 20
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"magic": b"XXXX"}, "magic"),
        ({"version": 2}, "version"),
        ({"scheme": 9}, "scheme id"),
        ({"dtype": 1}, "not allowed"),
        ({"chunk_log2": 11}, "chunk size"),
        ({"chunk_log2": 31}, "chunk size"),
        ({"block": 100}, "block size"),
        ({"block": 0}, "block size"),
        ({"k": 5}, "kept-entry"),
        ({"reserved": 1}, "reserved"),
    ],
)
def test_bad_header_fields_are_named(payloads: dict[str, bytes], fields: dict, message: str) -> None:
    with pytest.raises(CodecError, match=message):
        decode_delta(set_header(payloads["int8"], **fields), 3000)


def test_topk_header_fields(payloads: dict[str, bytes]) -> None:
    buf = payloads["topk-float16"]
    with pytest.raises(CodecError, match="keeps 3001"):
        decode_delta(set_header(buf, k=3001), 3000)
    with pytest.raises(CodecError, match="keeps 0"):
        decode_delta(set_header(buf, k=0), 3000)
    with pytest.raises(CodecError, match="block size"):
        decode_delta(set_header(buf, block=64), 3000)
    with pytest.raises(CodecError, match="chunk"):  # k changed: the section sizes no longer match
        decode_delta(set_header(buf, k=299), 3000)


def recode_section(buf: bytes, index: int, arr: np.ndarray) -> bytes:
    """Replace section ``index`` (one chunk) with a blosc2 chunk of ``arr``, fixing table and hash."""
    chunks = chunk_offsets(buf)
    new = blosc2.compress2(arr, typesize=arr.itemsize, codec=blosc2.Codec.ZSTD, clevel=1)
    parts = [bytes(buf[s : s + n]) for s, n in chunks]
    parts[index] = new
    n = len(parts)
    head = buf[: codec.HEADER_SIZE]
    table = struct.pack(f"<{n}I", *(len(p) for p in parts))
    return resign(head + table + b"".join(parts) + b"\0" * codec.DIGEST_SIZE)


def test_section_contents_are_checked(payloads: dict[str, bytes]) -> None:
    int8 = payloads["int8"]
    nb = -(-3000 // 256)
    scales = np.full(nb, 0.01, np.float32)
    scales[3] = np.nan
    with pytest.raises(CodecError, match="scale nan of block 3"):
        decode_delta(recode_section(int8, 0, scales), 3000)
    scales[3] = np.finfo(np.float32).max
    with pytest.raises(CodecError, match="too large"):
        decode_delta(recode_section(int8, 0, scales), 3000)
    q = np.zeros(3000, np.int8)
    q[7] = -128
    with pytest.raises(CodecError, match="-128"):
        decode_delta(recode_section(int8, 1, q), 3000)

    f32 = np.zeros(3000, np.float32)
    f32[9] = np.inf
    with pytest.raises(CodecError, match="position 9"):
        decode_delta(recode_section(payloads["float32"], 0, f32), 3000)
    f16 = np.zeros(3000, np.float16)
    f16[11] = np.nan
    with pytest.raises(CodecError, match="position 11"):
        decode_delta(recode_section(payloads["float16"], 0, f16), 3000)

    topk = payloads["topk-float16"]
    gaps = np.ones(300, np.uint32)
    gaps[5] = 0
    with pytest.raises(CodecError, match="strictly increasing"):
        decode_delta(recode_section(topk, 0, gaps), 3000)
    gaps = np.full(300, 10, np.uint32)  # last index 2999 is fine, 3000 is not
    gaps[0] = 9
    decode_delta(recode_section(topk, 0, gaps), 3000)
    gaps[0] = 10
    with pytest.raises(CodecError, match="index 3000 is out of range"):
        decode_delta(recode_section(topk, 0, gaps), 3000)
    gaps[:] = 2**32 - 1  # the sum must not wrap around
    with pytest.raises(CodecError, match="out of range"):
        decode_delta(recode_section(topk, 0, gaps), 3000)


def patch_chunk(buf: bytes, index: int, offset: int, value: int, *, fmt: str = "B") -> bytes:
    pos, _ = chunk_offsets(buf)[index]
    out = bytearray(buf)
    struct.pack_into("<" + fmt, out, pos + offset, value)
    return resign(out)


@pytest.mark.parametrize(
    ("offset", "value", "message"),
    [
        (0, 9, "format version"),  # blosc2 version
        (2, 0x25 & ~0x04, "extended header"),
        (2, 0x85 | 0x08, "delta flag"),
        (3, 2, "typesize"),
        (16, 3, "filter pipeline"),  # delta filter
        (16, 35, "filter pipeline"),  # bytedelta
        (24, 1, "filter pipeline"),  # filter meta
        (22, 4, "codec"),  # zlib is not accepted
        (22, 32, "codec"),  # user-defined codec
        (23, 1, "codec"),
        (31, 0x40, "flags"),  # special value: uninitialized memory
        (31, 0x20, "flags"),  # special value: NaN run
        (31, 0x01, "flags"),  # dictionary
        (31, 0x08, "flags"),  # lazy chunk
        (30, 1, "flags"),
    ],
)
def test_blosc2_chunk_headers_are_checked_before_blosc2_sees_them(
    payloads: dict[str, bytes], offset: int, value: int, message: str
) -> None:
    with pytest.raises(CodecError, match=message):
        decode_delta(patch_chunk(payloads["float32"], 0, offset, value), 3000)


def test_blosc2_sizes_must_match(payloads: dict[str, bytes]) -> None:
    buf = payloads["float32"]
    with pytest.raises(CodecError, match="uncompressed"):
        decode_delta(patch_chunk(buf, 0, 4, 11996, fmt="i"), 3000)
    with pytest.raises(CodecError, match="compressed"):
        decode_delta(patch_chunk(buf, 0, 12, 100, fmt="i"), 3000)
    for blocksize in (0, -4, 12004):  # blosc2 itself reports such headers as 0 bytes
        with pytest.raises(CodecError, match="values chunk: blosc2"):
            decode_delta(patch_chunk(buf, 0, 8, blocksize, fmt="i"), 3000)


def test_chunk_table_must_add_up(payloads: dict[str, bytes]) -> None:
    buf = bytearray(payloads["int8"])
    (first,) = struct.unpack_from("<I", buf, codec.HEADER_SIZE)
    struct.pack_into("<I", buf, codec.HEADER_SIZE, first + 1)
    with pytest.raises(CodecError, match="add up"):
        decode_delta(resign(buf), 3000)


def test_decode_accepts_any_byte_buffer(payloads: dict[str, bytes]) -> None:
    buf = payloads["int8"]
    ref = decode_delta(buf, 3000)
    for wrapped in (bytearray(buf), memoryview(buf), np.frombuffer(buf, np.uint8)):
        np.testing.assert_array_equal(decode_delta(wrapped, 3000), ref)
    with pytest.raises(CodecError, match="bytes-like"):
        decode_delta("not bytes", 3000)  # type: ignore[arg-type]


def test_read_header_peeks_without_the_body(payloads: dict[str, bytes]) -> None:
    h = read_header(payloads["topk-int8"][: codec.HEADER_SIZE + codec.DIGEST_SIZE])
    assert (h.scheme, h.value_dtype, h.count, h.k, h.block) == ("topk", "int8", 3000, 300, 64)
    with pytest.raises(CodecError, match="too short"):
        read_header(b"GFLD")


def test_encoded_size_bound_holds_for_worst_case_configs() -> None:
    rng = np.random.default_rng(6)
    for n in (0, 1, 1000, 70_000):
        x = rng.integers(-(2**31), 2**31, n).astype(np.uint32).view(np.float32)  # incompressible
        x = np.where(np.isfinite(x), x, 0).astype(np.float32)
        for cfg in (
            CodecConfig(scheme="float32", chunk_bytes=4096),
            CodecConfig(scheme="topk", topk_fraction=1.0, topk_values="float16", chunk_bytes=4096),
            CodecConfig(scheme="topk", topk_fraction=1.0, int8_block=64, chunk_bytes=4096),
        ):
            assert len(encode_delta(x, cfg)) <= codec.encoded_size_bound(n)


# ---------------------------------------------------------------------------------------- error feedback


def drift(n: int, rounds: int, seed: int) -> list[np.ndarray]:
    """x_t = x_{t-1} + step_t, where steps share a direction (like SGD) plus noise."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 1, n).astype(np.float32)
    direction = rng.normal(0, 0.01, n).astype(np.float32)
    xs = [x]
    for _ in range(rounds):
        x = (x + direction + rng.normal(0, 0.01, n)).astype(np.float32)
        xs.append(x)
    return xs


@pytest.mark.parametrize(
    "config",
    [
        CodecConfig(scheme="int8", int8_block=256),
        CodecConfig(scheme="topk", topk_fraction=0.05, topk_values="int8", int8_block=64),
        CodecConfig(scheme="topk", topk_fraction=0.05, topk_values="float16"),
    ],
    ids=["int8", "topk-int8", "topk-float16"],
)
def test_error_feedback_bounds_the_error_and_the_running_sum_converges(config: CodecConfig) -> None:
    n, rounds = 4096, 200
    xs = drift(n, rounds, seed=7)
    sender = Reference.from_values(xs[0], seq=1)
    receiver = Reference.from_values(xs[0], seq=1)
    errors, rel = [], []
    step = float(np.linalg.norm(xs[1] - xs[0]))
    for t in range(1, rounds + 1):
        delta_sent = xs[t] - sender.values
        payload = sender.encode_towards(xs[t], config)
        decoded = receiver.apply(payload)
        assert sender.seq == receiver.seq == t + 1
        assert sender.values.tobytes() == receiver.values.tobytes(), f"references diverged at round {t}"
        residual = xs[t].astype(np.float64) - receiver.values
        if config.scheme == "int8":
            # what is left is exactly this round's quantization error: at most half a step of the
            # largest block scale (plus float32 rounding of the reference itself)
            bound = float(np.abs(delta_sent).max()) / 127 / 2 * (1 + 1e-4) + 4 * np.spacing(np.float32(20))
            assert np.abs(residual).max() <= bound
        assert np.isfinite(decoded).all()
        errors.append(float(np.linalg.norm(residual)))
        rel.append(errors[-1] / float(np.linalg.norm(xs[t] - xs[0])))
    # the error does not grow with time: late rounds are no worse than early ones
    assert max(errors[150:]) <= 1.5 * max(errors[25:75])
    assert max(errors) <= 8 * step
    # the running sum of decoded deltas approaches the true movement
    assert rel[-1] < 0.5 * rel[49]
    assert rel[-1] < (0.002 if config.scheme == "int8" else 0.06)


def test_without_error_feedback_topk_loses_most_of_the_movement() -> None:
    """The control for the test above: summing lossy deltas of x_t - x_{t-1} does not converge."""
    n, rounds = 4096, 200
    xs = drift(n, rounds, seed=7)
    config = CodecConfig(scheme="topk", topk_fraction=0.05, topk_values="float16")
    total = np.zeros(n, np.float32)
    for t in range(1, rounds + 1):
        total += decode_delta(encode_delta(xs[t] - xs[t - 1], config), n)
    movement = xs[-1] - xs[0]
    rel_no_feedback = float(np.linalg.norm(movement - total) / np.linalg.norm(movement))
    sender = Reference.from_values(xs[0], seq=0)
    for t in range(1, rounds + 1):
        sender.encode_towards(xs[t], config)
    rel_feedback = float(np.linalg.norm(xs[-1] - sender.values) / np.linalg.norm(movement))
    assert rel_no_feedback > 0.5
    assert rel_feedback < rel_no_feedback / 10


def test_reference_starts_at_zero_and_a_full_model_is_a_delta_against_it() -> None:
    x = np.random.default_rng(8).normal(0, 1, 1000).astype(np.float32)
    sender, receiver = Reference(1000), Reference(1000)
    assert sender.seq == 0 and not sender.values.any()
    receiver.apply(sender.encode_towards(x, CodecConfig(scheme="float32"), new_seq=17), new_seq=17)
    assert sender.seq == receiver.seq == 17
    np.testing.assert_array_equal(receiver.values, x)
    sender.reset()
    assert sender.seq == 0 and not sender.values.any()


def test_reference_apply_is_atomic_on_errors() -> None:
    x = np.random.default_rng(9).normal(0, 1, 1000).astype(np.float32)
    sender, receiver = Reference(1000), Reference(1000)
    payload = sender.encode_towards(x, CodecConfig(scheme="int8"))
    bad = bytearray(payload)
    bad[-1] ^= 0xFF
    with pytest.raises(CodecError):
        receiver.apply(bytes(bad))
    assert receiver.seq == 0 and not receiver.values.any()
    with pytest.raises(CodecError, match="elements"):
        Reference(999).apply(payload)
    receiver.apply(payload)
    assert receiver.values.tobytes() == sender.values.tobytes()


def test_reference_refuses_bad_input_without_moving() -> None:
    ref = Reference(10)
    x = np.ones(10, np.float32)
    x[3] = np.nan
    with pytest.raises(CodecError, match="index 3"):
        ref.encode_towards(x)
    assert ref.seq == 0 and not ref.values.any()
    with pytest.raises(ValueError, match="11 elements"):
        ref.encode_towards(np.ones(11, np.float32))
    with pytest.raises(ValueError, match="sequence"):
        ref.encode_towards(np.ones(10, np.float32), new_seq=-1)
    with pytest.raises(ValueError, match="read-only"):
        ref.values[0] = 1.0
    copy = ref.copy()
    copy.encode_towards(np.ones(10, np.float32), CodecConfig(scheme="float32"))
    assert not ref.values.any() and copy.values.all()
