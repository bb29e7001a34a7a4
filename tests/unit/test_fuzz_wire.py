"""Fuzzing of the frame decoder and the codec with a seeded generator (repeatable, and fast enough for
every CI run): 100,000+ mutated, truncated, spliced and random inputs must give only the typed errors,
never another exception, never a crash, and never more memory than the limits allow."""

from __future__ import annotations

import hashlib
import random
import resource
import struct
import time
import tracemalloc
from collections.abc import Callable

import numpy as np

from gossipfl.errors import CodecError, ProtocolError
from gossipfl.protocol import codec, framing, messages
from gossipfl.protocol.codec import CodecConfig, decode_delta, encode_delta
from gossipfl.protocol.framing import FrameDecoder, Limits

N_ELEMENTS = 512  # the model size the fuzzed peers agree on
LIMITS = Limits.for_model(N_ELEMENTS, read_size=1 << 16)
INTERESTING = [
    0,
    1,
    2,
    7,
    8,
    16,
    31,
    32,
    127,
    128,
    255,
    256,
    4095,
    4096,
    2**15,
    2**16 - 1,
    2**16,
    2**31 - 1,
    2**31,
    2**32 - 1,
    2**32,
    2**63 - 1,
    2**63,
    2**64 - 1,
]


def build_corpus() -> tuple[list[bytes], list[bytes]]:
    rng = np.random.default_rng(42)
    x = rng.normal(0, 1e-2, N_ELEMENTS).astype(np.float32)
    configs = [
        CodecConfig(scheme="float32"),
        CodecConfig(scheme="float32", blosc_codec="lz4", shuffle="bitshuffle"),
        CodecConfig(scheme="float16"),
        CodecConfig(scheme="int8", int8_block=64),
        CodecConfig(scheme="int8", int8_block=64, blosc_codec="blosclz"),
        CodecConfig(scheme="topk", topk_fraction=0.05, int8_block=64),
        CodecConfig(scheme="topk", topk_fraction=0.2, topk_values="float16", blosc_codec="lz4hc"),
        CodecConfig(scheme="int8", int8_block=64, chunk_bytes=4096),
    ]
    payloads = [encode_delta(x, c) for c in configs]
    payloads.append(encode_delta(np.zeros(N_ELEMENTS, np.float32), CodecConfig(scheme="float32")))
    node = bytes(range(32))
    frames = [
        framing.encode(messages.Hello(node, 1, node[::-1], "node", ("int8", "topk", "push-pull"))),
        framing.encode(messages.Hello(node, 1, node, "gateway")),
        framing.encode(messages.NeedFull(12)),
        framing.encode(messages.Ack(13)),
        framing.encode(messages.Ping(2**63)),
        framing.encode(messages.Pong(7)),
        framing.encode(messages.Error(3, "payload hash mismatch")),
    ]
    for i, p in enumerate(payloads):
        frames.append(framing.encode(messages.ModelDelta(i, i + 1, 1234.5, 64, p)))
        frames.append(framing.encode(messages.GatewayRound(i, i, i + 2, float(i), 30.0, 1, p)))
        frames.append(framing.encode(messages.GatewayUpdate(i, i, 64, float(i), p)))
    return frames, payloads


def mutate(r: random.Random, data: bytes, corpus: list[bytes]) -> bytes:
    """One to four random edits, weighted towards the header bytes where parsers go wrong."""
    buf = bytearray(data)
    for _ in range(r.choice((1, 1, 1, 2, 4))):
        op = r.randrange(9)
        n = len(buf)
        hot = min(n, 96)  # prefix, header and the start of a payload
        if op == 0 and n:  # flip a bit
            i = r.randrange(hot) if r.random() < 0.7 else r.randrange(n)
            buf[i] ^= 1 << r.randrange(8)
        elif op == 1 and n:  # random byte
            i = r.randrange(hot) if r.random() < 0.7 else r.randrange(n)
            buf[i] = r.randrange(256)
        elif op == 2 and n >= 8:  # an interesting integer over a length or count field
            i = r.randrange(max(1, hot - 8))
            width, fmt = r.choice(((1, "<B"), (2, "<H"), (4, "<I"), (8, "<Q")))
            v = r.choice(INTERESTING) & ((1 << (8 * width)) - 1)
            struct.pack_into(fmt, buf, min(i, n - width), v)
        elif op == 3:  # truncate
            del buf[r.randrange(n + 1) :]
        elif op == 4 and n:  # delete a range
            i = r.randrange(n)
            del buf[i : i + r.randrange(1, 64)]
        elif op == 5:  # insert random bytes
            i = r.randrange(n + 1)
            buf[i:i] = r.randbytes(r.randrange(1, 32))
        elif op == 6:  # splice with another corpus entry
            other = r.choice(corpus)
            buf = buf[: r.randrange(n + 1)] + other[r.randrange(len(other) + 1) :]
        elif op == 7 and n:  # duplicate a range
            i = r.randrange(n)
            buf[i:i] = buf[i : i + r.randrange(1, 64)]
        else:  # zero a range
            i = r.randrange(n + 1)
            buf[i : i + r.randrange(1, 16)] = bytes(len(buf[i : i + 16]))[: r.randrange(1, 16)]
    return bytes(buf)


def chunk_spans(payload: bytes) -> list[tuple[int, int]]:
    header = codec.read_header(payload)
    n = sum(-(-s.nbytes // header.chunk_bytes) for s in header.sections())
    sizes = struct.unpack_from(f"<{n}I", payload, codec.HEADER_SIZE)
    pos = codec.HEADER_SIZE + 4 * n
    spans = []
    for size in sizes:
        spans.append((pos, size))
        pos += size
    return spans


def mutate_chunk(r: random.Random, payload: bytes) -> bytes:
    """Same-length edits inside one blosc2 chunk (mostly its header, block starts and stream sizes),
    re-signed: this is what reaches blosc2's decompressor with a crafted chunk."""
    buf = bytearray(payload)
    spans = chunk_spans(payload)
    if not spans:
        return payload
    off, size = r.choice(spans)
    for _ in range(r.choice((1, 1, 2, 3, 8))):
        i = off + (r.randrange(min(size, 80)) if r.random() < 0.6 else r.randrange(size))
        if r.random() < 0.5:
            buf[i] ^= 1 << r.randrange(8)
        else:
            buf[i] = r.choice((0, 1, 0x7F, 0x80, 0xFF, r.randrange(256)))
    return resign(bytes(buf))


def resign(buf: bytes) -> bytes:
    """Give a mutated payload a valid digest, so that the fuzzing reaches the checks behind the hash
    and blosc2 itself (a peer can always compute a matching hash)."""
    if len(buf) < codec.DIGEST_SIZE:
        return buf
    body = buf[: -codec.DIGEST_SIZE]
    return body + hashlib.sha256(body).digest()[: codec.DIGEST_SIZE]


def run_frame_case(r: random.Random, data: bytes, counts: dict[str, int]) -> None:
    dec = FrameDecoder(LIMITS)
    try:
        pos = 0
        while pos < len(data):  # random read sizes, draining after each as the daemon does
            step = r.choice((1, 7, 64, 4096, len(data)))
            dec.feed(data[pos : pos + step])
            pos += step
            for message in dec:
                counts["messages"] += 1
                payload = getattr(message, "payload", None)
                if payload is not None:
                    try:
                        out = decode_delta(payload, N_ELEMENTS, max_count=LIMITS.max_element_count)
                    except CodecError:
                        counts["codec_errors"] += 1
                    else:
                        assert out.shape == (N_ELEMENTS,) and np.isfinite(out).all()
                assert dec.buffered <= LIMITS.max_buffered
        dec.feed_eof()
    except ProtocolError:
        counts["protocol_errors"] += 1


def run_payload_case(data: bytes, counts: dict[str, int]) -> None:
    try:
        out = decode_delta(data, N_ELEMENTS, max_count=LIMITS.max_element_count)
    except CodecError:
        counts["codec_errors"] += 1
    else:
        counts["payloads_decoded"] += 1
        assert out.dtype == np.float32 and out.shape == (N_ELEMENTS,) and np.isfinite(out).all()


def make_cases(seed: int, total: int) -> list[tuple[str, Callable[[random.Random], bytes]]]:
    frames, payloads = build_corpus()
    corpus = frames + payloads
    r = random.Random(seed)
    gens: list[tuple[str, Callable[[random.Random], bytes]]] = [
        ("frame", lambda r: mutate(r, r.choice(frames), corpus)),
        ("frame", lambda r: mutate(r, b"".join(r.choices(frames, k=3)), corpus)),
        ("frame", lambda r: r.choice(frames)[: r.randrange(len(r.choice(frames)) + 1)]),
        ("frame", lambda r: b"GF\x01" + r.randbytes(r.randrange(0, 200))),
        ("frame", lambda r: r.randbytes(r.randrange(0, 300))),
        ("payload", lambda r: mutate(r, r.choice(payloads), payloads)),
        ("payload", lambda r: resign(mutate(r, r.choice(payloads), payloads))),
        ("payload", lambda r: mutate_chunk(r, r.choice(payloads))),
        ("payload", lambda r: mutate_chunk(r, r.choice(payloads))),
        ("payload", lambda r: r.choice(payloads)[: r.randrange(len(r.choice(payloads)) + 1)]),
        ("payload", lambda r: resign(b"GFLD\x01" + r.randbytes(r.randrange(0, 200)))),
    ]
    return [gens[r.randrange(len(gens))] for _ in range(total)]


def test_fuzz_frames_and_payloads_give_only_typed_errors_within_memory_limits() -> None:
    total = 100_000
    r = random.Random(20240601)
    cases = make_cases(1, total)
    counts = dict.fromkeys(("messages", "protocol_errors", "codec_errors", "payloads_decoded"), 0)
    kinds = {"frame": 0, "payload": 0}
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    started = time.monotonic()
    traced_peak = 0
    for i, (kind, gen) in enumerate(cases):
        data = gen(r)
        kinds[kind] += 1
        if i == 1000:
            tracemalloc.start()  # python-level allocations (numpy arrays included) of a slice of the run
        if kind == "frame":
            run_frame_case(r, data, counts)
        else:
            run_payload_case(data, counts)
        if i == 6000:
            traced_peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
    elapsed = time.monotonic() - started
    rss_growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before

    assert sum(kinds.values()) == total
    assert kinds["frame"] > 35_000 and kinds["payload"] > 45_000
    # the mutations do reach every layer: some frames parse, some payloads fail deep, some decode
    assert counts["messages"] > 1000
    assert counts["protocol_errors"] > 10_000
    assert counts["codec_errors"] > 10_000
    assert counts["payloads_decoded"] > 0
    # memory: one buffered frame, its copy as a payload, the decoded sections and output; far below
    # what an unchecked length field (up to 2**64) would have asked for
    bound = 4 * LIMITS.max_buffered + 16 * N_ELEMENTS * 4
    assert traced_peak < bound, (traced_peak, bound)
    assert rss_growth < 64 * 2**20, rss_growth
    assert elapsed < 120, f"fuzzing took {elapsed:.0f} s"


def test_fuzzed_payloads_with_valid_hash_never_leak_uninitialized_memory() -> None:
    """blosc2 special chunks could leave the destination untouched; decoding twice into fresh memory
    must give the same result for every payload that decodes at all."""
    r = random.Random(7)
    _, payloads = build_corpus()
    decoded = 0
    for i in range(3000):
        base = r.choice(payloads)
        data = mutate_chunk(r, base) if i % 3 else resign(mutate(r, base, payloads))
        try:
            a = decode_delta(data, N_ELEMENTS)
        except CodecError:
            continue
        np.empty(N_ELEMENTS * 4, np.uint8).fill(0xAB)  # dirty the allocator's free memory
        b = decode_delta(data, N_ELEMENTS)
        assert a.tobytes() == b.tobytes()
        decoded += 1
    assert decoded > 0


def test_a_single_flipped_payload_byte_never_decodes() -> None:
    """Without the hash, most flipped bytes in a blosc2 chunk decode silently to wrong numbers."""
    _, payloads = build_corpus()
    r = random.Random(3)
    for _ in range(5000):
        p = bytearray(r.choice(payloads))
        i = r.randrange(len(p))
        p[i] ^= 1 << r.randrange(8)
        try:
            decode_delta(bytes(p), N_ELEMENTS)
        except CodecError as exc:
            assert i < 5 or "hash mismatch" in str(exc)
        else:
            raise AssertionError(f"flipped byte {i} went unnoticed")
