"""Tests of gossipfl.protocol.codec and quantize: round trips with error bounds, and what the encoder refuses."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from gossipfl.errors import CodecError, ConfigError
from gossipfl.protocol import quantize
from gossipfl.protocol.codec import CodecConfig, decode_delta, encode_delta, read_header

from .payloads import chunk_offsets

F16_MAX = 65504.0


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
