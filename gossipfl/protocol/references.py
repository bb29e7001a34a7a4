"""Per-peer delta references for asynchronous gossip, as a state machine with no I/O.

For every peer j, node i keeps two references (``feedback.Reference``), each with a sequence number:

- ``outgoing[j]``: the copy of i's model that j holds. A push codes ``x_i - outgoing[j]``; with error
  feedback the reference moves by exactly what j decodes, so what a lossy scheme drops from one
  message is sent in a later one.
- ``incoming[j]``: i's reconstruction of j's model, moved by every delta j sends.

A message names the base sequence it is a delta against. A receiver whose ``incoming[j]`` is not at
that sequence (it restarted, evicted j from its table, or lost a message) answers need-full, and the
sender resets ``outgoing[j]`` to zeros and sends the whole model (base 0). Both sides change their
references only when the exchange completes (``commit_*``), so a dropped connection leaves both at
the old sequence or, at worst, makes the next message answer need-full: never silently diverged.

The number of peers with references is bounded; the least recently used go first.

A chain of references starts at a full model (base 0) whose new sequence number is drawn at random, and
then counts up by one. So a reference restored from disk after a crash (``dump``/``restore``) that is
older than what the peer holds can never carry the same sequence number as the peer's with other
contents: a stale restore meets need-full, never a silently wrong base. (Counting every chain from 1
would let a chain that restarted after a lost ack climb back to a stale copy's number.)
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
import struct
from collections import OrderedDict, deque
from dataclasses import dataclass

import numpy as np

from gossipfl.errors import CodecError, RefusedByUs
from gossipfl.learning.merge import update_norm_is_outlier
from gossipfl.protocol.codec import CodecConfig
from gossipfl.protocol.feedback import Reference

NORM_HISTORY = 32
# The outlier rule never takes the recent median distance to be below this share of our own model's norm:
# with the default factor 10, a model within half our norm's distance is never refused as an outlier.
OUTLIER_FLOOR = 0.05
CHAIN_START_BITS = 62  # a full model's new_seq is random in [1, 2**62): room to count up, never near 2**64
_DUMP_MAGIC = b"GFLREF\x00\x01"
_DUMP_HEADER = struct.Struct("<8s32sQI")  # magic, model fingerprint, parameter count, entries
_DUMP_ENTRY = struct.Struct("<B32sQ")  # direction (0 outgoing, 1 incoming), peer id, sequence
_DIGEST = 32


@dataclass
class Push:
    """A coded delta ready to send; ``commit_push`` adopts ``reference`` once the peer acknowledged."""

    peer: bytes
    base_seq: int
    new_seq: int
    payload: bytes
    reference: Reference


@dataclass
class Received:
    """A decoded model from a peer, not yet adopted; ``commit_receive`` adopts it."""

    peer: bytes
    reference: Reference
    distance: float

    @property
    def model(self) -> np.ndarray:
        return self.reference.values


class NeedFull(Exception):
    """The delta's base is not the reference we hold for that peer: ask for the full model."""

    def __init__(self, base_seq: int, held_seq: int | None) -> None:
        self.base_seq, self.held_seq = base_seq, held_seq
        super().__init__(f"no reference at sequence {base_seq} (holding {held_seq})")


class _LRU(OrderedDict[bytes, Reference]):
    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def touch(self, key: bytes, value: Reference) -> None:
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.limit:
            self.popitem(last=False)


def _full_model_codec(codec: CodecConfig) -> CodecConfig:
    """How a whole model (base 0) is coded. A receiver merges its reconstruction of the model, so that
    must be the whole model from the first message: top-k of a model against zero would hand it 1% of
    our weights and 99% zeros to average with its own (measured: gossip with topk ended 10 points
    under central training). The scheme of top-k's values (int8 by default) carries every weight
    instead; the deltas after it are top-k again."""
    return dataclasses.replace(codec, scheme=codec.topk_values) if codec.scheme == "topk" else codec


class GossipState:
    def __init__(self, count: int, codec: CodecConfig, max_peers: int = 16, outlier_factor: float = 10.0,
                 rng: random.Random | None = None) -> None:
        self.count = count
        self.rng = rng or random.SystemRandom()
        self.codec = codec
        self.full_codec = _full_model_codec(codec)
        self.outlier_factor = outlier_factor
        self.outgoing = _LRU(max_peers)
        self.incoming = _LRU(max_peers)
        self.recent_distances: deque[float] = deque(maxlen=NORM_HISTORY)

    # ---------------------------------------------------------------- sending

    def prepare_push(self, peer: bytes, params: np.ndarray, full: bool = False) -> Push:
        """Code our model for ``peer`` against what it holds (or against zero when ``full``)."""
        held = None if full else self.outgoing.get(peer)
        reference = Reference(self.count, 0) if held is None else held.copy()
        base = reference.seq
        new = base + 1 if base else self.rng.randrange(1, 1 << CHAIN_START_BITS)
        payload = reference.encode_towards(params, self.codec if base else self.full_codec, new_seq=new)
        return Push(peer, base, new, payload, reference)

    def commit_push(self, push: Push) -> None:
        self.outgoing.touch(push.peer, push.reference)

    def forget(self, peer: bytes) -> None:
        """The peer lost our reference (need-full) or is gone: start again from zero."""
        self.outgoing.pop(peer, None)
        self.incoming.pop(peer, None)

    # ---------------------------------------------------------------- receiving

    def receive(self, peer: bytes, base_seq: int, new_seq: int, payload: bytes, local: np.ndarray) -> Received:
        """Decode a delta from ``peer``. Raises NeedFull, or RefusedByUs: ``sequence``, ``codec`` (a payload
        that is malformed, corrupt or not finite) or ``outlier``."""
        if new_seq == 0 or (base_seq != 0 and new_seq != base_seq + 1):
            raise RefusedByUs("sequence", f"new sequence {new_seq} does not follow base {base_seq}")
        held = self.incoming.get(peer)
        if base_seq == 0:
            reference = Reference(self.count, 0)
        elif held is not None and held.seq == base_seq:
            reference = held.copy()
        else:
            raise NeedFull(base_seq, None if held is None else held.seq)
        try:
            reference.apply(payload, new_seq=new_seq)  # CodecError on anything malformed, NaN or Inf
        except CodecError as exc:
            raise RefusedByUs("codec", str(exc)) from exc
        distance = float(np.linalg.norm(reference.values - local))
        if not np.isfinite(distance):
            raise RefusedByUs("codec", "decoded model is not finite")
        floor = OUTLIER_FLOOR * float(np.linalg.norm(local))
        if update_norm_is_outlier(distance, list(self.recent_distances), self.outlier_factor, floor=floor):
            median = max(float(np.median(self.recent_distances)), floor)  # what the rule compared against
            raise RefusedByUs("outlier", f"model is {distance:.3g} away, recent median {median:.3g}")
        return Received(peer, reference, distance)

    def commit_receive(self, received: Received) -> None:
        self.incoming.touch(received.peer, received.reference)
        self.recent_distances.append(received.distance)

    # ---------------------------------------------------------------- persistence

    def frozen(self) -> GossipState:
        """A copy of the tables that shares their references, to ``dump`` from a worker thread while gossip
        goes on: a committed reference is never changed in place, only replaced by a new one."""
        copy = GossipState(self.count, self.codec, self.outgoing.limit, self.outlier_factor, self.rng)
        copy.outgoing.update(self.outgoing)
        copy.incoming.update(self.incoming)
        return copy

    @property
    def max_dump_bytes(self) -> int:
        """The largest ``dump`` these tables can make: what a reader may read of a references file."""
        entries = self.outgoing.limit + self.incoming.limit
        return _DUMP_HEADER.size + entries * (_DUMP_ENTRY.size + 4 * self.count) + _DIGEST

    def dump(self, fingerprint: bytes) -> bytes:
        """Every reference, least recently used first, for a restart to resume deltas without need-full.

        Call it on the thread that commits, or on a ``frozen`` copy from any thread. A SHA-256 of the whole
        closes the file, so a torn or flipped file is refused by ``restore``, not half-believed.
        """
        entries = [(0, peer, ref) for peer, ref in self.outgoing.items()]
        entries += [(1, peer, ref) for peer, ref in self.incoming.items()]
        parts = [_DUMP_HEADER.pack(_DUMP_MAGIC, fingerprint, self.count, len(entries))]
        for direction, peer, ref in entries:
            parts += [_DUMP_ENTRY.pack(direction, peer, ref.seq), ref.values.tobytes()]
        body = b"".join(parts)
        return body + hashlib.sha256(body).digest()

    def restore(self, data: bytes, fingerprint: bytes) -> int:
        """Adopt the references of a ``dump`` of this model; returns how many. CodecError names what is off.

        The file is local state, but checked like a peer's frame: magic, model, sizes, digest, finite values.
        Nothing is adopted unless all of it is good.
        """
        view = memoryview(data)
        if len(view) < _DUMP_HEADER.size + _DIGEST:
            raise CodecError(f"references: {len(view)} bytes is shorter than a header")
        if hashlib.sha256(view[:-_DIGEST]).digest() != bytes(view[-_DIGEST:]):
            raise CodecError("references: digest mismatch (torn or corrupted file)")
        magic, model, count, entries = _DUMP_HEADER.unpack_from(view)
        if magic != _DUMP_MAGIC:
            raise CodecError("references: not a gossipfl references file (or another version)")
        if model != fingerprint or count != self.count:
            raise CodecError("references: saved for another model")
        entry_size = _DUMP_ENTRY.size + 4 * count
        if len(view) != _DUMP_HEADER.size + entries * entry_size + _DIGEST:
            raise CodecError(f"references: {len(view)} bytes do not hold {entries} references of {count} values")
        tables: tuple[_LRU, _LRU] = (_LRU(self.outgoing.limit), _LRU(self.incoming.limit))
        offset = _DUMP_HEADER.size
        for _ in range(entries):
            direction, peer, seq = _DUMP_ENTRY.unpack_from(view, offset)
            values = np.frombuffer(view, np.float32, count, offset + _DUMP_ENTRY.size)
            offset += entry_size
            if direction not in (0, 1) or seq == 0:
                raise CodecError(f"references: bad entry (direction {direction}, sequence {seq})")
            if not np.all(np.isfinite(values)):
                raise CodecError("references: a reference is not finite")
            tables[direction].touch(peer, Reference.from_values(values, seq))
        self.outgoing, self.incoming = tables
        return entries
