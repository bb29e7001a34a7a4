"""The peer listener: accept, meet (TLS, identity, Hellos, admission), then hand the connection to whoever
registered for its first message.

Gossip registers for ``ModelDelta`` and the follower for ``GatewayRound``; the listener imports neither
(Syncthing's protocol/model split), so each can be read and tested on its own. A handler owns its link until
it returns, and bounds its own time (a round's local epochs take longer than a push).

Bounds: two pools of connections. Addresses where a peer we have met lives share ``limits.max_connections``,
at most half of them from one address (so a host flooding the port cannot starve the others); any other
address is a stranger until it proves itself, and strangers share a small pool of their own (a quarter of
that, at least 8), so idle connections from hosts without a certificate never take the slots of proven
peers. (No per-address share among strangers: nodes started together on one address, as on loopback, meet
each other first as strangers.) The TLS handshake must end within ``limits.connect_timeout``; the Hellos and
the first message after them, within the read timeout each.

Keep-alive: a gossip exchange that ended where another may follow (the conversation's table says where)
leaves the connection open for the peer's next push, for ``gossip.keep_alive`` plus the read timeout; the
peer is admitted again at each exchange. An idle kept connection holds its slot only until a new connection
needs it: when a pool (or a host's share) is full, the oldest idle one is closed to make room.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable

import trio

from gossipfl.config import LimitsSection
from gossipfl.errors import ConfigError, LinkBroken, RefusedByUs
from gossipfl.metrics import Counters
from gossipfl.protocol import framing, messages
from gossipfl.protocol.peers import PeerTable

from .link import EXCHANGE_FAILURES, Link, failure_reason
from .logs import fields
from .peering import Admission, Met, meet, readmit, server_link
from .reporting import account, refusal, short

log = logging.getLogger("gossipfld.listener")

# A handler serves one exchange; it may return a message it read that begins the next one (kept alive).
Handler = Callable[[Link, bytes, messages.Message], Awaitable[messages.Message | None]]


class Listener:
    def __init__(self, admission: Admission, peers: PeerTable, counters: Counters, limits: LimitsSection,
                 wire_limits: framing.Limits, keep_alive: float = 0.0) -> None:
        self.admission = admission
        self.peers = peers
        self.counters = counters
        self.limits = limits
        self.wire_limits = wire_limits
        self.handlers: dict[type[messages.Message], Handler] = {}
        self.open_connections = 0
        self.open_by_host: dict[str, int] = {}
        self.strangers = 0  # connections from addresses of no peer we have met
        self.strangers_by_host: dict[str, int] = {}
        self.keep_alive = keep_alive  # seconds (plus the read timeout) an idle gossip connection is kept
        self._idle: dict[trio.CancelScope, tuple[bool, str]] = {}  # kept-alive connections waiting: pool, host

    @property
    def serving(self) -> int:
        """Connections being served now, from peers and strangers."""
        return self.open_connections + self.strangers

    @property
    def busy(self) -> int:
        """Connections in an exchange now (not waiting, kept alive, for the peer's next push)."""
        return self.serving - len(self._idle)

    @property
    def stranger_pool(self) -> int:
        return max(8, self.limits.max_connections // 4)

    def handle(self, kind: type[messages.Message], handler: Handler) -> None:
        """Connections whose first message after the Hellos is a ``kind`` go to ``handler``."""
        self.handlers[kind] = handler

    async def serve(self, address: str, port: int, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
                    ) -> None:
        try:
            listeners = await trio.open_tcp_listeners(port, host=address)
        except OSError as exc:
            raise ConfigError(f"listen: cannot listen on {address}:{port}: {exc.strerror}") from None
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, self._admit, listeners)
            task_status.started(listeners[0].socket.getsockname()[1])

    def _remote(self, tcp: trio.SocketStream) -> str:
        try:
            return str(tcp.socket.getpeername()[0])
        except OSError:  # reset before we got to it
            return ""

    async def _admit(self, tcp: trio.SocketStream) -> None:
        await self.serve_connection(tcp, self._remote(tcp))

    async def serve_connection(self, tcp: trio.abc.Stream, remote: str) -> None:
        """One accepted connection from ``remote``, to its end; never raises for what the peer did."""
        known = bool(remote) and self.peers.is_verified_host(remote)
        count, by_host, pool = ((self.open_connections, self.open_by_host, self.limits.max_connections) if known
                                else (self.strangers, self.strangers_by_host, self.stranger_pool))
        host_full = known and by_host.get(remote, 0) >= (pool + 1) // 2
        if not remote or ((count >= pool or host_full)
                          and not self._evict_idle(known, remote if host_full else None)):
            self.counters.add("refused.overloaded")
            await tcp.aclose()
            return
        self._count(known, remote, +1)
        try:
            await self._handle(tcp, remote, known)
        finally:
            self._count(known, remote, -1)

    def _count(self, known: bool, remote: str, step: int) -> None:
        if known:
            self.open_connections += step
            by_host = self.open_by_host
        else:
            self.strangers += step
            by_host = self.strangers_by_host
        by_host[remote] = by_host.get(remote, 0) + step
        if not by_host[remote]:
            del by_host[remote]

    async def _handle(self, tcp: trio.abc.Stream, remote: str, known: bool) -> None:
        link = server_link(tcp, self.admission, self.wire_limits, self.limits.read_timeout, self.counters)
        peer_id = b""
        unaccounted = False  # an exchange began whose bytes are not yet accounted
        try:
            # TLS within connect_timeout (inside meet): past it, the peer holds a cluster certificate.
            with trio.fail_after(self.limits.connect_timeout + 2 * self.limits.read_timeout):
                met = await meet(link, self.admission, self.limits.connect_timeout)
                peer_id = met.peer_id
                peer = self.peers.seen(peer_id, remote, 0, "inbound", trio.current_time())
                assert peer is not None  # a peer that proved itself is always taken
                peer.role = self.admission.role_of(peer_id, met.hello.role)  # granted, never taken
                peer.name = met.name
                first = await link.next()
            while first is not None:
                unaccounted = True
                handler = self.handlers.get(type(first))
                if handler is None:  # the table allows it, but this node serves no such exchange
                    refused = RefusedByUs("unsupported", f"this node serves no {type(first).__name__}")
                    await link.refuse(messages.ErrorCode.REFUSED, refused)
                    raise refused
                following = await handler(link, peer_id, first)
                account(self.counters, self.peers, peer_id, link.traffic.take())
                unaccounted = False
                first = await self._next_exchange(link, met, known, remote, following)
        except (LinkBroken, trio.BrokenResourceError, OSError) as exc:
            # The link broke under an exchange we were willing to finish: not a refusal of the peer.
            self.counters.add("dropped.link")
            log.info("inbound connection dropped", extra=fields(peer=short(peer_id) if peer_id else "?",
                                                               error=str(exc)))
        except EXCHANGE_FAILURES as exc:
            reason = failure_reason(exc)
            refusal(self.counters, self.peers, peer_id, reason)
            log.info("inbound connection refused", extra=fields(peer=short(peer_id) if peer_id else "?",
                                                               reason=reason, error=str(exc)))
        finally:
            await link.aclose()  # first: its close_notify is part of what the exchange cost
            if peer_id:
                account(self.counters, self.peers, peer_id, link.traffic.take(), exchanges=int(unaccounted))

    async def _next_exchange(self, link: Link, met: Met, known: bool, remote: str,
                             read: messages.Message | None) -> messages.Message | None:
        """The first message of the next exchange on a kept-alive connection (``read``, when the last
        handler already read it), or None to close it: the exchange did not end where another may follow,
        the peer went quiet for ``keep_alive`` plus the read timeout or closed, or its slot was wanted by a
        new connection. The peer is admitted again (blocked or paused since its Hello: refused)."""
        if read is None:
            if self.keep_alive <= 0 or not link.conversation.reusable:
                return None
            scope = trio.CancelScope(deadline=trio.current_time() + self.keep_alive + self.limits.read_timeout)
            self._idle[scope] = (known, remote)
            try:
                with scope:
                    read = await link.next(timeout=math.inf)
            finally:
                del self._idle[scope]
            if scope.cancelled_caught or read is None:
                return None
        await readmit(link, self.admission, met)
        return read

    def _evict_idle(self, known: bool, host: str | None) -> bool:
        """Close the oldest idle kept-alive connection in this pool (from ``host``, when given) to make room
        for a new one; False when there is none."""
        for scope, (pool_known, remote) in self._idle.items():
            if pool_known == known and host in (None, remote) and not scope.cancel_called:
                scope.cancel()
                self.counters.add("connections_yielded")
                return True
        return False
