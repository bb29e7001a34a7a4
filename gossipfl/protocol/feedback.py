"""Error feedback: the reference that a sender and its receiver both hold, moved by exactly what is decoded.

Split from ``codec`` (which codes one delta): a ``Reference`` codes the difference between a vector and
itself, and moves by the very array the receiver's decoder ends with, so lossy coding delays information
rather than dropping it (CHOCO-Gossip). The gossip layer keeps one per peer and direction
(``references.GossipState``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from gossipfl.protocol.codec import (
    DEFAULT_MAX_COUNT,
    CodecConfig,
    check_vector,
    decode_delta,
    encode_parts,
    is_int,
    reconstruct,
)


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
        if not is_int(self.count) or self.count < 0:
            raise ValueError(f"count must be a non-negative integer, got {self.count!r}")
        if not is_int(self.seq) or not 0 <= self.seq <= self._MAX_SEQ:
            raise ValueError(f"seq must be an integer in [0, 2**64), got {self.seq!r}")
        self.count, self.seq = int(self.count), int(self.seq)
        self._values = np.zeros(self.count, np.float32)

    @classmethod
    def from_values(cls, values: np.ndarray, seq: int) -> Reference:
        """A reference that starts from a known vector (for example one restored from a checkpoint)."""
        check_vector(values, "values")
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
        check_vector(x, "x")
        if x.size != self.count:
            raise ValueError(f"x has {x.size} elements, the reference has {self.count}")
        seq = self._next_seq(new_seq)
        delta = x - self._values
        payload, header, arrays = encode_parts(delta, config or CodecConfig())
        decoded = reconstruct(header, arrays)
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
        if not is_int(seq) or not 0 <= seq <= self._MAX_SEQ:
            raise ValueError(f"sequence number must be an integer in [0, 2**64), got {seq!r}")
        return int(seq)
