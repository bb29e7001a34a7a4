"""Which peers are alive and whom to gossip with next: bookkeeping only, time passed in.

mDNS cannot tell us in useful time that a peer died (python-zeroconf stretches PTR TTLs to 1125 s),
so liveness is judged by our own exchanges: every failed dial or exchange backs the peer off
exponentially, and after ``failures_to_evict`` in a row it is evicted (not chosen, and reported as
down). An evicted peer is still retried at the longest backoff, so one that comes back is taken back
at its first successful exchange, or at once when mDNS announces it again or it dials us.
"""

from __future__ import annotations

import random
from collections.abc import Collection
from dataclasses import dataclass, field


@dataclass
class PeerStats:
    exchanges: int = 0
    bytes_in: int = 0  # protocol frames
    bytes_out: int = 0
    wire_in: int = 0  # on the socket: TLS records and handshakes included
    wire_out: int = 0
    refusals: dict[str, int] = field(default_factory=dict)
    last_seen: float | None = None


@dataclass
class Peer:
    """A peer as the table knows it. ``key`` is its node id, except for a static address not yet dialled,
    whose identity nobody has proven: it is keyed by its address and has no ``proven_id`` until a dial
    shows which node answers there (``PeerTable.resolved``)."""

    key: bytes
    host: str
    port: int
    source: str  # "mdns", "static" or "inbound"
    role: str = "node"
    fingerprint: bytes | None = None
    failures: int = 0
    next_try: float = 0.0
    evicted: bool = False
    stats: PeerStats = field(default_factory=PeerStats)
    name: str = ""  # its certificate's common name, once TLS showed it: for operators, never an identity
    paused_by_peer: bool = False  # it refused us because its operator paused it: not a failure
    unproven: bool = False  # a static address, keyed by that address until dialled
    verified: bool = False  # an exchange with it succeeded, or it dialled us and passed TLS: not just an advert

    @property
    def proven_id(self) -> bytes | None:
        """The node id a certificate gave (or mDNS announced, to be proven at the dial); None for a static
        address not yet dialled."""
        return None if self.unproven else self.key

    @property
    def label(self) -> str:
        """How logs name the peer: its id's first 12 hex digits, or its address until a dial proves who it is."""
        return self.address if self.unproven else self.key.hex()[:12]

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


class PeerTable:
    """Peers by key. Adverts are claims anyone on the LAN can make: a peer only announced (mDNS) and never
    met is ``verified`` False, at most ``max_unverified`` of them are kept (an evicted one makes room for a
    new one), and the gossip loop gives them at most one of its exchanges in flight, so adverts that point
    into a black hole cannot hold every exchange until its timeout."""

    def __init__(self, period: float, failures_to_evict: int = 3, max_backoff: float = 30.0,
                 max_unverified: int = 32) -> None:
        self.period = period
        self.failures_to_evict = failures_to_evict
        self.max_backoff = max_backoff
        self.max_unverified = max_unverified
        self._peers: dict[bytes, Peer] = {}
        # Blocked ids outlive the peers' entries: a blocked node that is announced again stays blocked.
        self.blocked: set[bytes] = set()

    def __iter__(self):
        return iter(list(self._peers.values()))

    def __len__(self) -> int:
        return len(self._peers)

    def get(self, node_id: bytes) -> Peer | None:
        return self._peers.get(node_id)

    def add_static(self, host: str, port: int, now: float) -> Peer:
        """A configured address; the node behind it is known once a dial proves it. The operator named it, so
        it is no mere advert: it counts as verified."""
        key = f"static:{host}:{port}".encode()
        peer = self._peers.get(key) or Peer(key, host, port, "static", unproven=True, verified=True)
        self._peers[key] = peer
        peer.next_try = now
        return peer

    def resolved(self, static: Peer, node_id: bytes, role: str, now: float) -> Peer:
        """A dial to a static address proved which node listens there: know it by that id from now on."""
        self._peers.pop(static.key, None)
        return self.seen(node_id, static.host, static.port, "static", now, role)

    def _room_for_unverified(self) -> bool:
        unverified = [p for p in self._peers.values() if not p.verified and p.source == "mdns"]
        if len(unverified) < self.max_unverified:
            return True
        evicted = [p for p in unverified if p.evicted]
        if not evicted:
            return False
        self._peers.pop(min(evicted, key=lambda p: p.next_try).key)  # the one longest without an answer
        return True

    def seen(self, node_id: bytes, host: str, port: int, source: str, now: float, role: str = "node",
             fingerprint: bytes | None = None) -> Peer | None:
        """A peer was announced or dialled us: (re)admit it and make it eligible at once. None: an advert of a
        new peer while the table already holds ``max_unverified`` unverified ones, none of them evicted."""
        peer = self._peers.get(node_id)
        if peer is None:
            if source == "mdns" and not self._room_for_unverified():
                return None
            peer = Peer(node_id, host, port, source, role, fingerprint)
            self._peers[node_id] = peer
        else:
            # An inbound connection tells us the peer is up but not where it listens.
            if source != "inbound" or peer.source == "inbound":
                peer.host, peer.port, peer.source = host, port, source
            peer.role = role if source != "inbound" else peer.role
            if fingerprint is not None:
                peer.fingerprint = fingerprint
        peer.failures, peer.next_try, peer.evicted = 0, now, False
        if source == "inbound":
            peer.paused_by_peer = False  # it dialled us: it is not paused any more
        peer.verified = peer.verified or source in ("inbound", "static")  # TLS proved it, or the operator named it
        peer.stats.last_seen = now
        return peer

    def gone(self, node_id: bytes) -> None:
        self._peers.pop(node_id, None)

    def succeeded(self, node_id: bytes, now: float) -> None:
        peer = self._peers.get(node_id)
        if peer is not None:
            peer.failures, peer.next_try, peer.evicted, peer.paused_by_peer = 0, now, False, False
            peer.verified = True
            peer.stats.last_seen = now

    def paused(self, node_id: bytes, now: float) -> None:
        """The peer refused us because its operator paused it: no failure, no eviction; ask again after the
        longest backoff, and show it as paused until it answers or dials us."""
        peer = self._peers.get(node_id)
        if peer is not None:
            peer.paused_by_peer = True
            peer.next_try = now + self.max_backoff

    def failed(self, node_id: bytes, now: float) -> bool:
        """Record a failed dial or exchange; True when this failure evicts the peer."""
        peer = self._peers.get(node_id)
        if peer is None:
            return False
        peer.failures += 1
        peer.next_try = now + min(self.period * 2**peer.failures, self.max_backoff)
        newly = not peer.evicted and peer.failures >= self.failures_to_evict
        peer.evicted = peer.evicted or newly
        return newly

    def is_verified_host(self, host: str) -> bool:
        """Whether a peer we have met lives at ``host``: its connections are not a stranger's."""
        return any(p.verified and p.host == host for p in self._peers.values())

    def is_blocked(self, node_id: bytes) -> bool:
        return node_id in self.blocked

    def live(self) -> list[Peer]:
        return [p for p in self._peers.values()
                if not p.evicted and p.key not in self.blocked and p.source != "inbound"]

    def choose(self, now: float, rng: random.Random, role: str | None = None,
               exclude: Collection[bytes] = (), verified_only: bool = False) -> Peer | None:
        """A random peer that is due, preferring live ones; evicted ones only on their slow retry.

        ``exclude``: peers an exchange is already under way with (a slow one must not be picked twice);
        ``verified_only``: none that is only an advert (the caller already has one of those in flight).
        """
        due = [p for p in self._peers.values()
               if p.next_try <= now and p.key not in self.blocked and p.source != "inbound"
               and (role is None or p.role == role) and p.key not in exclude and (p.verified or not verified_only)]
        if not due:
            return None
        # An evicted peer is due only once its longest backoff has passed: retry it then, before any live
        # one, or a live peer that is always due would starve it (and a healed partition would stay split).
        retry = [p for p in due if p.evicted]
        return rng.choice(retry or due)
