"""Meeting a peer, for both ends of a connection: TLS, the certificate's node id, the Hellos, admission.

Written once for the dialler and the listener: the mutual-TLS handshake (with its own deadline), the node id
from the peer's certificate (checked against the id we dialled and the allowlist), the Hello exchange (the
dialler speaks first), and admission, the policy that decides whether we talk to this peer at all. What
comes after the Hellos (a push, a round) belongs to whoever registered for it (``listener.Listener``) or
dialled for it (``Dialer``).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from gossipfl.cli.tls import client_context, server_context
from gossipfl.errors import GossipflError, RefusedByPeer, RefusedByUs
from gossipfl.identity.ids import check_peer, peer_name
from gossipfl.identity.node import NodeIdentity
from gossipfl.metrics import Counters
from gossipfl.protocol import framing, messages
from gossipfl.protocol.exchange import KEEP_ALIVE, PUSH_PULL, Party
from gossipfl.protocol.peers import Peer, PeerTable

from .link import CountedStream, Link, Traffic

log = logging.getLogger("gossipfld.peering")


@dataclass
class Admission:
    """Who this node is on the wire (its Hello) and whom it talks to; the one place a peer is let in."""

    identity: NodeIdentity
    fingerprint: bytes
    role: str
    capabilities: tuple[str, ...]
    peers: PeerTable
    allowlist: frozenset[bytes] | None
    is_paused: Callable[[], bool]
    gateways: frozenset[bytes] = frozenset()  # the ids the cluster lets act as gateways (fedavg.gateways)

    def role_of(self, peer_id: bytes, claimed: str) -> str:
        """The role a peer has: "gateway" only when the cluster granted it, whatever it claims."""
        return "gateway" if claimed == "gateway" and peer_id in self.gateways else "node"

    @classmethod
    def for_node(cls, identity: NodeIdentity, fingerprint: bytes, role: str, scheme: str, push_pull: bool,
                 peers: PeerTable, allowlist: frozenset[bytes] | None, is_paused: Callable[[], bool],
                 gateways: frozenset[bytes] = frozenset(), keep_alive: bool = False) -> Admission:
        caps = (scheme,) + ((PUSH_PULL,) if push_pull else ()) + ((KEEP_ALIVE,) if keep_alive else ())
        return cls(identity, fingerprint, role, caps, peers, allowlist, is_paused, gateways)

    @property
    def hello(self) -> messages.Hello:
        return messages.Hello(self.identity.node_id, messages.PROTOCOL_VERSION, self.fingerprint, self.role,
                              self.capabilities)

    def check(self, hello: messages.Hello, peer_id: bytes) -> None:
        """Raise ``RefusedByUs`` unless we talk to the peer whose certificate gave ``peer_id``."""
        if hello.node_id != peer_id:
            raise RefusedByUs("identity", "Hello names another node id than the certificate")
        if hello.model_fingerprint != self.fingerprint:
            raise RefusedByUs("fingerprint", "peer trains another model")
        if self.peers.is_blocked(peer_id):
            raise RefusedByUs("blocked", "peer is blocked by the operator")
        if self.is_paused():
            raise RefusedByUs("paused", "this node is paused by its operator")


@dataclass(frozen=True)
class Met:
    """A peer we have shaken hands with: its proven id and its Hello."""

    peer_id: bytes
    hello: messages.Hello
    name: str = ""  # the certificate's common name, for operators


async def _tls(stream: trio.SSLStream, timeout: float) -> None:
    try:
        with trio.fail_after(timeout):
            await stream.do_handshake()
    except trio.TooSlowError:
        raise RefusedByPeer("timeout", "TLS handshake timed out") from None
    except trio.BrokenResourceError as exc:
        raise RefusedByPeer("tls", f"TLS handshake failed: {exc.__cause__ or exc}") from exc


def _verify(stream: trio.SSLStream, expected: bytes | None, allowlist: frozenset[bytes] | None) -> bytes:
    try:
        return check_peer(stream, expected_id=expected, allowlist=allowlist)
    except GossipflError as exc:
        raise RefusedByUs("identity", str(exc)) from exc


async def meet(link: Link, admission: Admission, tls_timeout: float, expected: bytes | None = None) -> Met:
    """TLS, identity, Hellos and admission on a fresh link, for either party. Refusing a dialler's Hello,
    the listener tells it why (an Error), so the dialler counts a refusal by the peer, not a broken link."""
    stream = link.stream
    assert isinstance(stream, trio.SSLStream)
    await _tls(stream, tls_timeout)
    peer_id = _verify(stream, expected, admission.allowlist)
    name = peer_name(stream)
    if link.party is Party.DIALER:
        await link.send(admission.hello)
        hello = await link.receive(messages.Hello)
        admission.check(hello, peer_id)  # type: ignore[arg-type]
    else:
        hello = await link.receive(messages.Hello)
        assert isinstance(hello, messages.Hello)
        await readmit(link, admission, Met(peer_id, hello, name))
        await link.send(admission.hello)
    assert isinstance(hello, messages.Hello)
    return Met(peer_id, hello, name)


async def readmit(link: Link, admission: Admission, met: Met) -> None:
    """Admission on the listener's side, at the Hellos and again at each exchange on a kept-alive connection
    (the operator may have blocked the peer or paused this node since): a refused peer is told why."""
    try:
        admission.check(met.hello, met.peer_id)
    except RefusedByUs as exc:
        codes = messages.ErrorCode
        code = {"fingerprint": codes.FINGERPRINT_MISMATCH, "paused": codes.PAUSED}.get(exc.reason, codes.REFUSED)
        await link.refuse(code, exc)
        raise


class Dialer:
    """Dial a peer and meet it: the one way this node opens a connection, for gossip and for rounds."""

    def __init__(self, admission: Admission, limits: framing.Limits, connect_timeout: float,
                 read_timeout: float, counters: Counters) -> None:
        # TCP, or what stands in for it: in-process tests join apps with in-memory streams (TLS still runs).
        self.connect: Callable[[str, int], Awaitable[trio.abc.Stream]] = trio.open_tcp_stream
        self.admission = admission
        self.limits = limits
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.counters = counters

    async def dial(self, peer: Peer) -> tuple[Link, Met]:
        """A link to ``peer`` past the Hellos; the caller closes it. A static address not yet dialled is
        learnt here: the table then knows it by the id its certificate proves."""
        with trio.fail_after(self.connect_timeout):
            tcp = await self.connect(peer.host, peer.port)
        traffic = Traffic()
        stream = trio.SSLStream(CountedStream(tcp, traffic, self.counters), client_context(self.admission.identity),
                                server_hostname=None)
        link = Link(stream, Party.DIALER, self.limits, self.read_timeout, traffic)
        try:
            met = await meet(link, self.admission, self.connect_timeout, peer.proven_id)
        except BaseException:
            await link.aclose()
            raise
        if peer.proven_id is None:
            role = self.admission.role_of(met.peer_id, met.hello.role)
            peer = self.admission.peers.resolved(peer, met.peer_id, role, trio.current_time()) or peer
        peer.name = met.name
        return link, met


def server_link(tcp: trio.abc.Stream, admission: Admission, limits: framing.Limits, read_timeout: float,
                counters: Counters) -> Link:
    traffic = Traffic()
    stream = trio.SSLStream(CountedStream(tcp, traffic, counters), server_context(admission.identity),
                            server_side=True)
    return Link(stream, Party.LISTENER, limits, read_timeout, traffic)
