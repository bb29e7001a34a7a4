"""A tampered gossipfld for tests: a real daemon whose FedAvg updates are scaled by a factor.

This is what an attacker with a valid certificate would run: the same binary with one line changed.
The uplink residual stays honest (decoding divides the factor back out), so the attack is a clean
"every update times SCALE" rather than a runaway error-feedback loop.

    python tests/byzantine_gossipfld.py SCALE --config node.toml
"""

from __future__ import annotations

import sys

import numpy as np

from gossipfld import follower, main


def run(scale: float, argv: list[str]) -> int:
    encode, decode = follower.encode_delta, follower.decode_delta

    def scaled_encode(delta: np.ndarray, config: object) -> bytes:
        return encode(delta * np.float32(scale), config)

    def honest_decode(payload: bytes, count: int) -> np.ndarray:
        return decode(payload, count) / np.float32(scale)

    follower.encode_delta = scaled_encode  # type: ignore[assignment]
    follower.decode_delta = honest_decode  # type: ignore[assignment]
    return main.main(argv)


if __name__ == "__main__":
    sys.exit(run(float(sys.argv[1]), sys.argv[2:]))
