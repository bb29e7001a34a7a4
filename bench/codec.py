"""Codec benchmark: bytes on the wire and speed of every scheme on a 1M-parameter delta.

    .venv/bin/python bench/codec.py [--quick] [--n 1000000] [--repeats 15]

The delta is drawn from N(0, 1e-3), like a model update after a few SGD steps. Speeds are MB of raw
float32 (4 bytes a parameter) per second, the median of several runs, encode and decode each including
everything the real path does (finiteness check, quantization, blosc2, hash; on decode the hash, all the
checks, blosc2 into preallocated memory and the reconstruction). The lossless baseline is blosc2 alone
with its default parameters on the raw float32 bytes, without our header, hash or checks.

Goals (docs/protocol.md): int8 >= 4.5x smaller, topk 1% >= 50x smaller, float32/float16/int8 encode and
decode >= 500 MB/s on a 2-core machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import blosc2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gossipfl.protocol.codec import CodecConfig, decode_delta, encode_delta

GOAL_RATIO = {"int8": 4.5, "topk 1% int8": 50.0, "topk 1% float16": 50.0}
GOAL_SPEED = 500.0  # MB/s, dense schemes
DENSE = ("float32", "float16", "int8")


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up: first-touch page faults and blosc2 thread start are not what we measure
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="parameters in the delta")
    parser.add_argument("--repeats", type=int, default=15, help="timed runs per figure (median)")
    parser.add_argument("--quick", action="store_true", help="3 runs per figure")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    repeats = 3 if args.quick else args.repeats

    x = np.random.default_rng(args.seed).normal(0, 1e-3, args.n).astype(np.float32)
    raw = x.nbytes
    mb = raw / 1e6

    schemes: list[tuple[str, CodecConfig]] = [
        ("float32", CodecConfig(scheme="float32")),
        ("float16", CodecConfig(scheme="float16")),
        ("int8", CodecConfig(scheme="int8")),
        ("topk 1% int8", CodecConfig(scheme="topk", topk_fraction=0.01, topk_values="int8")),
        ("topk 1% float16", CodecConfig(scheme="topk", topk_fraction=0.01, topk_values="float16")),
    ]
    print(
        f"delta: {args.n} float32 ~ N(0, 1e-3), raw {raw} bytes; blosc2 {blosc2.__version__}, "
        f"numpy {np.__version__}; median of {repeats} runs"
    )
    print(f"defaults: {CodecConfig()}")
    header = (
        f"{'scheme':<18}{'bytes':>10}{'ratio':>9}{'enc MB/s':>10}{'dec MB/s':>10}"
        f"{'max |err|':>12}{'rel L2':>9}"
    )
    print(header)
    print("-" * len(header))

    failures: list[str] = []
    results: dict[str, tuple[int, float, float, float]] = {}
    for name, cfg in schemes:
        payload = encode_delta(x, cfg)
        out = decode_delta(payload, args.n)
        enc = mb / median_seconds(lambda cfg=cfg: encode_delta(x, cfg), repeats)
        dec = mb / median_seconds(lambda payload=payload: decode_delta(payload, args.n), repeats)
        err = np.abs(out - x)
        rel = float(np.linalg.norm(out - x) / np.linalg.norm(x))
        ratio = raw / len(payload)
        results[name] = (len(payload), ratio, enc, dec)
        print(
            f"{name:<18}{len(payload):>10}{ratio:>8.2f}x{enc:>10.0f}{dec:>10.0f}{err.max():>12.2e}{rel:>9.4f}"
        )

    # lossless baseline: blosc2 alone, its defaults, on the raw bytes
    cparams = {"typesize": 4}
    base = blosc2.compress2(x, **cparams)
    dst = np.empty_like(x)
    enc = mb / median_seconds(lambda: blosc2.compress2(x, **cparams), repeats)
    dec = mb / median_seconds(lambda: blosc2.decompress2(base, dst=dst), repeats)
    assert dst.tobytes() == x.tobytes()
    print(
        f"{'blosc2 raw f32':<18}{len(base):>10}{raw / len(base):>8.2f}x{enc:>10.0f}{dec:>10.0f}"
        f"{0.0:>12.2e}{0.0:>9.4f}"
    )

    print()
    for name, goal in GOAL_RATIO.items():
        ratio = results[name][1]
        ok = ratio >= goal
        print(f"goal {name} >= {goal:g}x smaller: {ratio:.2f}x {'met' if ok else 'NOT MET'}")
        if not ok:
            failures.append(name)
    for name in DENSE:
        _, _, enc, dec = results[name]
        ok = enc >= GOAL_SPEED and dec >= GOAL_SPEED
        print(
            f"goal {name} encode/decode >= {GOAL_SPEED:g} MB/s: {enc:.0f}/{dec:.0f} "
            f"{'met' if ok else 'NOT MET'}"
        )
        if not ok:
            failures.append(name + " speed")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
