"""Tests of gossipfl.protocol.codec and chunks: every bad payload is refused with a named reason, before use."""

from __future__ import annotations

import struct
import tracemalloc

import blosc2
import numpy as np
import pytest

from gossipfl.errors import CodecError
from gossipfl.protocol import codec
from gossipfl.protocol.codec import CodecConfig, decode_delta, encode_delta, read_header

from .payloads import chunk_offsets, resign, set_header

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
