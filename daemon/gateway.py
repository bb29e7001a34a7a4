"""The gateway role: server-assisted FedAvg rounds over the same identity, codec and wire protocol.

A round: the gateway picks ``fedavg.fraction`` of its live clients, dials each, and sends the global
model as a delta against what that client holds (per-client references with error feedback, as in
gossip). Clients train ``fedavg.epochs`` locally and answer with their delta and sample count. When
``fedavg.quorum`` of them answered, or ``fedavg.deadline`` passed, the gateway aggregates with the
configured rule (``gossipfl.learning.aggregate``: mean, FedAvgM, trimmed mean, median, with optional norm
clipping) and sends the new global model back to every client that took part, so a round ends with
all of them holding it.

Stragglers: each client's session outlives its round. With ``late_updates = "drop"`` an update that
arrives after the aggregation is discarded; with ``"discount"`` it is kept and folded into the next
aggregation, scaled by ``1/sqrt(1 + staleness)`` (FedBuff), up to ``max_staleness`` rounds old.

A gateway that has training data takes part in its own rounds as one more client. Gateways gossip
their global models among themselves (the node's gossip loop, restricted to gateways), so two sites
with a gateway each converge too.
"""

from __future__ import annotations

import logging
import math
import random
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import trio

from gossipfl.config import aggregator_config
from gossipfl.errors import AggregationError, CodecError, ProtocolError
from gossipfl.learning.aggregate import AggregateResult, ClientUpdate, aggregate
from gossipfl.protocol import messages
from gossipfl.protocol.codec import decode_delta
from gossipfl.protocol.peers import Peer
from gossipfl.protocol.references import GossipState, Push

from .connection import LinkBroken, MessageStream, PeerRefused, expect, failure_reason, tls_handshake, verify_peer
from .logs import fields

if TYPE_CHECKING:
    from .node import Node

log = logging.getLogger("gossipfld.gateway")

MAX_CLIENTS = 1024  # clients whose copy of the global model we track
IDLE_WAIT = 1.0  # seconds between checks when there is no one to run a round with


@dataclass
class RoundReport:
    """What one round did: logged, kept in the status, and read by tests and benchmarks."""

    round: int
    selected: int
    answered: int
    late_applied: int
    participants: int
    samples: int
    update_norms: list[float]
    clipped: int
    aggregate_norm: float
    age: float
    seconds: float


@dataclass
class _Round:
    number: int
    params: np.ndarray
    age: float
    expected: int
    quorum_share: float
    updates: list[tuple[bytes, ClientUpdate, float]] = field(default_factory=list)
    enough: trio.Event = field(default_factory=trio.Event)
    published: trio.Event = field(default_factory=trio.Event)
    closed: bool = False
    result: np.ndarray | None = None
    result_age: float = 0.0

    @property
    def quorum(self) -> int:
        return max(1, math.ceil(self.quorum_share * self.expected))

    def _check(self) -> None:
        if (self.updates and len(self.updates) >= self.quorum) or self.expected <= 0:
            self.enough.set()

    def offer(self, client: bytes, update: ClientUpdate, age: float) -> bool:
        """Take an update while the round is open; False once it has been aggregated (a late one)."""
        if self.closed:
            return False
        self.updates.append((client, update, age))
        self._check()
        return True

    def withdraw(self, client: bytes) -> None:
        """A selected client will not answer (unreachable, refused): do not wait for it."""
        if self.closed or any(c == client for c, _, _ in self.updates):
            return
        self.expected -= 1
        self._check()


class Gateway:
    def __init__(self, node: Node, state: dict[str, Any]) -> None:
        self.node = node
        self.settings = node.config.fedavg
        self.aggregator = aggregator_config(self.settings)
        self.references = GossipState(node.model.num_params, node.codec, MAX_CLIENTS, outlier_factor=math.inf)
        self.round = int(state.get("gateway_round", 0)) if isinstance(state.get("gateway_round"), int) else 0
        self.momentum: np.ndarray | None = None
        self.late: list[tuple[int, bytes, ClientUpdate, float]] = []
        self.history: deque[RoundReport] = deque(maxlen=50)
        self.busy: set[bytes] = set()
        self.rng = random.Random()

    @property
    def trains_locally(self) -> bool:
        return self.node.config.training.enabled and len(self.node.data.train) > 0

    def status(self) -> dict[str, Any]:
        return {"round": self.round, "rule": self.aggregator.rule, "late_buffered": len(self.late),
                "recent": [asdict(r) for r in list(self.history)[-5:]]}

    # ---------------------------------------------------------------- rounds

    async def run(self) -> None:
        async with trio.open_nursery() as sessions:  # a client's session may outlive its round
            while True:
                await trio.sleep(self.settings.round_pause)
                if self.node.paused or 0 < self.settings.max_rounds <= self.round:
                    continue
                now = trio.current_time()
                clients = [p for p in self.node.peers.live()
                           if p.role != "gateway" and len(p.node_id) == 32 and p.next_try <= now
                           and p.node_id not in self.busy]
                local = 1 if self.trains_locally else 0
                if len(clients) + local < self.settings.min_clients or not clients:
                    await trio.sleep(IDLE_WAIT)
                    continue
                await self.one_round(clients, sessions)

    async def one_round(self, clients: list[Peer], sessions: trio.Nursery) -> RoundReport | None:
        node, s = self.node, self.settings
        started = trio.current_time()
        count = max(1, math.ceil(s.fraction * len(clients)))
        selected = self.rng.sample(clients, min(count, len(clients)))
        async with node.lock:
            params, age = node.model.params.copy(), node.age
        expected = len(selected) + (1 if self.trains_locally else 0)
        rnd = _Round(self.round + 1, params, age, expected, s.quorum)
        for peer in selected:
            self.busy.add(peer.node_id)
            sessions.start_soon(self._client_session, peer, rnd)
        if self.trains_locally:
            sessions.start_soon(self._local_update, rnd)
        with trio.move_on_after(s.deadline):
            await rnd.enough.wait()
        rnd.closed = True
        report = await self._aggregate(rnd, len(selected), started)
        rnd.published.set()
        return report

    async def _aggregate(self, rnd: _Round, selected: int, started: float) -> RoundReport | None:
        node, s = self.node, self.settings
        entries = [(client, update, age) for client, update, age in rnd.updates]
        late_applied = 0
        for old_round, client, update, age in self.late:
            staleness = rnd.number - old_round
            if staleness <= s.max_staleness:
                entries.append((client, ClientUpdate(update.delta, update.samples, staleness), age))
                late_applied += 1
        self.late.clear()
        if not entries:
            node.counters.add("fedavg.empty_rounds")
            log.info("round ended without updates", extra=fields(round=rnd.number, selected=selected))
            return None
        updates = [update for _, update, _ in entries]
        try:
            result: AggregateResult = await trio.to_thread.run_sync(aggregate, self.aggregator, updates,
                                                                     self.momentum)
        except AggregationError as exc:
            node.counters.add("fedavg.failed_rounds")
            log.warning("round not aggregated", extra=fields(round=rnd.number, error=str(exc)))
            return None
        async with node.lock:
            node.model.params += result.delta
            node.age = max([node.age, *(age for _, _, age in entries)])
            self.round = rnd.number
            rnd.result, rnd.result_age = node.model.params.copy(), node.age
        self.momentum = result.momentum
        report = RoundReport(rnd.number, selected, len(rnd.updates), late_applied, result.participants,
                             result.samples, [round(n, 6) for n in result.norms], result.clipped,
                             round(result.aggregate_norm, 6), node.age, round(trio.current_time() - started, 3))
        self.history.append(report)
        node.counters.add("fedavg.rounds")
        log.info("round aggregated", extra=fields(
            round=report.round, selected=selected, answered=report.answered, late=late_applied,
            participants=report.participants, samples=report.samples, clipped=report.clipped,
            aggregate_norm=report.aggregate_norm, max_update_norm=max(report.update_norms), age=node.age))
        return report

    async def _local_update(self, rnd: _Round) -> None:
        """The gateway's own data, as one more client of its own round."""
        node = self.node
        trained, samples = await node.train_from(rnd.params, self.settings.epochs)
        if not samples:
            rnd.withdraw(node.node_id)
        elif not rnd.offer(node.node_id, ClientUpdate(trained - rnd.params, samples), rnd.age + samples):
            node.counters.add("fedavg.late_dropped")

    # ---------------------------------------------------------------- one client

    async def _client_session(self, peer: Peer, rnd: _Round) -> None:
        node, s = self.node, self.settings
        late_window = s.deadline * (1 + s.max_staleness) if s.late_updates == "discount" else s.deadline
        conn: MessageStream | None = None
        try:
            with trio.fail_after(node.config.limits.connect_timeout + late_window + s.deadline
                                 + 3 * node.config.limits.read_timeout):
                stream = await node._dial(peer)
                conn = MessageStream(stream, node.limits, node.config.limits.read_timeout)
                await tls_handshake(stream, node.config.limits.connect_timeout)
                peer_id = verify_peer(stream, peer.node_id, node.allowlist)
                await conn.send(node.hello)
                node._check_hello(expect(await conn.receive(), messages.Hello), peer_id)  # type: ignore[arg-type]
                await self._serve_client(conn, peer_id, rnd, late_window)
            node.peers.succeeded(peer.node_id, trio.current_time())
        except (PeerRefused, LinkBroken, ProtocolError, CodecError, OSError, trio.TooSlowError,
                trio.BrokenResourceError) as exc:
            reason = failure_reason(exc)
            node.counters.add(f"fedavg.client_failed.{reason}")
            node.peers.failed(peer.node_id, trio.current_time())  # back off: not asked again for a while
            log.info("client left the round", extra=fields(peer=peer.node_id.hex()[:12], round=rnd.number,
                                                           reason=reason, error=str(exc)[:200]))
        finally:
            rnd.withdraw(peer.node_id)
            self.busy.discard(peer.node_id)
            if conn is not None:
                node._account(peer, conn, peer.node_id)
                await conn.aclose()

    async def _send_global(self, conn: MessageStream, peer_id: bytes, number: int, params: np.ndarray,
                           age: float, epochs: int, wait: float) -> tuple[Push, messages.Message]:
        """Send the global model as a delta against the client's copy (whole, if it lost its copy);
        returns the push, to commit once the answer shows the client holds it, and the answer."""
        push = await trio.to_thread.run_sync(self.references.prepare_push, peer_id, params)
        await conn.send(messages.GatewayRound(number, push.base_seq, push.new_seq, age, self.settings.deadline, epochs,
                                          push.payload))
        reply = await conn.receive(timeout=wait)
        if isinstance(reply, messages.NeedFull):
            self.node.counters.add("need_full_received")
            self.references.forget(peer_id)
            push = await trio.to_thread.run_sync(lambda: self.references.prepare_push(peer_id, params, full=True))
            await conn.send(messages.GatewayRound(number, push.base_seq, push.new_seq, age, self.settings.deadline,
                                              epochs, push.payload))
            reply = await conn.receive(timeout=wait)
        return push, reply

    async def _serve_client(self, conn: MessageStream, peer_id: bytes, rnd: _Round, late_window: float) -> None:
        node, s = self.node, self.settings
        push, reply = await self._send_global(conn, peer_id, rnd.number, rnd.params, rnd.age, s.epochs,
                                              late_window)
        update = expect(reply, messages.GatewayUpdate)
        assert isinstance(update, messages.GatewayUpdate)
        if update.round != rnd.number or update.base_seq != push.new_seq:
            raise ProtocolError(f"update for round {update.round} base {update.base_seq}, expected round "
                                f"{rnd.number} base {push.new_seq}")
        self.references.commit_push(push)
        if update.sample_count == 0:
            raise PeerRefused("samples", "an update must count at least one sample")
        delta = await trio.to_thread.run_sync(decode_delta, update.payload, node.model.num_params)
        client_update = ClientUpdate(delta, update.sample_count)
        if not rnd.offer(peer_id, client_update, update.age):
            if s.late_updates == "discount":
                self.late.append((rnd.number, peer_id, client_update, update.age))
                node.counters.add("fedavg.late_buffered")
            else:
                node.counters.add("fedavg.late_dropped")
            return
        node.counters.add("fedavg.updates_received")
        await rnd.published.wait()
        if rnd.result is None:
            return
        push, reply = await self._send_global(conn, peer_id, rnd.number, rnd.result, rnd.result_age, 0,
                                              node.config.limits.read_timeout)
        expect(reply, messages.Ack)
        self.references.commit_push(push)
