"""What the clipped merge rule remembers between merges: the age each peer may claim, and the distances that
set the clipping radius. Pure bookkeeping; time is passed in.

A certified peer can still be compromised, and what it claims bounds nothing by itself. So:

- its age (the weight of the age-weighted merge) is believed only up to what it could have trained since we
  first saw it: at first sight no more than our own age, then ``max_age_rate`` samples a second on top. A
  claim of 1e300 right after a restart once replaced a node's model;
- the step towards its model is cut to a radius of ``radius_factor`` times the median distance of recent
  merges (never below ``floor`` of our own model's norm, since agreeing nodes drive that median towards zero),
  so a far-away model moves us a bounded step instead of being refused: an honest newcomer is merged, a
  sign-flipped model cannot drag us away;
- a peer whose models keep landing beyond the radius loses trust, and its share shrinks with it (halved at
  each clipped merge, given back a tenth at each merge within the radius): clipping alone bounds one step,
  but a sign-flipping member, clipped every time, still pulled the same way at every merge and, in
  bench/byzantine.py, cost the honest nodes 13 points; an honest newcomer, far only until it has merged a
  few times, earns its share back;
- only merges that moved the model enter the history (pushes of age 0 once walked the outlier rule's median
  upwards), and what enters is the clipped distance, so no peer widens the radius faster than the median of
  everyone's merges allows. The history survives restarts (``state`` / ``restore``).
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any

import numpy as np

from gossipfl.learning.merge import MAX_AGE, Merged

HISTORY = 32
MAX_PEERS = 1024
TRUST_KEEP = 0.5  # the share of its trust a peer keeps after a clipped merge
TRUST_GAIN = 0.1  # the trust a peer earns back at each merge within the radius


@dataclass
class _PeerRecord:
    seen_at: float | None  # when first seen; None: "at its first merge after a restart"
    age_then: float  # the age it may claim then
    trust: float = 1.0  # the share of max_share it gets


@dataclass(frozen=True)
class ClipSettings:
    max_share: float = 0.5  # the largest share one merge gives a peer's model
    radius_factor: float = 1.5
    max_age_rate: float = 1e5  # samples a second a peer may have trained since we first saw it
    min_history: int = 5  # merges before a radius is set
    bootstrap_share: float = 0.1  # the largest share while there is no radius yet
    floor: float = 0.05  # the radius is never below this share of our own model's norm


class MergeGuard:
    def __init__(self, settings: ClipSettings) -> None:
        self.settings = settings
        self.distances: deque[float] = deque(maxlen=HISTORY)
        self._peers: OrderedDict[bytes, _PeerRecord] = OrderedDict()

    def believed_age(self, peer: bytes, claimed: float, local_age: float, now: float) -> float:
        """The part of ``claimed`` we believe: no more than our own age at first sight, and then no more than
        ``max_age_rate`` samples a second since."""
        claimed = min(max(claimed, 0.0), MAX_AGE) if math.isfinite(claimed) else 0.0
        record = self._peers.get(peer)
        if record is None:
            record = self._peers[peer] = _PeerRecord(now, min(claimed, local_age))
            while len(self._peers) > MAX_PEERS:
                self._peers.popitem(last=False)
        elif record.seen_at is None:
            record.seen_at = now
        self._peers.move_to_end(peer)
        assert record.seen_at is not None
        return min(claimed, record.age_then + self.settings.max_age_rate * max(now - record.seen_at, 0.0))

    def share(self, peer: bytes) -> float:
        """The largest share of one merge ``peer`` gets now: ``max_share`` times its trust, and no more than
        ``bootstrap_share`` while too few merges have set a radius: a node that has just started cannot yet
        tell a far model from an honest one, and a constant model merged at half weight in a node's first
        merges cost the honest nodes 3.5 points in bench/byzantine.py."""
        record = self._peers.get(peer)
        cap = self.settings.max_share if len(self.distances) >= self.settings.min_history else min(
            self.settings.max_share, self.settings.bootstrap_share)
        return cap * (record.trust if record is not None else 1.0)

    def radius(self, local_norm: float) -> float | None:
        """How far one merge may reach, or None while there is too little history to say."""
        if len(self.distances) < self.settings.min_history:
            return None
        return self.settings.radius_factor * max(float(np.median(self.distances)), self.settings.floor * local_norm)

    def record(self, peer: bytes, merged: Merged, radius: float | None) -> None:
        if merged.moved > 0:
            self.distances.append(merged.distance if radius is None else min(merged.distance, radius))
        record = self._peers.get(peer)
        if record is not None and radius is not None:
            record.trust = record.trust * TRUST_KEEP if merged.clipped else min(1.0, record.trust + TRUST_GAIN)

    # ------------------------------------------------------------------ across restarts

    def state(self, now: float) -> dict[str, Any]:
        """For the checkpoint: the distances, and each peer's believable age as of ``now`` and its trust."""
        ages = {peer.hex(): self.believed_age(peer, MAX_AGE, MAX_AGE, now) for peer in list(self._peers)}
        trust = {peer.hex(): record.trust for peer, record in self._peers.items()}
        return {"distances": list(self.distances), "ages": ages, "trust": trust}

    def restore(self, state: Any) -> int:
        """Take back what ``state`` saved (entries that do not parse are skipped); returns how many peers. A
        restored peer's clock starts at its first merge after the restart."""
        if not isinstance(state, dict):
            return 0
        distances = state.get("distances", [])
        if isinstance(distances, list):
            self.distances.extend(float(d) for d in distances[-HISTORY:]
                                  if isinstance(d, int | float) and math.isfinite(d) and d >= 0)
        ages, trust = state.get("ages", {}), state.get("trust", {})
        trust = trust if isinstance(trust, dict) else {}
        for key, age in (ages.items() if isinstance(ages, dict) else []):
            try:
                peer = bytes.fromhex(key)
            except (TypeError, ValueError):
                continue
            if len(peer) == 32 and isinstance(age, int | float) and math.isfinite(age) and age >= 0:
                kept = trust.get(key, 1.0)
                kept = float(kept) if isinstance(kept, int | float) and 0 <= kept <= 1 else 1.0
                self._peers[peer] = _PeerRecord(None, min(float(age), MAX_AGE), kept)
        return len(self._peers)
