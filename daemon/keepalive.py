"""Gossip connections kept open between exchanges with a peer, on the dialler's side.

A new connection costs a TCP handshake and a mutual TLS 1.3 handshake with two certificates: 2.7 kB on the
wire (bench/handshake.py) and a signature and a verification at each end, as much as the int8 delta of a
2,410-parameter model. A peer that offered ``keep-alive`` in its Hello takes the next push on the connection
of the last one, so the handshake is paid once per connection instead of once per exchange.

Bounded: at most ``limit`` idle connections, each for at most ``idle`` seconds, the oldest closed first; a
connection is used by one exchange at a time (it is taken out while in use). A kept connection may have been
closed by the peer meanwhile (its own idle time, a restart, a slot it needed): the dialler finds out at its
first write or read, before any answer, and dials anew (``Gossip._exchange``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from .link import Link
from .peering import Met

Closer = Callable[[bytes, Link], Awaitable[None]]


@dataclass
class Kept:
    link: Link
    met: Met
    since: float  # when it went idle, trio time


class KeptConnections:
    """Idle connections by peer id; ``close`` (given by the owner) closes one and accounts its last bytes."""

    def __init__(self, idle: float, limit: int, close: Closer) -> None:
        self.idle = idle
        self.limit = limit
        self._close = close
        self._kept: dict[bytes, Kept] = {}  # insertion order: the oldest idle first

    @property
    def enabled(self) -> bool:
        return self.idle > 0 and self.limit > 0

    def __len__(self) -> int:
        return len(self._kept)

    def take(self, peer_id: bytes, now: float) -> Kept | None:
        """The idle connection to ``peer_id``, taken out for one exchange; None when there is none fresh (an
        expired one is left for ``close_expired``)."""
        kept = self._kept.get(peer_id)
        if kept is None or now - kept.since >= self.idle:
            return None
        del self._kept[peer_id]
        return kept

    async def keep(self, peer_id: bytes, link: Link, met: Met, now: float) -> None:
        """Keep ``link`` for the next exchange with ``peer_id``; past the limit, the oldest idle one closes."""
        old = self._kept.pop(peer_id, None)
        self._kept[peer_id] = Kept(link, met, now)
        if old is not None:  # cannot happen while one exchange per peer runs at a time; closed all the same
            await self._close(peer_id, old.link)
        while len(self._kept) > self.limit:
            oldest = next(iter(self._kept))
            await self._close(oldest, self._kept.pop(oldest).link)

    async def close_expired(self, now: float) -> None:
        for peer_id in [p for p, k in self._kept.items() if now - k.since >= self.idle]:
            await self._close(peer_id, self._kept.pop(peer_id).link)

    async def close_all(self) -> None:
        while self._kept:
            peer_id, kept = self._kept.popitem()
            await self._close(peer_id, kept.link)

    async def run(self) -> None:
        """Close connections that have been idle too long, until cancelled; then close them all."""
        try:
            while True:
                await trio.sleep(max(self.idle / 4, 0.05))
                await self.close_expired(trio.current_time())
        finally:
            with trio.CancelScope(shield=True):
                await self.close_all()
