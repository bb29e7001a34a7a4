"""A tampered gossipfld for tests: a real daemon whose FedAvg updates are scaled by a factor, or a gateway whose
global models are sign-flipped.

This is what an attacker with a valid certificate would run: the same binary with one line changed.
The uplink residual stays honest (the update is coded as usual, then what it decodes to is scaled), so the
attack is a clean "every update times SCALE" rather than a runaway error-feedback loop. ``gateway-flip`` is a
gateway whose certificate was stolen: every global model it sends is the negated one, with an age of 1e12.

    python tests/byzantine_gossipfld.py SCALE --config node.toml
    python tests/byzantine_gossipfld.py gateway-flip --config gateway.toml
"""

from __future__ import annotations

import sys

import numpy as np

from gossipfl.protocol.codec import decode_delta, encode_delta
from gossipfld import main
from gossipfld.follower import Follower
from gossipfld.gateway import Gateway


def flip_gateway(argv: list[str]) -> int:
    honest = Gateway._send_global

    async def flipped(self: Gateway, link, peer_id, number, params, age, *rest):  # type: ignore[no-untyped-def]
        return await honest(self, link, peer_id, number, -params, 1e12, *rest)

    Gateway._send_global = flipped  # type: ignore[method-assign]
    return main.main(argv)


def run(scale: float, argv: list[str]) -> int:
    honest = Follower._code_update

    def scaled(self: Follower, delta: np.ndarray) -> bytes:
        sent = decode_delta(honest(self, delta), delta.size)
        return encode_delta(sent * np.float32(scale), self.codec)

    Follower._code_update = scaled  # type: ignore[method-assign]
    return main.main(argv)


if __name__ == "__main__":
    sys.exit(flip_gateway(sys.argv[2:]) if sys.argv[1] == "gateway-flip" else run(float(sys.argv[1]), sys.argv[2:]))
